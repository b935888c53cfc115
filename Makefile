# Set-up and checks. Every target creates .venv on first use; installs are pinned by constraints.txt
# (torch==2.13.0 resolves to the local CPU wheel instead of GBs of CUDA packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

## make test: unit and integration tests on tiny models, offline
test: $(STAMP)
	$(BIN)/python -m pytest

## make demo: the quickstart (a GRAFT pack saved packed, reloaded, mixed batch); grows into the extraction demo
demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

## make lint: ruff check + format check
lint: $(STAMP)
	$(BIN)/python -m ruff check src tests examples
	$(BIN)/python -m ruff format --check src tests examples

format: $(STAMP)
	$(BIN)/python -m ruff check --fix src tests examples
	$(BIN)/python -m ruff format src tests examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
