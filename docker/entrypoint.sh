#!/usr/bin/env bash
# Entry point of the project image (docker/Dockerfile): runtime checks, then the command.
# The repository is mounted at the working directory (/workspace) at run time, never baked in.
set -euo pipefail

case "${GRPO_GPU_VENDOR:-}" in
  rocm)
    # Select GPUs with HIP_VISIBLE_DEVICES; vLLM refuses a different CUDA_VISIBLE_DEVICES next to it.
    if [ -n "${HIP_VISIBLE_DEVICES:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] \
       && [ "$HIP_VISIBLE_DEVICES" != "$CUDA_VISIBLE_DEVICES" ]; then
      echo "entrypoint: warning: HIP_VISIBLE_DEVICES=$HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" \
           "differ; set only HIP_VISIBLE_DEVICES (make shell GPUS=0,1 does)" >&2
    fi
    if [ ! -e /dev/kfd ]; then
      echo "entrypoint: warning: /dev/kfd is missing: run with --device /dev/kfd --device /dev/dri (make shell does)" >&2
    fi
    ;;
esac

# `make setup` builds the CPU .venv; in the image the environment is the image itself ($VENV points
# at a wrapper of the image's python). Mark it current for the mounted checkout, exactly as
# scripts/setup_cpu_env.sh checks it (tests/test_docker.py keeps the two in step), so `make train`
# and every target that depends on `setup` run here unchanged and never install the CPU stack.
if [ -n "${VENV:-}" ] && [ -w "${VENV}" ] && [ -f requirements/cpu.txt ] \
   && [ -f scripts/setup_cpu_env.sh ] && [ -f scripts/cpu_torchvision_fix.py ]; then
  cat requirements/cpu.txt scripts/setup_cpu_env.sh scripts/cpu_torchvision_fix.py \
    | sha256sum | cut -d' ' -f1 > "$VENV/.requirements.sha256"
fi

if [ -n "${GRPO_IN_IMAGE:-}" ] && ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "entrypoint: warning: $(pwd) is not a git checkout: mount the repository there" \
       "(make shell does: -v \$PWD:/workspace); DVC needs it" >&2
fi

if [ $# -eq 0 ]; then
  set -- bash
fi
exec "$@"
