# shellcheck shell=bash
# Sourced by the base-image build scripts (build_vllm_base.sh, build_cpu_base.sh, make_debian_base.sh):
# `die` names the calling script; `run` prints each command and runs it unless dry_run=1.
die() { echo "$(basename "$0" .sh): error: $*" >&2; exit 2; }

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "${dry_run:-0}" = 1 ] || "$@"
}
