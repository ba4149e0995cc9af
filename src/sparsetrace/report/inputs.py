"""What a report was built from: the sha256 of every input file, and whether dependent artifacts still
match what they were computed from.

* ``verify.json`` records ``circuit_sha256``, the sha256 of the ``circuit.json`` bytes it verified. When
  the ``circuit.json`` beside it has other bytes (or is gone) the verification is **stale**: it describes
  another circuit, and the report says so instead of showing its numbers as current.
* A dashboard (``features/L??/f*.json``, or the layer's ``meta.json``) records ``dictionary_sha256``, the
  sha256 of the ``weights.safetensors`` it was computed from. When no dictionary of that layer in the run
  has those bytes, the dashboard is **stale**.

An artifact that records no hash is ``unrecorded``: the report shows it, with a note that it cannot tell
what it was computed from. States: ``current``, ``stale``, ``unrecorded`` (and ``unchecked`` for a
dashboard whose run holds no dictionary weights at its layer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..util.hashing import sha256_file

__all__ = ["dashboard_status", "dictionary_hashes", "input_hashes", "verify_status"]

_DICT_DIR = re.compile(r"^L(\d+)_([A-Za-z0-9_]+)$")
_RUN_FILES = ("run.json", "eval.json", "metrics.json", "align.json")
_DICT_FILES = ("config.json", "weights.safetensors", "metrics.json", "train_log.jsonl")
_CIRCUIT_FILES = ("graph.json", "circuit.json", "verify.json")


def _sha(path: Path) -> str | None:
    try:
        return sha256_file(path) if path.is_file() else None
    except OSError:
        return None


def dictionary_hashes(run_dir: Path) -> dict[int, dict[str, str]]:
    """{layer: {dictionary folder name: sha256 of its weights.safetensors}} for the run's dictionaries."""
    out: dict[int, dict[str, str]] = {}
    for sub in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()):
        m = _DICT_DIR.match(sub.name)
        if m:
            digest = _sha(sub / "weights.safetensors")
            if digest:
                out.setdefault(int(m.group(1)), {})[sub.name] = digest
    return out


def input_hashes(run_dir: Path) -> dict[str, str]:
    """{path relative to the run folder: sha256} of every file the report reads from ``run_dir``."""
    run_dir = Path(run_dir)
    paths: list[Path] = [run_dir / n for n in _RUN_FILES]
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if _DICT_DIR.match(sub.name):
            paths += [sub / n for n in _DICT_FILES]
    cdir = run_dir / "circuits"
    if cdir.is_dir():
        for sub in sorted(p for p in cdir.iterdir() if p.is_dir()):
            paths += [sub / n for n in _CIRCUIT_FILES]
    fdir = run_dir / "features"
    if fdir.is_dir():
        for sub in sorted(p for p in fdir.iterdir() if p.is_dir()):
            paths += sorted(p for p in sub.iterdir() if p.suffix == ".json")
    out: dict[str, str] = {}
    for p in paths:
        digest = _sha(p)
        if digest:
            out[p.relative_to(run_dir).as_posix()] = digest
    return out


def _short(digest: Any) -> str:
    return str(digest)[:12] if digest else "?"


def verify_status(circuit_dir: Path, verify: dict | None) -> dict | None:
    """Whether ``verify.json`` verified the ``circuit.json`` beside it (see the module docstring)."""
    if verify is None:
        return None
    recorded = verify.get("circuit_sha256")
    actual = _sha(Path(circuit_dir) / "circuit.json")
    if not isinstance(recorded, str) or not recorded:
        return {
            "state": "unrecorded",
            "reason": "verify.json does not record which circuit.json it verified (no circuit_sha256)",
            "recorded": None,
            "actual": actual,
        }
    if actual is None:
        return {
            "state": "stale",
            "reason": f"verify.json verified circuit.json {_short(recorded)}…, but there is no circuit.json "
            "beside it any more",
            "recorded": recorded,
            "actual": None,
        }
    if actual != recorded:
        return {
            "state": "stale",
            "reason": f"verify.json verified circuit.json {_short(recorded)}…, but the circuit.json beside it is "
            f"{_short(actual)}…: the circuit changed after it was verified; run `sparsetrace verify` again",
            "recorded": recorded,
            "actual": actual,
        }
    return {"state": "current", "reason": "verified this circuit.json", "recorded": recorded, "actual": actual}


def dashboard_status(recorded: Any, layer_hashes: dict[str, str] | None) -> dict:
    """Whether a dashboard recording ``dictionary_sha256 = recorded`` matches a dictionary of its layer."""
    if not isinstance(recorded, str) or not recorded:
        return {"state": "unrecorded", "reason": "the dashboard does not record its dictionary (no dictionary_sha256)"}
    if not layer_hashes:
        return {"state": "unchecked", "reason": "the run holds no dictionary weights for this layer to compare with"}
    for name, digest in layer_hashes.items():
        if digest == recorded:
            return {"state": "current", "reason": f"computed from {name}/weights.safetensors", "dictionary": name}
    have = ", ".join(f"{n} {_short(d)}…" for n, d in layer_hashes.items())
    return {
        "state": "stale",
        "reason": f"computed from dictionary weights {_short(recorded)}…, but the run's dictionary is {have}: "
        "the dictionary changed after the dashboard was written; run `sparsetrace explain` again",
    }
