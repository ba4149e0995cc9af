"""What a label's text predicts, read from the text alone (no dashboard, no token ids).

>>> p = parse_label('" Mary" / " John" (names) after " there was" → promotes " she" / " her"')
>>> p.words, p.category, p.context, p.promoted
([' Mary', ' John'], 'names', ' there was', [' she', ' her'])

- activation words: the double-quoted strings before the output part (``→``, ``->`` or a word such as
  "promotes" / "predicts"), other than the context;
- context: the quoted string after "after" / "following" (the feature should fire on a word that follows it);
- category: a kind of token the label names ("names", "punctuation", "numbers", ...) outside quotes;
  used when the label quotes no word;
- promoted: the quoted strings of the output part.

Quoted strings are read as JSON strings (the built-in labeler writes them with ``json.dumps``; ``"\\n"`` is a
line break). :func:`word_token_sequences` and :func:`promoted_token_ids` turn words into token ids with the
model's tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

__all__ = ["CATEGORIES", "Prediction", "parse_label", "promoted_token_ids", "word_token_sequences"]

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_OUTPUT = re.compile(r"→|->|=>|\bpromot\w*|\bpredict\w*|\bboost\w*|\boutputs?\b", re.IGNORECASE)
_AFTER = re.compile(r'\b(?:after|following)\s+"((?:[^"\\]|\\.)*)"', re.IGNORECASE)

#: category name (as the built-in labeler writes it) -> words that name it in free text
CATEGORIES = {
    "names": r"\bnames?\b",
    "pronouns": r"\bpronouns?\b",
    "punctuation": r"\bpunctuation\b",
    "numbers": r"\b(?:numbers?|digits?|numerals?)\b",
    "line breaks": r"\b(?:line breaks?|newlines?)\b",
    "whitespace": r"\bwhitespace\b",
    "function words": r"\bfunction words?\b",
    "capitalised words": r"\bcapitali[sz]ed\b",
    "word pieces": r"\bword pieces?\b",
    "special tokens": r"\bspecial tokens?\b",
}


@dataclass
class Prediction:
    words: list[str] = field(default_factory=list)
    context: str = ""
    category: str | None = None
    promoted: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """Where the activation test's tokens come from: the quoted words, the named category, or nothing."""
        return "words" if self.words else ("category" if self.category else "none")

    def to_dict(self) -> dict:
        return {**asdict(self), "source": self.source}


def _unquote(raw: str) -> str:
    try:
        s = json.loads(f'"{raw}"')
    except ValueError:
        return raw
    return s if isinstance(s, str) else raw


def parse_label(text: str) -> Prediction:
    """The testable claims of a label's text (see the module docstring)."""
    text = str(text or "")
    if text.lower().startswith("dead"):
        return Prediction()
    m = _first_output_marker(text)
    left, right = (text[: m.start()], text[m.end() :]) if m else (text, "")
    context = ""
    after = _AFTER.search(left)
    if after:
        context = _unquote(after.group(1))
        left = left[: after.start()] + left[after.end() :]
    words = list(dict.fromkeys(w for w in (_unquote(q) for q in _QUOTED.findall(left)) if w))
    bare = _QUOTED.sub(" ", left)
    category = next((c for c, pat in CATEGORIES.items() if re.search(pat, bare, re.IGNORECASE)), None)
    promoted = list(dict.fromkeys(w for w in (_unquote(q) for q in _QUOTED.findall(right)) if w))
    return Prediction(words=words, context=context, category=category, promoted=promoted)


def _first_output_marker(text: str):
    """The first output marker outside quotes."""
    spans = [q.span() for q in _QUOTED.finditer(text)]
    for m in _OUTPUT.finditer(text):
        if not any(a <= m.start() < b for a, b in spans):
            return m
    return None


def _ids(tokenizer, s: str) -> list[int]:
    return [int(i) for i in tokenizer(s, add_special_tokens=False)["input_ids"]]


def _variants(tokenizer, word: str) -> list[str]:
    """The word as written, and with a leading space when it has none and the spaced form is one token
    (a whole word inside running text; a word piece such as "ation" stays as written)."""
    out = [word]
    if word and word == word.strip() and len(_ids(tokenizer, " " + word)) == 1:
        out.append(" " + word)
    return out


def word_token_sequences(tokenizer, word: str, max_len: int = 3) -> list[tuple[int, ...]]:
    """Token sequences (at most ``max_len`` tokens) that spell ``word`` as written, or with a leading space
    when that is one token."""
    out: list[tuple[int, ...]] = []
    for v in _variants(tokenizer, word):
        ids = tuple(_ids(tokenizer, v))
        if 1 <= len(ids) <= max_len and ids not in out:
            out.append(ids)
    return out


def promoted_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The next-token ids a label's promoted words predict: the first token of each word as written, and
    the word with a leading space when that is one token."""
    out: list[int] = []
    for w in words:
        for v in _variants(tokenizer, w):
            ids = _ids(tokenizer, v)
            if ids and ids[0] not in out:
                out.append(ids[0])
    return out
