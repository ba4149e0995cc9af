#!/usr/bin/env bash
# Install what is missing, then run the test suite. Used by README and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 SPARSETRACE_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
# torch first, pinned, so nothing pulls a CUDA build
$PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
# A failed browser install does not stop the suite here: under CI (CI=true) tests/test_browser.py then
# FAILS (a missing browser is never a silent pass); elsewhere those tests skip with a one-line reason.
if ! PYTHON=$PY bash scripts/install_browser.sh; then
  if [ "${CI:-}" = "true" ]; then
    echo "[test.sh] ERROR: browser install failed under CI=true: the browser tests will fail" >&2
  else
    echo "[test.sh] WARNING: browser install failed: the browser tests will be skipped (reason above)" >&2
  fi
fi
set +e
$PY -m pytest -q -rs -p no:cacheprovider "$@"
rc=$?
set -e
# exit code 5 = no tests collected: treat as failure so CI never passes on nothing
exit $rc
