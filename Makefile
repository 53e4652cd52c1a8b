# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
PATH     := $(CURDIR)/$(VENV)/bin:$(PATH)
RUN_ID   ?=
PRESET   ?=
PRESET_FILE = $(if $(PRESET),presets/$(PRESET).yaml)

# Keep every cache inside the workspace and nothing phoning home.
export PATH
export DVC_NO_ANALYTICS := 1
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export VLLM_NO_USAGE_STATS := 1
export WANDB_DIR ?= $(CURDIR)/outputs

.PHONY: help setup check embedded demo train repro compare test lint clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup:  ## create .venv with the pinned CPU stack (idempotent)
	@bash scripts/setup_cpu_env.sh

check: setup  ## validate params.yaml (with PRESET=… and RUN_ID=… applied) in a few seconds
	@$(PYTHON) -m pipeline.params $(if $(PRESET),--preset $(PRESET_FILE)) $(if $(RUN_ID),--set run_id=$(RUN_ID))

embedded: setup  ## build the tiny models and the synthetic dataset under assets/embedded
	@$(PYTHON) -m pipeline.embedded

# One run = one DVC experiment named after its run id: the committed params.yaml plus the
# preset's overrides (dvc exp run -S). DVC skips every stage whose inputs did not change.
RUN = $(PYTHON) -m pipeline.experiments

demo: embedded  ## run the whole pipeline on the embedded default (CPU, no Hub)
	@$(RUN) --run-id demo --preset demo
	@$(PYTHON) -m pipeline.summary demo

train: setup  ## make train RUN_ID=v1 [PRESET=demo]: reproduce the train stage (and what it needs)
	@test -n "$(RUN_ID)" || { echo "usage: make train RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(if $(filter demo,$(PRESET)),$(MAKE) --no-print-directory embedded,true)
	@$(RUN) --run-id $(RUN_ID) $(if $(PRESET),--preset $(PRESET)) train

repro: setup  ## make repro RUN_ID=v1 [PRESET=demo]: all four stages for a run
	@test -n "$(RUN_ID)" || { echo "usage: make repro RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(if $(filter demo,$(PRESET)),$(MAKE) --no-print-directory embedded,true)
	@$(RUN) --run-id $(RUN_ID) $(if $(PRESET),--preset $(PRESET))

compare: setup  ## compare the metrics and params of every run (DVC experiments)
	@dvc exp show --no-pager --only-changed --drop 'Created|State|Executor' 2>/dev/null || dvc exp show --no-pager

test: setup  ## the test suite (CPU, no network)
	$(PYTHON) -m pytest

lint: setup  ## ruff
	$(PYTHON) -m ruff check pipeline tests scripts
