"""Text corpora: the ``--corpus`` dispatcher.

``--corpus`` values (``load_corpus`` / ``load_texts``)
------------------------------------------------------
* ``default``: the training mix of every named source except the held-out one (see :mod:`.mix` and
  ``docs/formats.md``): fiction, speeches, expository prose, technical documentation, source code and
  dialogue, deduplicated and interleaved at the document level. A source that cannot be fetched here (for
  example a Debian package on a machine without apt) is left out with one line saying so.
* ``default-NAME[-NAME...]``: the same mix without the named sources, e.g. ``default-sotu``.
* ``NAME``: one named source alone (``austen``, ``botchan``, ``sotu``, ``jargon``, ``foldoc``,
  ``docutils``, ``pycode``, ``fortunes``, ``chatterbot``, ``factbook``), its passages in the seeded order
  the mix uses (so the first windows span the whole source).
* ``heldout``: the held-out source (``factbook``, modern expository prose never in the default mix).
* a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one object with a ``"text"``
  field per line), a folder or a glob of such files;
* several of the above separated by commas (their documents are concatenated in the order given);
* ``hf:<dataset>[:split]``: a Hugging Face dataset (needs the optional ``datasets`` package and the hub).

Files are read as UTF-8 unless an encoding is given (``--encoding NAME``); the encoding travels inside the
spec as a prefix, ``encoding=NAME:SPEC`` (see :func:`with_encoding`), so a run's recorded corpus reads the
same text again.
"""

from __future__ import annotations

import random
import shutil  # noqa: F401  (tests patch corpus.shutil.which to force the pure-Python .deb reader)
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DataError
from ..util.cache import log
from .deb import extract_deb as _extract_deb  # noqa: F401  (kept for callers of the old name)
from .mix import interleave
from .sources import HELDOUT_SOURCE, SOURCES
from .sources.austen import load_austen
from .sources.botchan import load_botchan
from .sources.files import is_path_like, load_path
from .sources.hf import load_hf
from .sources.sampler import make_model_sampler, sampled_corpus
from .text import check_encoding, group_paragraphs, read_text_file, split_documents

__all__ = [
    "CORPUS_NAMES",
    "Corpus",
    "default_corpus_texts",
    "group_paragraphs",
    "load_austen",
    "load_botchan",
    "load_corpus",
    "load_source",
    "load_texts",
    "make_model_sampler",
    "read_text_file",
    "split_documents",
    "with_encoding",
]

CORPUS_NAMES: dict[str, str] = {
    "default": "the training mix of every source below except the held-out one",
    "heldout": f"the held-out source ({HELDOUT_SOURCE}), never in the default mix",
    **{s.name: f"{s.kind}: {s.origin} ({s.license})" for s in SOURCES.values()},
}
_ENC = "encoding="


@dataclass
class Corpus:
    """Documents and, for each, the name of the source it came from."""

    texts: list[str]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.sources:
            self.sources = ["text"] * len(self.texts)


def with_encoding(spec: str, encoding: str | None) -> str:
    """``spec`` with the file encoding recorded in it (``encoding=NAME:SPEC``); checks the name."""
    if encoding is None:
        return spec
    return f"{_ENC}{check_encoding(encoding)}:{spec}"


def load_source(name: str) -> list[str]:
    """The passages of one named source (fetched once, then cached)."""
    return SOURCES[name].load()


def _mix(exclude: tuple[str, ...] = (), min_chars: int | None = None) -> Corpus:
    docs: dict[str, list[str]] = {}
    for s in SOURCES.values():
        if s.weight <= 0 or s.name in exclude:
            continue
        try:
            docs[s.name] = load_source(s.name)
        except DataError as exc:
            log(f"corpus source '{s.name}' ({s.kind}) is unavailable here, the mix goes on without it: {exc}")
    if not docs:
        raise DataError("no source of the default corpus is available (see the lines above)")
    weights = {n: SOURCES[n].weight for n in docs}
    kinds = {n: SOURCES[n].kind for n in docs}
    texts, labels = interleave(docs, weights, kinds, min_chars=min_chars)
    return Corpus(texts, labels)


def default_corpus_texts(
    min_chars: int | None = None,
    *,
    model_sampler: Callable[[int], list[str]] | None = None,
    sampler_id: str = "model",
) -> list[str]:
    """The default training mix as a list of passages (its first ``min_chars`` characters when given).

    ``model_sampler`` (e.g. from :func:`make_model_sampler`) is used only when no named source can be
    fetched; its output is cached under ``corpora/model-samples-<sampler_id>``.
    """
    try:
        return _mix(min_chars=min_chars).texts
    except DataError as exc:
        if model_sampler is None:
            raise DataError(f"no default corpus is available offline ({exc})") from None
    return sampled_corpus(model_sampler, sampler_id, min_chars or 200_000)


def _split_encoding(spec: str) -> tuple[str, str | None]:
    if spec.lower().startswith(_ENC):
        name, sep, rest = spec[len(_ENC) :].partition(":")
        if not sep or not rest.strip():
            raise DataError(f"corpus '{spec}' has no text after its encoding; expected encoding=NAME:SPEC")
        return rest.strip(), check_encoding(name)
    return spec, None


def _unknown(spec: str) -> DataError:
    return DataError(
        f"unknown corpus '{spec}': expected one of {', '.join(CORPUS_NAMES)}, default-NAME (the mix without "
        "NAME), a .txt/.jsonl file, a folder, a glob, a comma-separated list of these, or hf:<dataset>[:split]"
    )


def _load_one(spec: str, encoding: str | None) -> Corpus:
    key = spec.lower()
    if key == "default":
        return _mix()
    if key.startswith("default-") and not is_path_like(spec):
        names = [n for n in key[len("default-") :].split("-") if n]
        bad = [n for n in names if n not in SOURCES or SOURCES[n].weight <= 0] or ([] if names else ["(nothing)"])
        if bad:
            raise DataError(
                f"corpus '{spec}' leaves out '{'-'.join(bad)}', which is not in the default mix; expected "
                f"default-NAME with NAME among {', '.join(n for n, s in SOURCES.items() if s.weight > 0)}"
            )
        return _mix(exclude=tuple(names))
    if key == "heldout":
        key = HELDOUT_SOURCE
    if key in SOURCES:  # alone, in the same seeded order as in the mix, so any prefix spans the whole source
        texts = list(load_source(key))
        random.Random(f"0:{key}").shuffle(texts)
        return Corpus(texts, [key] * len(texts))
    if key.startswith("hf:"):
        texts = load_hf(spec)
        return Corpus(texts, [spec] * len(texts))
    if is_path_like(spec):
        texts = load_path(spec, encoding)
        return Corpus(texts, [spec] * len(texts))
    raise _unknown(spec)


def load_corpus(spec: str) -> Corpus:
    """Load a corpus with each document's source; see the module docstring for the accepted ``spec``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"corpus {spec!r} is empty; expected a corpus name, a .txt/.jsonl file, a glob or hf:NAME"
        )
    spec, encoding = _split_encoding(spec.strip())
    if "," in spec and not _exists(spec):
        parts = [p.strip() for p in spec.split(",")]
        if not all(parts):
            raise DataError(f"corpus list '{spec}' has an empty item; expected SPEC,SPEC,...")
        texts: list[str] = []
        sources: list[str] = []
        for part in parts:
            c = _load_one(part, encoding)
            texts += c.texts
            sources += c.sources
        corpus = Corpus(texts, sources)
    else:
        corpus = _load_one(spec, encoding)
    if not corpus.texts or not any(t.strip() for t in corpus.texts):
        raise DataError(f"corpus '{spec}' contains no text; expected at least one non-empty document")
    return corpus


def _exists(spec: str) -> bool:
    from pathlib import Path

    return Path(spec).expanduser().exists()


def load_texts(spec: str) -> list[str]:
    """Load a corpus as a list of documents; see the module docstring for the accepted ``spec`` forms."""
    return load_corpus(spec).texts
