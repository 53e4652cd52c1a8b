#!/usr/bin/env bash
# Where a pipeline target runs: here, or in the project image (docs/containers.md, "Where the
# pipeline targets run"). The Makefile calls it, once per target, when the target runs (never while
# make reads the Makefile):
#   docker/run.sh --vendor V --image NAME --uid UID TARGET   train, repro, evaluate, infer, bench, bench-gpu
#   docker/run.sh --vendor V --image NAME --uid UID --shell  make shell: bash in the image
# A TARGET runs
#   natively, as `make _TARGET`      with LOCAL=1, inside the image (GRPO_IN_IMAGE), or on a host
#                                    without GPUs unless IN_IMAGE=1;
#   in the image, as `make TARGET …` with IN_IMAGE=1, or on a GPU host (/dev/kfd: AMD, nvidia-smi:
#                                    NVIDIA) where the image exists (where it runs natively again);
#   nowhere (exit 2, saying why)     on a GPU host without the image.
# The make in the image gets every variable given to make on the command line (RUN_ID=v1 PRESET=…),
# except those that pick and start the container (LOCAL IN_IMAGE VENDOR GPUS GPU_IMAGE IMAGE_UID
# IMAGE_GID DOCKER SHM_SIZE HF_CACHE RENDER_GID: this script reads them from its environment, where
# make puts command-line variables) and this host's paths (VENV PYTHON HF_HOME).
# Under `make -n` it prints the commands of an in-image run instead of running them.
set -euo pipefail

NOT_FORWARDED=" LOCAL IN_IMAGE VENDOR GPUS GPU_IMAGE IMAGE_UID IMAGE_GID DOCKER SHM_SIZE HF_CACHE RENDER_GID VENV PYTHON HF_HOME "
DOCKER=${DOCKER:-docker}

vendor="" image="" uid="" target=""
while [ $# -gt 0 ]; do
  case "$1" in
    --vendor) vendor=${2:?"--vendor needs a value"}; shift ;;
    --image) image=${2:?"--image needs a name"}; shift ;;
    --uid) uid=${2:?"--uid needs a value"}; shift ;;
    --shell) target=--shell ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown argument '$1'" >&2; exit 2 ;;
    *) target=$1 ;;
  esac
  shift
done
if [ -z "$target" ] || [ -z "$image" ] || [ -z "$uid" ]; then
  echo "usage: docker/run.sh --vendor rocm|cuda|cpu --image NAME --uid UID TARGET|--shell" >&2
  exit 2
fi

# make -n (or -q, -t): MAKEFLAGS starts with make's one-letter flags (e.g. "n" or "ns").
dry=""
case "${MAKEFLAGS%% *}" in --*) ;; *[nqt]*) dry=1 ;; esac

# ---- where -----------------------------------------------------------------------------------
gpu_host=""
if [ -e /dev/kfd ]; then gpu_host=/dev/kfd
elif command -v nvidia-smi >/dev/null 2>&1; then gpu_host=$(command -v nvidia-smi)
fi
if [ "$target" = --shell ]; then where=image
elif [ "${LOCAL:-}" = 1 ] || [ -n "${GRPO_IN_IMAGE:-}" ]; then where=native
elif [ "${IN_IMAGE:-}" = 1 ]; then where=image
elif [ -z "$gpu_host" ]; then where=native
elif "$DOCKER" image inspect "$image" >/dev/null 2>&1; then where=image
else where=missing
fi

case "$where" in
  native)
    exec "${MAKE:-make}" --no-print-directory "_$target" ;;
  missing)
    # rather than install the CPU stack and train on CPU
    echo "error: this is a GPU host ($gpu_host) but the image $image is not built or docker cannot reach it:" \
         "run \`make image\` (VENDOR=$vendor), or LOCAL=1 to run natively with your own environment" >&2
    exit 2 ;;
esac

# ---- in the image ------------------------------------------------------------------------------
# ROCm: the KFD and DRI device nodes, their groups, and no seccomp filter (HIP needs it off);
# GPUS=0,1 selects GPUs with HIP_VISIBLE_DEVICES (CUDA_VISIBLE_DEVICES kept equal, as vLLM requires).
gpus=${GPUS:-}
case "$vendor" in
  rocm)
    render_gid=${RENDER_GID-$(getent group render 2>/dev/null | cut -d: -f3 || true)}
    flags=(--device /dev/kfd --device /dev/dri --group-add video ${render_gid:+--group-add "$render_gid"}
           --security-opt seccomp=unconfined
           ${gpus:+-e "HIP_VISIBLE_DEVICES=$gpus" -e "CUDA_VISIBLE_DEVICES=$gpus"}) ;;
  cuda)
    if [ -n "$gpus" ]; then flags=(--gpus "\"device=$gpus\""); else flags=(--gpus all); fi
    flags+=(--ulimit memlock=-1 --ulimit stack=67108864) ;;
  cpu)
    flags=() ;;
  *)
    echo "error: VENDOR must be rocm (AMD MI300X), cuda (NVIDIA) or cpu, not '$vendor'" >&2
    exit 2 ;;
esac

hf_cache=${HF_CACHE:-${HF_HOME:-$PWD/.cache/huggingface}}
cmd=("$DOCKER" run --rm --init "${flags[@]}" --ipc=host --shm-size "${SHM_SIZE:-16g}")
[ ! -f .env ] || cmd+=(--env-file .env)
cmd+=(-e HF_TOKEN -e WANDB_API_KEY -e LOG_LEVEL -v "$PWD:/workspace" -w /workspace
      -v "$hf_cache:/cache/huggingface" -e HF_HOME=/cache/huggingface)
[ ! -f "$HOME/.gitconfig" ] || cmd+=(-v "$HOME/.gitconfig:/home/grpo/.gitconfig:ro")

if [ "$target" = --shell ]; then
  cmd+=(-it "$image" bash)
else
  [ ! -t 0 ] || cmd+=(-it)
  # make hands its command-line variables to recipes in MAKEFLAGS, after " -- ": a backslash
  # escapes the next character (space, tab, backslash) and "$" is doubled. They are forwarded sorted
  # by name (make's own order varies with the nesting).
  forward=()
  if [[ " ${MAKEFLAGS:-}" == *" -- "* ]]; then
    rest="${MAKEFLAGS#*-- } " word=""
    for ((i = 0; i < ${#rest}; i++)); do
      c=${rest:i:1}
      if [ "$c" = "\\" ]; then
        word+=${rest:i+1:1}; i=$((i + 1))
      elif [ "$c" != " " ]; then
        word+=$c
      elif [ -n "$word" ]; then
        name=${word%%=*}
        [[ "$NOT_FORWARDED" == *" ${name%[:+?!]} "* ]] || forward+=("${word//\$\$/\$}")
        word=""
      fi
    done
  fi
  cmd+=("$image" make "$target")
  if [ ${#forward[@]} -gt 0 ]; then
    mapfile -t forward < <(printf '%s\n' "${forward[@]}" | LC_ALL=C sort)
    cmd+=("${forward[@]}")
  fi
fi

# The command as a shell line: words quoted only where they need it.
quote() {
  local word out=()
  for word; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$word")
    else out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# The image's user (your uid; 1000 for root) writes to the mounted checkout, so it must own it.
if [ -n "$dry" ]; then
  echo "bash docker/require_docker.sh --image $image"
  echo "test \"\$(stat -c %u \"$PWD\")\" = $uid"
  quote mkdir -p "$hf_cache"
  quote "${cmd[@]}"
  exit 0
fi
bash "$(dirname "$0")/require_docker.sh" --image "$image"
owner=$(stat -c %u "$PWD")
if [ "$owner" != "$uid" ]; then
  echo "error: $PWD belongs to uid $owner, but the image's user is uid $uid (your uid; 1000 for root):" \
       "it could not write here. Run make as the checkout's non-root owner (docs/containers.md)." >&2
  exit 2
fi
mkdir -p "$hf_cache"
exec "${cmd[@]}"
