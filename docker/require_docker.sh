#!/usr/bin/env bash
# Fails early, with a message saying what to do, when the container tooling is not usable here.
# Usage: docker/require_docker.sh [--buildkit] [--image NAME]
#   --buildkit    also require BuildKit (the docker buildx plugin): image builds need it
#   --image NAME  also require that image to exist locally (make shell / image-train)
# Exit codes: 127 docker not on PATH, 3 BuildKit missing, 4 engine unreachable, 5 image missing,
# 2 bad usage.
set -euo pipefail

DOCKER=${DOCKER:-docker}
need_buildkit=0
image=""
while [ $# -gt 0 ]; do
  case "$1" in
    --buildkit) need_buildkit=1 ;;
    --image) image=${2:?"--image needs a name"}; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "require_docker: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v "$DOCKER" >/dev/null 2>&1; then
  cat >&2 <<EOF
error: '$DOCKER' was not found on PATH.
  The GPU image targets (make image / shell / image-train) need Docker Engine with BuildKit
  (the docker-buildx plugin) on the GPU host. Install them, or run natively instead:
  make train RUN_ID=... (CPU .venv). See docs/containers.md.
EOF
  exit 127
fi

if [ "$need_buildkit" = 1 ] && ! "$DOCKER" buildx version >/dev/null 2>&1; then
  cat >&2 <<EOF
error: BuildKit is missing: '$DOCKER buildx version' failed.
  The image build uses BuildKit features (RUN --mount caches). Install the docker-buildx plugin
  (Debian/Ubuntu: apt-get install docker-buildx-plugin, or docker-buildx) and retry.
EOF
  exit 3
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  cat >&2 <<EOF
error: cannot reach the Docker engine ('$DOCKER info' failed).
  Start the daemon (systemctl start docker) or add yourself to the 'docker' group
  (sudo usermod -aG docker "\$USER", then log in again).
EOF
  exit 4
fi

if [ -n "$image" ] && ! "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
  cat >&2 <<EOF
error: image '$image' does not exist on this host.
  Build it first: make image VENDOR=rocm (MI300X) or make image VENDOR=cuda (NVIDIA).
EOF
  exit 5
fi
