#!/usr/bin/env bash
# Create bench/.venv-declt with decode-clt (PyPI 0.0.1, the CLT trainer from utahnlp/crosslayer-coding),
# kept apart from our package's dependencies and from bench/.venv-peers.
#
# decode-clt 0.0.1 asks for torch>=2.0, torchvision>=0.15.1, torchaudio>=2.0.1, nnsight>=0.1, transformers,
# datasets, wandb, h5py, zstandard, requests. torch is installed FIRST from the machine's local CPU wheel
# (torch==2.13.0+cpu; the PyTorch CPU index is not reachable from here, and PyPI's default Linux torch is a
# CUDA build of gigabytes), then everything else under a constraints file holding torch at that pin, so a
# dependency that wanted another torch would fail loudly instead of downloading one.
# Idempotent: re-running only installs what is missing and rewrites versions_declt.txt.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/bench/.venv-declt"
PY="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
PEER="decode-clt==0.0.1"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip

# 1. torch first (local CPU wheel via the machine's find-links)
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
    "$VPY" -m pip install "$TORCH_PIN"
fi

# 2. decode-clt and its declared dependencies, torch held at the pin
CONS="$(mktemp)"
trap 'rm -f "$CONS"' EXIT
echo "$TORCH_PIN" > "$CONS"
"$VPY" -m pip install -c "$CONS" "$PEER"

# 3. sanity: torch unchanged, and the trainer's modules import
"$VPY" -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
"$VPY" -c "import clt.models.clt, clt.training.trainer, clt.training.losses, clt.config"

{
    echo "# installed by bench/peers/setup_declt_venv.sh on $(date -u +%Y-%m-%d)"
    echo "python $("$VPY" -c 'import platform; print(platform.python_version())')"
    "$VPY" -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|decode-clt|decode_clt|nnsight|transformers|datasets|wandb|h5py|numpy)==' | sort -f
} > "$HERE/versions_declt.txt"
cat "$HERE/versions_declt.txt"
