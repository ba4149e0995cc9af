"""Plain-text helpers shared by the corpus sources: reading files, splitting and grouping passages."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError

__all__ = [
    "PASSAGE_CHARS",
    "check_encoding",
    "clean_gutenberg",
    "group_paragraphs",
    "read_text_file",
    "split_documents",
]

PASSAGE_CHARS = 2000


def check_encoding(name: str) -> str:
    """The canonical codec name for ``name``; DataError when Python knows no such text encoding."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"--encoding {name!r} is empty; expected an encoding name such as utf-8, latin-1, cp1252")
    try:
        info = codecs.lookup(name.strip())
    except LookupError:
        raise DataError(
            f"--encoding '{name}' is not a known text encoding; expected a name such as utf-8, latin-1, "
            "cp1252, utf-16"
        ) from None
    if not getattr(info, "_is_text_encoding", True):
        raise DataError(f"--encoding '{name}' is not a text encoding; expected e.g. utf-8, latin-1, cp1252")
    return info.name


def read_text_file(path: str | Path, encoding: str | None = None) -> str:
    """Read a text file (UTF-8 unless ``encoding`` names another codec).

    Bytes that do not decode raise DataError naming the file, the byte offset and the encoding tried.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"corpus file '{path}' does not exist") from None
    except IsADirectoryError:
        raise DataError(f"corpus path '{path}' is a folder; expected a .txt or .jsonl file") from None
    except OSError as exc:
        raise DataError(f"cannot read corpus file '{path}': {exc.strerror or exc}") from None
    codec = "utf-8" if encoding is None else check_encoding(encoding)
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        if encoding is None:
            raise DataError(
                f"corpus file '{path}' is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                "cannot be decoded; expected UTF-8 text (or name its encoding with --encoding, e.g. latin-1)"
            ) from None
        raise DataError(
            f"corpus file '{path}' is not valid {codec}: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"cannot be decoded; expected text in the --encoding given ({encoding})"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


_BLANK = re.compile(r"\n[ \t\f\v]*\n+")


def split_documents(text: str) -> list[str]:
    """Split on blank lines; text without blank lines stays one document. Empty pieces are dropped."""
    return [d.strip() for d in _BLANK.split(text) if d.strip()]


def group_paragraphs(paragraphs: Iterable[str], max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Group consecutive paragraphs into passages of at most ``max_chars`` (a longer paragraph stays whole)."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        if cur and size + len(p) + 2 > max_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        out.append("\n\n".join(cur))
    return out


def clean_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence footer, when present."""
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    if start:
        text = text[start.end() :]
    end = re.search(r"(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text)
    if end:
        text = text[: end.start()]
    return text
