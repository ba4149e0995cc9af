"""Fiction: Jane Austen's six completed novels, from the Debian package ``r-cran-janeaustenr``.

Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma, Northanger Abbey and Persuasion, about
4.3 MB of text (~1M tokens). The package (version 1.0.0-1, a 1.6 MB ``.deb``; the CRAN package
*janeaustenr* by Julia Silge) is MIT; the novels (Project Gutenberg transcriptions, 1811-1818) are in the
public domain. Its R lazy-load database (``data/Rdata.rdb``/``.rdx``) is decoded by :mod:`..rds`; no R
installation is needed.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

from ...errors import DataError
from ...util.hashing import sha256_file
from ..deb import apt_download, deb_version, extract_deb
from ..fetch import announce, cached_or_build
from ..rds import read_lazyload_db
from ..text import group_paragraphs

__all__ = ["AUSTEN_BOOKS", "AUSTEN_DEB", "clean_austen", "load_austen"]

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_VERSION = "1.0.0-1"
AUSTEN_BOOKS = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]


def clean_austen(lines: list[str]) -> list[str]:
    paragraphs: list[str] = []
    cur: list[str] = []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            cur.append(line)
            continue
        if cur:
            para = re.sub(r" {2,}", " ", " ".join(cur))
            cur = []
            if re.fullmatch(r"(CHAPTER|Chapter|VOLUME|Volume)\b[\w .,]*", para) or (
                para.isupper() and len(para) < 80
            ):
                continue  # headings and titles
            if re.fullmatch(r"(by Jane Austen|\(\d{4}\))", para):
                continue
            paragraphs.append(para)
    return paragraphs


def _build_austen(tmp: Path) -> tuple[list[str], dict]:
    announce("austen", f"Debian package {AUSTEN_DEB}={AUSTEN_VERSION} (1.6 MB)")
    deb = apt_download(AUSTEN_DEB, tmp, AUSTEN_VERSION)
    root = tmp / "x"
    root.mkdir()
    extract_deb(deb, root)
    dbs = list(root.rglob("janeaustenr/data/Rdata.rdb"))
    if not dbs:
        raise DataError(f"Debian package '{deb.name}' has no janeaustenr/data/Rdata.rdb")
    try:
        objects = read_lazyload_db(dbs[0].with_suffix(".rdx").read_bytes(), dbs[0].read_bytes())
    except (ValueError, KeyError, struct.error, zlib.error, OSError) as exc:
        raise DataError(f"could not decode the R data in '{deb.name}': {exc}") from None
    texts: list[str] = []
    books = []
    for key, title in AUSTEN_BOOKS:
        lines = objects.get(key)
        if not isinstance(lines, list):
            continue
        texts.extend(group_paragraphs(clean_austen([x for x in lines if isinstance(x, str)])))
        books.append(title)
    info = {
        "name": "austen",
        "source": f"Debian package {deb.name} (CRAN janeaustenr by Julia Silge)",
        "package_version": deb_version(deb),
        "deb_sha256": sha256_file(deb),
        "books": books,
        "license": "novels: public domain; janeaustenr package: MIT",
    }
    return texts, info


def load_austen() -> list[str]:
    """Jane Austen's six novels as passages (downloaded once from Debian, then cached)."""
    return cached_or_build("austen", _build_austen)
