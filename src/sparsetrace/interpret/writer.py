"""Writing dashboards: ``features/L{layer:02d}/f{feature}.json`` and a merged ``index.json``."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_dashboards"]


def write_dashboards(run_dir: str | Path, layer: int, dashboards: dict[int, dict]) -> Path:
    """Write ``features/L{layer:02d}/f{feature}.json`` for each dashboard plus ``index.json``.

    An existing index is merged: entries of features not in ``dashboards`` are kept.
    """
    from ..dictionary.io import atomic_write_text

    folder = Path(run_dir) / "features" / f"L{layer:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[int, dict] = {}
    idx_path = folder / "index.json"
    if idx_path.exists():
        try:
            for e in json.loads(idx_path.read_text(encoding="utf-8")):
                if isinstance(e, dict) and isinstance(e.get("feature"), int):
                    index[e["feature"]] = e
        except (ValueError, TypeError):
            index = {}
    for f, dash in sorted(dashboards.items()):
        atomic_write_text(folder / f"f{int(f)}.json", json.dumps(dash, ensure_ascii=False, allow_nan=False))
        index[int(f)] = {
            "feature": int(f),
            "label": dash.get("label"),
            "verdict": dash.get("verdict"),
            "density": dash.get("density"),
            "max_act": dash.get("max_act"),
        }
    atomic_write_text(idx_path, json.dumps([index[f] for f in sorted(index)], indent=0, ensure_ascii=False))
    return folder
