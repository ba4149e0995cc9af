"""Reading and writing other toolkits' dictionary formats (SAELens, sparsify)."""

from __future__ import annotations

from pathlib import Path


def detect(path: Path):
    """Return a loader for a foreign dictionary folder, or None."""
    return None
