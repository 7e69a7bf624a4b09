# make demo   run the main job on SQLite (nothing to set up)
# make test   ruff, mypy and the tests (SQLite and the PostgreSQL of MIGRATION_FSM_TEST_POSTGRES_URL)
# make bench  the benchmarks under bench/
# make test-fast  the inner loop: lint, types and every test not marked slow (no SIGKILL matrix, no wheel)
# make mutate  mutation testing of the journal, the machine, the runner, the client and validate
# make mutate-pg MUTANTS=...  the same for PostgreSQL-only mutants, on the PostgreSQL half of the tests

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo bench lint typecheck pytest pgbouncer chromium mutate mutate-pg clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The tests run in PYTEST_WORKERS processes (pytest-xdist); PYTEST_WORKERS=0 runs them in this one.
# Three on two cores: many tests wait on processes and servers (make test here, idle, 2026-12-07:
# 8 min 36 s with three; a fourth did not help). Run one suite at a time against a shared
# PostgreSQL: one alone peaks at about 90 of its 100 connections.
PYTEST_WORKERS ?= 3

# tests/system/test_pgbouncer.py runs PgBouncers of its own: the distribution's package.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || { \
	    echo "installing the distribution's pgbouncer package (tests/system/test_pgbouncer.py)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null; }; }

# tests/system/test_status_page.py opens the status page in the distribution's Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	    echo "installing the distribution's chromium package (tests/system/test_status_page.py)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }

# --dist loadgroup: tests marked with one xdist_group run on one worker, one after the other.
pytest: $(STAMP) pgbouncer chromium
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: lint typecheck
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

# Mutation testing (mutmut, configured under [tool.mutmut] in pyproject.toml) of the journal, the
# machine, the transition runner, the client and validate: every mutant must be killed by the tests
# or explained in docs/MUTATION.md. Takes over an hour on two cores: not part of `make test`.
# MUTANTS narrows a run to some mutant names, e.g. MUTANTS='migration_fsm.client*'; a narrowed run
# keeps the mutants/ of the last one (and its results for the other modules).
MUTANTS ?=
mutate: $(STAMP)
	$(BIN)/python -m pip install --quiet 'mutmut>=3.3'
	$(if $(MUTANTS),,rm -rf mutants)
	$(BIN)/mutmut run --max-children 2 $(MUTANTS) || true
	$(BIN)/mutmut results

# The same over the PostgreSQL half of those tests (the server of MIGRATION_FSM_TEST_POSTGRES_URL),
# for the code only PostgreSQL runs: in a copy of the tree, .mutants-pg/, whose [tool.mutmut]
# selection is [tool.migration-fsm.mutmut-postgresql] (tests/support/mutmut_postgresql.py).
# MUTANTS is required: name the PostgreSQL-only mutants (docs/MUTATION.md), not every one.
# One child at the lowest priority: every test creates a schema on the server. The ledger's
# PgBouncer test is in that selection: without `pgbouncer` mutmut's stats run fails.
mutate-pg: $(STAMP) pgbouncer
	@test -n "$(MUTANTS)" || { echo "make mutate-pg MUTANTS='<names or globs>'"; exit 2; }
	$(BIN)/python -m pip install --quiet 'mutmut>=3.3'
	$(BIN)/python tests/support/mutmut_postgresql.py .mutants-pg
	cd .mutants-pg && nice -n 19 ../$(BIN)/mutmut run --max-children 1 $(MUTANTS) || true
	cd .mutants-pg && ../$(BIN)/mutmut results

# The end-to-end demo on SQLite files in a temporary folder (see `migration-fsm demo --help`).
demo: $(STAMP)
	$(BIN)/migration-fsm demo

# Every benchmark at sizes that finish in a few minutes, and one table (docs/PERFORMANCE.md).
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) mutants .mutants-pg .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build
