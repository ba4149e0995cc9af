#!/usr/bin/env bash
# Install the headless browser used by the `browser`-marked tests (tests/test_browser.py):
#   * Debian's chromium package at /usr/bin/chromium (apt, needs root)
#   * the Playwright Python package (pip); Playwright's own browser download is NOT used.
# Idempotent. Exits 0 when both are present afterwards, 1 (with one loud line per failure) otherwise.
# What a failure means for the tests is decided by tests/test_browser.py: under CI (CI=true) the
# browser tests FAIL; elsewhere they skip with a one-line reason.
set -u

PYTHON="${PYTHON:-python}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    PYTHON=python3
fi

log() { echo "[install_browser] $*"; }
failed=0
if [ "${CI:-}" = "true" ]; then
    consequence="the browser tests will FAIL (CI=true)"
else
    consequence="the browser tests will be skipped"
fi

if [ -x /usr/bin/chromium ]; then
    log "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium and fonts with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation >/dev/null; then
        log "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
    else
        log "ERROR: apt-get install chromium failed; $consequence" >&2
        failed=1
    fi
else
    log "ERROR: /usr/bin/chromium missing and not root (or no apt-get); $consequence" >&2
    failed=1
fi

if "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    log "playwright present: $("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p')"
else
    log "installing playwright with pip"
    if "$PYTHON" -m pip install -q playwright; then
        log "playwright installed"
    else
        log "ERROR: pip install playwright failed; $consequence" >&2
        failed=1
    fi
fi
exit "$failed"
