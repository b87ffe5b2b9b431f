# Quick start: `make train` (embedded default run) and `make test`; each creates .venv when missing.
# `make test-fast`: the unit tests alone (no Ray cluster, no GPU), a few minutes.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/unigrpo: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: setup train test test-fast lint bench
setup: $(BIN)/unigrpo

train: setup
	$(BIN)/unigrpo train

test: setup
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -m "not gpu" -q

test-fast: setup
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -m "not slow and not gpu" -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench.run_all
