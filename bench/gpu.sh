#!/usr/bin/env bash
# One command for a lent GPU: training steps, bf16 matmul ceilings and attribution; ONE results JSON.
#
#   bash bench/gpu.sh                        # CUDA (bf16 autocast), SmolLM2-135M shapes, random weights
#   bash bench/gpu.sh --device cpu --tiny    # smoke test on CPU, tiny shapes (about a minute)
#
# Writes $OUT/gpu_results.json when $OUT is set (the device tool's output folder), else
# bench/out/gpu-<device>-<time>.json. The last line printed is the headline. Options: see
# `python3 bench/gpu_suite.py --help`. Wheels in .whl/ (see bench/README.md) are installed to
# /tmp/site first, for packages the machine lacks; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || { echo "error: $PY not found; set PYTHON to a python with torch" >&2; exit 2; }
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_suite.py "$@"
