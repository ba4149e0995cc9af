"""Dialogue and informal text: the BSD ``fortune`` cookie files (quips, quotations, short dialogues, jokes).

From the Debian package ``fortunes`` (1:1.99.1-7.3; the fortune-mod data files, BSD licence). The files
under ``usr/share/games/fortunes/`` are split on ``%`` lines; ASCII-art files are skipped. Consecutive
fortunes are grouped into passages of at most ~2,000 characters, separated by blank lines.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import DataError
from ...util.hashing import sha256_file
from ..deb import apt_download, deb_version, extract_deb
from ..fetch import announce, cached_or_build
from ..text import group_paragraphs

__all__ = ["FORTUNES_DEB", "fortune_passages", "load_fortunes"]

FORTUNES_DEB = ("fortunes", "1:1.99.1-7.3")
VERSION = 1
SKIP_FILES = {"art", "ascii-art", "translate-me"}


def fortune_passages(files: dict[str, str]) -> list[str]:
    """Passages from fortune files ``{file name: text}`` (files without an extension, in name order)."""
    out: list[str] = []
    for name in sorted(files):
        if "." in name or name in SKIP_FILES:
            continue
        cookies = []
        for raw in re.split(r"^%[ \t]*$", files[name], flags=re.M):
            lines = [ln.rstrip() for ln in raw.strip("\n").split("\n")]
            text = "\n".join(ln.strip() if ln.lstrip().startswith("--") else ln for ln in lines).strip()
            if len(text) >= 20:
                cookies.append(text)
        out.extend(group_paragraphs(cookies))
    return out


def _build(tmp: Path) -> tuple[list[str], dict]:
    package, version = FORTUNES_DEB
    announce("fortunes", f"Debian package {package}={version} (0.9 MB)")
    deb = apt_download(package, tmp, version)
    root = tmp / "x"
    root.mkdir()
    extract_deb(deb, root)
    folder = next(root.rglob("games/fortunes"), None)
    if folder is None:
        raise DataError(f"Debian package '{deb.name}' has no usr/share/games/fortunes/")
    files = {p.name: p.read_bytes().decode("utf-8", errors="replace") for p in folder.iterdir() if p.is_file()}
    info = {
        "name": "fortunes",
        "source": f"Debian package {deb.name}",
        "package_version": deb_version(deb),
        "deb_sha256": sha256_file(deb),
        "license": "BSD (fortune-mod data files, Debian main)",
    }
    return fortune_passages(files), info


def load_fortunes() -> list[str]:
    return cached_or_build("fortunes", _build, version=VERSION)
