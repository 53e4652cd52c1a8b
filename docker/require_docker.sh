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

# BuildKit: the buildx plugin, or a docker CLI older than 23.0, whose `DOCKER_BUILDKIT=1 docker
# build` uses the engine's built-in BuildKit (Debian bookworm's docker.io 20.10 is one).
has_buildkit() {
  local version
  "$1" buildx version >/dev/null 2>&1 && return 0
  version=$("$1" version --format '{{.Client.Version}}' 2>/dev/null || true)
  [[ "$version" =~ ^([0-9]+)\. ]] && [ "$((10#${BASH_REMATCH[1]}))" -lt 23 ]
}

if [ "$need_buildkit" = 1 ] && ! has_buildkit "$DOCKER"; then
  # Another docker on PATH that can build (e.g. /usr/bin/docker from docker.io next to a newer one).
  other=""
  current=$(readlink -f "$(command -v "$DOCKER")")
  while IFS= read -r candidate; do
    if [ "$(readlink -f "$candidate")" != "$current" ] && has_buildkit "$candidate"; then
      other=$candidate
      break
    fi
  done < <(type -ap docker)
  cat >&2 <<EOF
error: BuildKit is missing: '$DOCKER buildx version' failed and '$DOCKER' is docker 23 or newer.
  The image build uses BuildKit features (RUN --mount caches and secrets). Install the
  docker-buildx plugin (Debian/Ubuntu: apt-get install docker-buildx-plugin, or docker-buildx),
  or use a docker CLI older than 23.0, which builds with the engine's own BuildKit.
EOF
  if [ -n "$other" ]; then
    echo "  $other can build here: make image DOCKER=$other (or export DOCKER=$other)" >&2
  fi
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
