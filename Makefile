# `make demo` and `make test` are the only set-up a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev-nni

.PHONY: venv servers demo test test-fast lint typecheck clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools<82" wheel
	$(BIN)/python -m pip install -q -e ".[dev,nni]"
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/yoloprune demo

# PostgreSQL and Chromium for the storage, dashboard and report tests: installed when root on Debian.
servers:
	@sh scripts/test-servers.sh

test: venv servers
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

lint: venv
	$(BIN)/ruff check yoloprune tests experiments
	$(BIN)/ruff format --check yoloprune tests experiments

typecheck: venv
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
