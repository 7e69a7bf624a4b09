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

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Until the end-to-end demo lands, `make demo` walks every phase through the real CLI on a
# throw-away SQLite file, including a refused edge, a ramp, a rollback and the journal check.
demo: $(STAMP)
	@set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	export MIGRATION_FSM_DATABASE_URL="sqlite:///$$dir/demo.db" MIGRATION_FSM_ACTOR=demo; \
	fsm() { echo "\$$ migration-fsm $$*"; $(BIN)/migration-fsm "$$@" 2>/dev/null; }; \
	fsm db upgrade; fsm init; fsm advance; fsm advance; fsm ramp 10; fsm ramp 50; \
	fsm advance || echo "(refused as expected: cutover needs 100% before cleanup)"; \
	fsm ramp 100; fsm advance; fsm rollback --reason "demo: back to cutover"; \
	fsm advance; fsm advance; fsm status; fsm history; fsm verify

bench: $(STAMP)
	$(BIN)/python bench/transition.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build
