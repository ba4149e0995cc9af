"""Fiction: *Botchan* by Natsume Soseki, English translation by Yasotaro Morri (1919).

A Project Gutenberg text (EBook #8868, public domain), 279 KB (~50k words). It ships as
``test/botchan.txt`` inside the source distribution of the PyPI package ``sentencepiece==0.2.3``
(Apache-2.0, a 3.75 MB ``.tar.gz``); the Project Gutenberg header and licence footer are removed.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path, PurePosixPath

from ...errors import DataError
from ...util.hashing import sha256_bytes, sha256_file
from ..fetch import announce, cached_or_build, pip_download
from ..text import clean_gutenberg, group_paragraphs

__all__ = ["BOTCHAN_MEMBER", "BOTCHAN_SDIST", "load_botchan"]

BOTCHAN_SDIST = "sentencepiece==0.2.3"
BOTCHAN_MEMBER = "test/botchan.txt"


def _build_botchan(tmp: Path) -> tuple[list[str], dict]:
    announce("botchan", f"PyPI source package {BOTCHAN_SDIST} (3.7 MB)")
    sdists = [pip_download(BOTCHAN_SDIST, tmp, sdist=True, pattern="sentencepiece-*.tar.gz")]
    raw = None
    with tarfile.open(sdists[0]) as tf:
        for m in tf.getmembers():
            p = PurePosixPath(m.name)
            if p.is_absolute() or ".." in p.parts or not m.isfile():
                continue
            if len(p.parts) == 3 and "/".join(p.parts[1:]) == BOTCHAN_MEMBER:
                f = tf.extractfile(m)
                raw = f.read() if f else None
                break
    if raw is None:
        raise DataError(f"'{sdists[0].name}' has no {BOTCHAN_MEMBER}")
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff").replace("\r\n", "\n")
    body = clean_gutenberg(text)
    body = body[: body.index("--(THE END)--")] if "--(THE END)--" in body else body
    body = re.sub(r"\[[A-Z]\]", "", re.sub(r"^Produced by .*$", "", body, flags=re.M))
    # This copy has no blank lines; a paragraph ends at a line that is clearly shorter than the text width.
    paragraphs: list[str] = []
    cur: list[str] = []
    for line in body.split("\n"):
        s = line.strip()
        if not s:
            continue
        cur.append(s)
        if len(line.rstrip()) < 60 or s.endswith(('."', '!"', '?"')) and len(line) < 66:
            paragraphs.append(" ".join(cur))
            cur = []
    if cur:
        paragraphs.append(" ".join(cur))
    paragraphs = [
        re.sub(r" {2,}", " ", p)
        for p in paragraphs
        if not (p.isupper() and len(p) < 80) and not p.startswith("[Footnote")
    ]
    texts = group_paragraphs(paragraphs)
    info = {
        "name": "botchan",
        "source": f"PyPI sdist {sdists[0].name}, member {BOTCHAN_MEMBER}",
        "package_version": BOTCHAN_SDIST.split("==")[1],
        "sdist_sha256": sha256_file(sdists[0]),
        "raw_sha256": sha256_bytes(raw),
        "license": "text: public domain (Project Gutenberg EBook #8868); sentencepiece package: Apache-2.0",
    }
    return texts, info


def load_botchan() -> list[str]:
    """Botchan (English translation) as passages (downloaded once from PyPI, then cached)."""
    return cached_or_build("botchan", _build_botchan)
