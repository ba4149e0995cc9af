"""User text: .txt files (documents separated by blank lines), .jsonl files (a ``"text"`` field per line),
folders and globs of them, and comma-separated lists of any of these."""

from __future__ import annotations

import glob as globlib
import json
import os
from pathlib import Path

from ...errors import DataError
from ..text import read_text_file, split_documents

__all__ = ["SUFFIXES", "is_path_like", "load_file", "load_jsonl", "load_path"]

SUFFIXES = (".txt", ".jsonl", ".text", ".md")


def load_jsonl(path: Path, encoding: str | None = None) -> list[str]:
    text = read_text_file(path, encoding)
    out: list[str] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(
                f"corpus file '{path}' line {lineno} is not valid JSON; expected one object per line"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"corpus file '{path}' line {lineno} has no string field \"text\"")
        if obj["text"].strip():
            out.append(obj["text"])
    return out


def load_file(path: Path, encoding: str | None = None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path, encoding)
    if suffix in (".txt", ".text", ".md"):
        return split_documents(read_text_file(path, encoding))
    raise DataError(f"corpus file '{path}' has an unsupported extension '{suffix}'; expected .txt or .jsonl")


def is_path_like(spec: str) -> bool:
    path = Path(spec).expanduser()
    return (
        path.exists()
        or any(ch in spec for ch in "*?[")
        or "/" in spec
        or os.sep in spec
        or path.suffix.lower() in SUFFIXES
    )


def load_path(spec: str, encoding: str | None = None) -> list[str]:
    """Documents of a file, a folder (its .txt/.jsonl files, recursively) or a glob."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"corpus folder '{spec}' has no .txt or .jsonl files")
        return [t for f in files for t in load_file(f, encoding)]
    if path.is_file():
        return load_file(path, encoding)
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"corpus glob '{spec}' matched no files")
        return [t for f in files for t in load_file(f, encoding)]
    raise DataError(f"corpus file '{spec}' does not exist")
