# make demo   run the main job on SQLite (nothing to set up)
# make test   ruff, mypy and the tests (SQLite and the PostgreSQL of MIGRATION_FSM_TEST_POSTGRES_URL)
# make bench  the benchmarks under bench/

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint typecheck pytest clean

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
PYTEST_WORKERS ?= 2

pytest: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The end-to-end demo on SQLite files in a temporary folder (see `migration-fsm demo --help`).
demo: $(STAMP)
	$(BIN)/migration-fsm demo

# Every benchmark at sizes that finish in a few minutes, and one table (docs/PERFORMANCE.md).
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build
