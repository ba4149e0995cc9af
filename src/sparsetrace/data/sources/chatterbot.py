"""Dialogue: the English conversations of the ChatterBot dialog corpus.

From the PyPI wheel ``chatterbot-corpus==1.2.0`` (BSD-3-Clause), ``chatterbot_corpus/data/english/*.yml``:
short question-and-answer exchanges on everyday topics. Each conversation becomes a passage of alternating
``A:`` / ``B:`` turns. The YAML is read by a small parser for this file's one shape (a ``conversations:``
list of lists of strings), so no YAML package is needed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ...errors import DataError
from ...util.hashing import sha256_file
from ..fetch import announce, cached_or_build, pip_download
from ..text import group_paragraphs

__all__ = ["CHATTERBOT_WHEEL", "chatterbot_conversations", "load_chatterbot"]

CHATTERBOT_WHEEL = "chatterbot-corpus==1.2.0"
VERSION = 1


def _scalar(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1].replace("''", "'") if s[0] == "'" else s[1:-1].replace('\\"', '"')
    return s


def chatterbot_conversations(yaml_text: str) -> list[str]:
    """Conversations of one corpus file, each as ``A: ...`` / ``B: ...`` lines."""
    convs: list[list[str]] = []
    in_list = False
    for line in yaml_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith((" ", "-")):
            in_list = line.strip() == "conversations:"
            continue
        if not in_list:
            continue
        body = line.lstrip()
        if body.startswith("- - "):
            convs.append([_scalar(body[4:])])
        elif body.startswith("- ") and convs:
            convs[-1].append(_scalar(body[2:]))
        elif convs and convs[-1]:  # a wrapped continuation line
            convs[-1][-1] += " " + _scalar(body)
    out = []
    for turns in convs:
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            out.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
    return out


def _build(tmp: Path) -> tuple[list[str], dict]:
    announce("chatterbot", f"PyPI wheel {CHATTERBOT_WHEEL} (0.1 MB)")
    wheel = pip_download(CHATTERBOT_WHEEL, tmp, sdist=False, pattern="chatterbot_corpus-*.whl")
    convs: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        for n in sorted(zf.namelist()):
            if "/data/english/" in n and n.endswith(".yml"):
                convs.extend(chatterbot_conversations(zf.read(n).decode("utf-8", errors="replace")))
    if not convs:
        raise DataError(f"'{wheel.name}' has no English conversations")
    info = {
        "name": "chatterbot",
        "source": f"PyPI wheel {wheel.name}",
        "package_version": CHATTERBOT_WHEEL.split("==")[1],
        "package_sha256": sha256_file(wheel),
        "license": "BSD-3-Clause (chatterbot-corpus)",
    }
    return group_paragraphs(convs, max_chars=1000), info


def load_chatterbot() -> list[str]:
    return cached_or_build("chatterbot", _build, version=VERSION)
