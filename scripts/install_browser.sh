#!/usr/bin/env bash
# Install the headless browser used by the `browser`-marked tests (tests/test_browser.py):
#   * Debian's chromium package at /usr/bin/chromium (apt, needs root)
#   * the Playwright Python package (pip); Playwright's own browser download is NOT used.
# Idempotent, and always exits 0: when an install fails the browser tests skip with a reason.
set -u

PYTHON="${PYTHON:-python}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    PYTHON=python3
fi

log() { echo "[install_browser] $*"; }

if [ -x /usr/bin/chromium ]; then
    log "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium and fonts with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation >/dev/null; then
        log "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
    else
        log "WARNING: apt-get install chromium failed; browser tests will be skipped"
    fi
else
    log "WARNING: /usr/bin/chromium missing and not root (or no apt-get); browser tests will be skipped"
fi

if "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    log "playwright present: $("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p')"
else
    log "installing playwright with pip"
    if "$PYTHON" -m pip install -q playwright; then
        log "playwright installed"
    else
        log "WARNING: pip install playwright failed; browser tests will be skipped"
    fi
fi
exit 0
