"""Technical documentation and source code from the pinned PyPI sdist ``docutils==0.21.2``.

* ``docutils``: the reStructuredText documentation under ``docs/`` (user guides, reference, API and
  developer notes), split into passages of whole paragraphs.
* ``pycode``: the Python source of the ``docutils`` package (and ``tools/``), cut into chunks at
  top-level statements (a ``def``/``class``/assignment after a blank line), at most ~3,000 characters.

Licence: docutils is in the public domain except a few files under BSD-2-Clause or ZPL-2.1 (see the sdist's
``COPYING.txt``; its one GPL file, an Emacs mode, is not used here).
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from ...errors import DataError
from ...util.hashing import sha256_file
from ..fetch import announce, cached_or_build, pip_download
from ..text import group_paragraphs, split_documents

__all__ = ["DOCUTILS_SDIST", "code_chunks", "load_docutils_docs", "load_pycode"]

DOCUTILS_SDIST = "docutils==0.21.2"
VERSION = 2
CODE_CHARS = 3000


def code_chunks(source: str, max_chars: int = CODE_CHARS) -> list[str]:
    """Cut a Python file at top-level statements that follow a blank line; group pieces up to ``max_chars``."""
    pieces: list[str] = []
    cur: list[str] = []
    prev_blank = False
    for line in source.replace("\t", "    ").split("\n"):
        top = bool(line) and not line[0].isspace() and not line.startswith((")", "]", "}", "#"))
        if top and prev_blank and cur:
            pieces.append("\n".join(cur).strip("\n"))
            cur = []
        cur.append(line.rstrip())
        prev_blank = not line.strip()
    if cur:
        pieces.append("\n".join(cur).strip("\n"))
    return group_paragraphs([p for p in pieces if p.strip()], max_chars=max_chars)


def _members(tmp: Path) -> tuple[Path, dict[str, str]]:
    sdist = pip_download(DOCUTILS_SDIST, tmp, sdist=True, pattern="docutils-*.tar.gz")
    files: dict[str, str] = {}
    with tarfile.open(sdist) as tf:
        for m in tf.getmembers():
            p = PurePosixPath(m.name)
            if not m.isfile() or p.is_absolute() or ".." in p.parts or len(p.parts) < 3:
                continue
            rel = "/".join(p.parts[1:])
            if (rel.startswith("docs/") and p.suffix == ".txt") or (
                rel.startswith(("docutils/", "tools/")) and p.suffix == ".py"
            ):
                f = tf.extractfile(m)
                if f is not None:
                    files[rel] = f.read().decode("utf-8", errors="replace")
    return sdist, files


def _info(name: str, sdist: Path, n_files: int) -> dict:
    return {
        "name": name,
        "source": f"PyPI sdist {sdist.name}",
        "package_version": DOCUTILS_SDIST.split("==")[1],
        "package_sha256": sha256_file(sdist),
        "n_files": n_files,
        "license": "public domain; a few files BSD-2-Clause or ZPL-2.1 (docutils COPYING.txt)",
    }


def _build_docs(tmp: Path) -> tuple[list[str], dict]:
    announce("docutils", f"PyPI source package {DOCUTILS_SDIST} (2.2 MB)")
    sdist, files = _members(tmp)
    docs = {k: v for k, v in files.items() if k.startswith("docs/")}
    if not docs:
        raise DataError(f"'{sdist.name}' has no docs/*.txt")
    texts = [t for k in sorted(docs) for t in group_paragraphs(split_documents(docs[k]))]
    return texts, _info("docutils", sdist, len(docs))


def _build_code(tmp: Path) -> tuple[list[str], dict]:
    announce("pycode", f"PyPI source package {DOCUTILS_SDIST} (2.2 MB)")
    sdist, files = _members(tmp)
    code = {k: v for k, v in files.items() if k.endswith(".py")}
    if not code:
        raise DataError(f"'{sdist.name}' has no Python files")
    texts = [t for k in sorted(code) for t in code_chunks(code[k])]
    return texts, _info("pycode", sdist, len(code))


def load_docutils_docs() -> list[str]:
    return cached_or_build("docutils", _build_docs, version=VERSION)


def load_pycode() -> list[str]:
    return cached_or_build("pycode", _build_code, version=VERSION)
