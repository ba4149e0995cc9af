"""Cache folders checked by a sha256 manifest (``sha256.json``: ``{"files": {relative path: sha256}}``).

A folder is valid when its manifest lists at least the required files and every listed file exists with
the recorded digest. Folders are built in a temporary sibling and swapped in with ``os.replace``, so a
reader never sees half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .hashing import sha256_file

__all__ = ["MANIFEST_NAME", "manifest_is_valid", "read_manifest", "replace_folder", "write_manifest"]

MANIFEST_NAME = "sha256.json"


def write_manifest(folder: Path, extra: dict | None = None, *, name: str = MANIFEST_NAME) -> dict:
    """Make every file world-readable, then write the manifest of every file under ``folder``."""
    folder = Path(folder)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o644)  # temp files are created private; the cache is meant to be shared
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != name
    }
    meta = dict(extra or {})
    meta["files"] = files
    (folder / name).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta


def read_manifest(folder: Path, *, name: str = MANIFEST_NAME) -> dict | None:
    """The manifest's JSON, or None when missing or unreadable."""
    try:
        meta = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("files"), dict) else None


def manifest_is_valid(folder: Path, required: tuple[str, ...] = (), *, name: str = MANIFEST_NAME) -> bool:
    """True when the manifest exists, lists ``required`` and every listed file matches its sha256."""
    folder = Path(folder)
    meta = read_manifest(folder, name=name)
    if meta is None:
        return False
    files = meta["files"]
    if not files or any(r not in files for r in required):
        return False
    for rel, digest in files.items():
        p = folder / rel
        try:
            if not p.is_file() or sha256_file(p) != digest:
                return False
        except OSError:
            return False
    return True


def replace_folder(src: Path, final: Path) -> None:
    """Swap a freshly built folder ``src`` in as ``final`` (an old ``final`` is removed first)."""
    final = Path(final)
    if final.exists():
        stale = final.with_name(f".stale-{os.getpid()}-{final.name}")
        try:
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    os.replace(src, final)
