#!/usr/bin/env bash
# Create bench/.venv-peers with the peer toolkits (SAELens, sparsify, circuit-tracer) pinned.
# torch is installed FIRST from the local CPU wheel so no peer can pull a different (GPU) torch.
# Idempotent: re-running only installs what is missing and rewrites versions.txt.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/bench/.venv-peers"
PY="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
PEERS=("sae-lens==6.54.12" "eai-sparsify==1.3.3" "circuit-tracer==0.5.0")

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip

# 1. torch first (local CPU wheel via the machine's find-links)
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
    "$VPY" -m pip install "$TORCH_PIN"
fi

# 2. peers, with torch held at the pin by a constraints file (a peer asking for another torch fails
#    loudly instead of downloading gigabytes)
CONS="$(mktemp)"
trap 'rm -f "$CONS"' EXIT
echo "$TORCH_PIN" > "$CONS"
"$VPY" -m pip install -c "$CONS" "${PEERS[@]}"

# 3. our own package (editable) so check scripts can import sparsetrace next to the peers
"$VPY" -m pip install -c "$CONS" --no-deps -e "$ROOT"

# 4. sanity: torch unchanged
"$VPY" -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"

{
    echo "# installed by bench/peers/setup_venv.sh on $(date -u +%Y-%m-%d)"
    echo "python $("$VPY" -c 'import platform; print(platform.python_version())')"
    "$VPY" -m pip freeze --exclude-editable | grep -iE '^(torch|sae-lens|sae_lens|eai-sparsify|eai_sparsify|circuit-tracer|circuit_tracer|transformers|transformer-lens|transformer_lens|safetensors|pydantic)==' | sort -f
} > "$HERE/versions.txt"
cat "$HERE/versions.txt"
