#!/usr/bin/env bash
# Entry point of the project image (docker/Dockerfile): runtime checks, then the command. It writes
# nothing: `make setup` in the image checks the image's python (GRPO_IN_IMAGE, see the Makefile).
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

if [ -n "${GRPO_IN_IMAGE:-}" ] && ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "entrypoint: warning: $(pwd) is not a git checkout: mount the repository there" \
       "(make shell does: -v \$PWD:/workspace); DVC needs it" >&2
fi

if [ $# -eq 0 ]; then
  set -- bash
fi
exec "$@"
