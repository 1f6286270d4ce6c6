# The one place for commands. CI runs `make ci` (see .ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-postgres lint types ci bench bench-ingest bench-journeys bench-audience clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start whenthen on the embedded SQLite database (whenthen.db), API + worker in one process.
run: install
	$(BIN)/whenthen serve

## Run the whole test suite (SQLite always; PostgreSQL when it answers on 127.0.0.1:5432).
test: install
	$(BIN)/python -m pytest

CODE := src tests $(wildcard bench)

lint: install
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/lint-imports

types: install
	$(BIN)/mypy $(CODE)

## What CI runs: lint, types, and the test suite with PostgreSQL required.
ci: lint types
	WHENTHEN_REQUIRE_POSTGRES=1 $(MAKE) test

## Every benchmark (ingest, journeys, audience) with a summary of the goals; QUICK=1 for the short forms.
bench: install
	$(BIN)/python -m bench $(if $(QUICK),--quick)

bench-ingest: install
	$(BIN)/python -m bench.ingest

bench-journeys: install
	$(BIN)/python -m bench.journeys

bench-audience: install
	$(BIN)/python -m bench.audience

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
