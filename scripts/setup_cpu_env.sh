#!/usr/bin/env bash
# Creates the CPU environment in .venv (idempotent) and applies the CPU-only fix-ups.
# The fix-ups are only for CPU machines: the GPU container installs its own stack (docker/).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.requirements.sha256"
want=$(cat requirements/cpu.txt scripts/setup_cpu_env.sh scripts/cpu_torchvision_fix.py | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "setup: installing requirements/cpu.txt into $VENV (first time: a few minutes, ~3 GB)"
# pip's warnings about this machine's local wheel index are noise; real errors still fail the script.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements/cpu.txt 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true

# CPU fix-up 1: torchaudio/torchcodec from PyPI are CUDA-linked; transformers imports torchaudio
# when present and every processor import then fails; vLLM fails to start on torchcodec.
# triton (from xgrammar) and av (from qwen-vl-utils) are unused on CPU: ~1.1 GB saved.
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec triton av 2>&1 \
  | grep -v "is ignored\|not installed" || true

# CPU fix-up 2: PyPI's torchvision cannot load its CUDA-linked native library next to torch's CPU
# build; a lazy import hook declares the two missing operator schemas in every process.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/cpu_torchvision_fix.py "$site/_grpo_cpu_torchvision_fix.py"
echo "import _grpo_cpu_torchvision_fix" > "$site/_grpo_cpu_torchvision_fix.pth"
"$VENV/bin/python" -c "import torchvision, transformers.models.qwen2_vl, vllm, trl, peft, dvc" \
  || { echo "setup: the environment does not import; see the error above" >&2; exit 1; }

echo "$want" > "$STAMP"
echo "setup: done ($VENV)"
