# The two commands a new user needs (see README.md):
#   make repro   set up .venv if needed, then run the whole pipeline with `dvc repro`
#   make test    set up .venv if needed, then lint and run the whole test suite (CI runs this)
#   make test-fast   the pure unit tests only (`pytest -m "not slow"`, under a minute)
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: repro test test-fast lint format clean setup

setup: $(STAMP)

# (Re)install when .venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/python -m dvc repro

# Every tier (unit, integration, e2e; gpu tests skip without a GPU), after the lint.
test: lint
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format pipeline tests benchmarks
	$(BIN)/ruff check --fix pipeline tests benchmarks

clean:
	rm -rf data/prepared models metrics plots mlflow.db mlruns
