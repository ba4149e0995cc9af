"""Where sparsetrace keeps what it fetches or derives (models, corpora, activation caches)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["cache_root", "log"]


def cache_root() -> Path:
    """``$SPARSETRACE_CACHE`` or ``~/.cache/sparsetrace``."""
    env = os.environ.get("SPARSETRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsetrace"


def log(msg: str) -> None:
    """One progress line on stderr, prefixed ``[sparsetrace]``."""
    print(f"[sparsetrace] {msg}", file=sys.stderr, flush=True)
