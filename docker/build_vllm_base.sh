#!/usr/bin/env bash
# Stage 1 of the GPU image: the vLLM base image (torch, vLLM and their GPU libraries).
#
#   default        pull the official prebuilt image at the pinned vLLM version
#                  ROCm: vllm/vllm-openai-rocm:v<ver>   NVIDIA: vllm/vllm-openai:v<ver><suffix>
#   --from-source  (ROCm only) build vLLM's own docker/Dockerfile.rocm from git tag v<ver>,
#                  compiled for ROCM_ARCH only (gfx942 = MI300X); hours, not minutes
#   --with-rocm-base  with --from-source: also build docker/Dockerfile.rocm_base (torch, triton,
#                  flash-attention, aiter for ROCM_ARCH) instead of the tag's prebuilt rocm base
#
# Usage: docker/build_vllm_base.sh [--vendor rocm|cuda] [--vllm-version X.Y.Z] [--rocm-arch gfxNNN]
#          [--cuda-tag-suffix -cu129] [--from-source [--with-rocm-base]] [--dry-run] [--print-image]
#   --print-image  print the base image reference and exit (no docker needed; the Makefile uses it)
#   --dry-run      print the commands instead of running them (no docker needed)
# Pins default to docker/versions.env. VLLM_SRC_DIR overrides where the vLLM tag is cloned.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/build_lib.sh
. "$HERE/build_lib.sh"

# Defaults from docker/versions.env (KEY=value lines; nothing in it is executed).
while IFS='=' read -r key value; do
  case "$key" in
    VLLM_VERSION|ROCM_BASE_REPO|CUDA_BASE_REPO|CUDA_TAG_SUFFIX|ROCM_ARCH|VLLM_GIT_URL|LOCAL_BASE_REPO)
      printf -v "PIN_$key" '%s' "$value" ;;
  esac
done < <(grep -E '^[A-Z_]+=' "$HERE/versions.env")

vendor=rocm
vllm_version=$PIN_VLLM_VERSION
rocm_arch=$PIN_ROCM_ARCH
cuda_tag_suffix=$PIN_CUDA_TAG_SUFFIX
from_source=0
with_rocm_base=0
dry_run=0
print_image=0


while [ $# -gt 0 ]; do
  case "$1" in
    --vendor|--vllm-version|--rocm-arch|--cuda-tag-suffix) [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --vendor) vendor=${2:-}; shift ;;
    --vllm-version) vllm_version=${2:-}; shift ;;
    --rocm-arch) rocm_arch=${2:-}; shift ;;
    --cuda-tag-suffix) cuda_tag_suffix=${2:-}; shift ;;
    --from-source) from_source=1 ;;
    --with-rocm-base) with_rocm_base=1 ;;
    --dry-run) dry_run=1 ;;
    --print-image) print_image=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

case "$vendor" in
  rocm|cuda) ;;
  cpu) die "the CPU base is not a vLLM image: docker/build_cpu_base.sh builds it (make image VENDOR=cpu)" ;;
  *) die "--vendor must be rocm (AMD MI300X) or cuda (NVIDIA), not '$vendor'" ;;
esac

# TRL 1.16 supports vLLM 0.22.0-0.31.0 (trl[vllm] requires vllm>=0.22.0,<=0.31.0).
[[ "$vllm_version" =~ ^0\.([0-9]+)\.([0-9]+)$ ]] || die "vLLM version must look like 0.MINOR.PATCH, not '$vllm_version'"
minor=$((10#${BASH_REMATCH[1]}))
if [ "$vllm_version" != "0.31.0" ] && { [ "$minor" -lt 22 ] || [ "$minor" -gt 30 ]; }; then
  die "vLLM $vllm_version is outside TRL 1.16's supported range 0.22.0-0.31.0"
fi

if [ "$from_source" = 1 ]; then
  [ "$vendor" = rocm ] || die "--from-source builds vLLM's ROCm Dockerfile only; NVIDIA uses the official vllm/vllm-openai image"
  [[ "$rocm_arch" =~ ^gfx[0-9a-f]+$ ]] || die "--rocm-arch must be one gfx target (e.g. gfx942), not '$rocm_arch'"
  image="$PIN_LOCAL_BASE_REPO:v$vllm_version-rocm-$rocm_arch"
elif [ "$vendor" = rocm ]; then
  [ "$with_rocm_base" = 0 ] || die "--with-rocm-base only makes sense with --from-source"
  image="$PIN_ROCM_BASE_REPO:v$vllm_version"
else
  [ "$with_rocm_base" = 0 ] || die "--with-rocm-base only makes sense with --from-source"
  [[ "$cuda_tag_suffix" =~ ^(-[a-z0-9.]+)*$ ]] || die "--cuda-tag-suffix must look like -cu129, not '$cuda_tag_suffix'"
  image="$PIN_CUDA_BASE_REPO:v$vllm_version$cuda_tag_suffix"
fi

if [ "$print_image" = 1 ]; then
  echo "$image"
  exit 0
fi

DOCKER=${DOCKER:-docker}

if [ "$dry_run" = 0 ]; then
  bash "$HERE/require_docker.sh" --buildkit
fi

if [ "$from_source" = 0 ]; then
  # The official image: pulled once, reused while the tag is present locally.
  if [ "$dry_run" = 0 ] && "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
    echo "build_vllm_base: $image is already present"
  else
    run "$DOCKER" pull "$image"
  fi
  echo "build_vllm_base: base image $image"
  exit 0
fi

# From source: vLLM's own ROCm Dockerfile at the pinned tag, for one GPU architecture.
if [ "$dry_run" = 0 ] && ! command -v git >/dev/null 2>&1; then
  die "git is needed to fetch vLLM v$vllm_version"
fi
src=${VLLM_SRC_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/grpo-qwen-vl/vllm-src/v$vllm_version}
if [ -d "$src/.git" ]; then
  if [ "$dry_run" = 0 ]; then
    have=$(git -C "$src" describe --tags --exact-match 2>/dev/null || true)
    [ "$have" = "v$vllm_version" ] || die "$src holds '${have:-an untagged commit}', not v$vllm_version: remove it or set VLLM_SRC_DIR"
  fi
  echo "build_vllm_base: using the vLLM v$vllm_version checkout in $src"
else
  run git clone --depth 1 --branch "v$vllm_version" "$PIN_VLLM_GIT_URL" "$src"
fi

base_args=()
if [ "$with_rocm_base" = 1 ]; then
  rocm_base="$PIN_LOCAL_BASE_REPO:rocm-base-v$vllm_version-$rocm_arch"
  run env DOCKER_BUILDKIT=1 "$DOCKER" build -f "$src/docker/Dockerfile.rocm_base" \
    --build-arg "PYTORCH_ROCM_ARCH=$rocm_arch" -t "$rocm_base" "$src"
  base_args=(--build-arg "BASE_IMAGE=$rocm_base")
fi
run env DOCKER_BUILDKIT=1 "$DOCKER" build -f "$src/docker/Dockerfile.rocm" --target final \
  --build-arg REMOTE_VLLM=0 --build-arg "ARG_PYTORCH_ROCM_ARCH=$rocm_arch" "${base_args[@]}" \
  -t "$image" "$src"
echo "build_vllm_base: base image $image"
