"""Expository prose: computing dictionaries in dictd format, from Debian.

* ``jargon``: the Jargon File 4.4.7 (hacker culture and usage), Debian package ``dict-jargon``; public domain.
* ``foldoc``: the Free On-line Dictionary of Computing, Debian package ``dict-foldoc``; GNU FDL 1.1 or later.

A dictd dictionary is an index (``NAME.index``: headword, base-64 offset and length, one per line) and a
gzip (dictzip) body. Each entry becomes one passage: the headword, then its definition with the hard line
wraps joined, cross-reference braces removed and FOLDOC's trailing date stamps dropped.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from ...errors import DataError
from ...util.hashing import sha256_file
from ..deb import apt_download, deb_version, extract_deb
from ..fetch import announce, cached_or_build
from ..text import split_documents

__all__ = ["DICTS", "dictd_entries", "load_foldoc", "load_jargon"]

# name -> (Debian package, pinned version, licence)
DICTS = {
    "jargon": ("dict-jargon", "4.4.7-3.1", "public domain (Jargon File 4.4.7); Debian packaging GPL-2+"),
    "foldoc": ("dict-foldoc", "20230119-1", "GNU Free Documentation License 1.1 or later (FOLDOC)"),
}
VERSION = 1
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _clean_entry(raw: str) -> str | None:
    head, _, body = raw.strip().partition("\n")
    paragraphs = []
    for para in split_documents(body):
        text = " ".join(para.split())
        if re.fullmatch(r"\(\d{4}-\d{2}-\d{2}\)", text):
            continue
        text = re.sub(r"\{([^{}]*?)(?: \([^{}]*\))?\}", r"\1", text)  # {term (target)} -> term
        paragraphs.append(text)
    if not paragraphs or sum(len(p) for p in paragraphs) < 40:
        return None
    return head.strip() + "\n\n" + "\n\n".join(paragraphs)


def dictd_entries(index: str, body: bytes) -> list[str]:
    """Entries of a dictd dictionary (index text, uncompressed body), in index order, one passage each."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        try:
            span = (_b64(parts[1]), _b64(parts[2]))
        except ValueError:
            continue
        if span in seen:
            continue
        seen.add(span)
        entry = _clean_entry(body[span[0] : span[0] + span[1]].decode("utf-8", errors="replace"))
        if entry:
            out.append(entry)
    return out


def _builder(name: str):
    package, version, licence = DICTS[name]

    def build(tmp: Path) -> tuple[list[str], dict]:
        announce(name, f"Debian package {package}={version}")
        deb = apt_download(package, tmp, version)
        root = tmp / "x"
        root.mkdir()
        extract_deb(deb, root)
        index = next(root.rglob(f"{name}.index"), None)
        body = next(root.rglob(f"{name}.dict.dz"), None) or next(root.rglob(f"{name}.dict"), None)
        if index is None or body is None:
            raise DataError(f"Debian package '{deb.name}' has no {name}.index / {name}.dict.dz")
        raw = body.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        texts = dictd_entries(index.read_text(encoding="utf-8", errors="replace"), raw)
        info = {
            "name": name,
            "source": f"Debian package {deb.name}",
            "package_version": deb_version(deb),
            "deb_sha256": sha256_file(deb),
            "license": licence,
        }
        return texts, info

    return build


def load_jargon() -> list[str]:
    return cached_or_build("jargon", _builder("jargon"), version=VERSION)


def load_foldoc() -> list[str]:
    return cached_or_build("foldoc", _builder("foldoc"), version=VERSION)
