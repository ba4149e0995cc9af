"""Feature labels: a deterministic built-in labeler, pluggable LLM labelers, and a label cache.

>>> labeler = BuiltinLabeler()
>>> label = labeler.label(dashboard)
>>> label.text
'" Mary" / " John" (names) → promotes " she"'

Every labeler returns a :class:`Label`: the text plus the testable parts that
:mod:`sparsetrace.interpret.verify_labels` checks causally: ``key_tokens`` (what the feature should fire
on) and ``promoted`` (the output tokens it should push up).

LLM labelers (:mod:`.llm_labelers`: :class:`OpenAICompatibleLabeler`, :class:`TransformersLabeler`,
``make_labeler`` for ``explain --labeler``) write free text. Verification reads only a label's text
(:mod:`.predictions`); the token fields of a :class:`Label` are for display.

Labels are cached in one JSON file keyed by ``(dictionary sha, feature, labeler id)``
(:class:`LabelCache`, :func:`label_features`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Label:
    text: str
    labeler: str
    key_tokens: list[str] = field(default_factory=list)
    key_token_ids: list[int] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    promoted_ids: list[int] = field(default_factory=list)
    category: str | None = None
    context: list[str] = field(default_factory=list)
    coverage: float = 0.0  # share of top-example weight on the key tokens
    promoted_source: str = "direct"  # "direct" (W_dec through the unembedding) or "steered" (measured)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Label:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------- word lists
_NAMES = set(
    """lily tom timmy tim sue ben mia max sam anna jack lucy mary john sara sarah emma amy bob jane
    joe billy bobby molly kitty spot jill jim mike tommy susie sally lila zoe ella leo kate katie
    rosie rose daisy lucky buddy fluffy lisa tina peter paul mark anne alice henry george james will
    william kim ann jen jenny jenna mom dad mommy daddy grandma grandpa romeo juliet hamlet richard
    edward elizabeth darcy bennet jane emma harriet fanny anne catherine elinor marianne""".split()
)
_PRONOUNS = set("i me my mine you your he him his she her hers it its we us our they them their".split())
_FUNCTION = set(
    """the a an and or but of to in on at for with from by as is was were be been are this that these
    those there then so if not no""".split()
)


def _quote(tok: str) -> str:
    return json.dumps(tok, ensure_ascii=False)


def _category(tokens: list[str]) -> str | None:
    """A coarse, deterministic category for a set of token strings (None if they are mixed)."""
    if not tokens:
        return None
    cats = []
    for t in tokens:
        s = t.strip()
        low = s.lower()
        if not s:
            cats.append("line breaks" if "\n" in t else "whitespace")
        elif s.startswith("<") and s.endswith(">") and "|" in s:
            cats.append("special tokens")
        elif s.isdigit():
            cats.append("numbers")
        elif all(not c.isalnum() for c in s):
            cats.append("punctuation")
        elif low in _NAMES:
            cats.append("names")
        elif low in _PRONOUNS:
            cats.append("pronouns")
        elif low in _FUNCTION:
            cats.append("function words")
        elif s.isalpha() and not t.startswith(" ") and s.islower():
            cats.append("word pieces")
        elif s[:1].isupper() and s.isalpha():
            cats.append("capitalised words")
        else:
            cats.append(None)
    first = cats[0]
    return first if first is not None and all(c == first for c in cats) else None


def _norm(tok: str) -> str:
    return tok.strip().lower()


# ----------------------------------------------------------------------------------------- built-in
class BuiltinLabeler:
    """Names a feature from its dashboard without any LLM; deterministic.

    - key tokens: the tokens at the max position of the top examples, grouped case- and
      space-insensitively and weighted by activation, taken in order until they cover ``coverage`` of
      the weight (at most ``max_tokens``);
    - context: a preceding 1- or 2-gram shared by at least ``context_share`` of the top examples;
    - category: a coarse class of the key tokens (names, pronouns, punctuation, ...);
    - effects: the top ``n_promoted`` promoted output tokens: the direct logit effect
      (``top_logits``), or with ``promoted_from="steered"`` the measured effect of steering
      (``steered_logits``, see ``dashboards.add_steered_logits``; falls back to direct when absent).
    """

    def __init__(
        self,
        *,
        max_tokens: int = 3,
        coverage: float = 0.6,
        context_share: float = 0.5,
        n_promoted: int = 2,
        promoted_from: str = "direct",
    ):
        if promoted_from not in ("direct", "steered"):
            raise ValueError(f"promoted_from={promoted_from!r}; expected 'direct' or 'steered'")
        self.max_tokens = max_tokens
        self.coverage = coverage
        self.context_share = context_share
        self.n_promoted = n_promoted
        self.promoted_from = promoted_from
        self.id = "builtin/1" if promoted_from == "direct" else "builtin/1+steered"

    def analyse(self, dash: dict) -> dict:
        examples = list(dash.get("top_examples") or [])
        weight: Counter[str] = Counter()
        surface: dict[str, Counter[str]] = {}
        ids: dict[str, int] = {}
        prev1: Counter[tuple[str, ...]] = Counter()
        prev2: Counter[tuple[str, ...]] = Counter()
        for ex in examples:
            toks, m = ex.get("tokens") or [], int(ex.get("max_pos", 0))
            if not toks or m >= len(toks):
                continue
            tok = toks[m]
            key = _norm(tok) or tok
            w = max(float(ex.get("max_act", 0.0)), 0.0) or 1e-9
            weight[key] += w
            surface.setdefault(key, Counter())[tok] += 1
            if "max_token_id" in ex and (tok not in ids):
                ids[tok] = int(ex["max_token_id"])
            if m >= 1:
                prev1[(toks[m - 1],)] += 1
            if m >= 2:
                prev2[(toks[m - 2], toks[m - 1])] += 1
        total = sum(weight.values())
        # deterministic order: weight desc, then the key string
        ranked = sorted(weight.items(), key=lambda kv: (-kv[1], kv[0]))
        keys, cum = [], 0.0
        for k, w in ranked:
            if len(keys) >= self.max_tokens:
                break
            if keys and w / total < 0.1:
                break
            keys.append(k)
            cum += w
            if cum / total >= self.coverage:
                break
        key_tokens = [sorted(surface[k].items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k in keys]
        context: list[str] = []
        n = max(len(examples), 1)
        for counter in (prev2, prev1):
            if counter:
                gram, c = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]
                if c / n >= self.context_share:
                    context = list(gram)
                    break
        source = "steered" if self.promoted_from == "steered" and dash.get("steered_logits") else "direct"
        key_l, key_i = ("steered_logits", "steered_logit_ids") if source == "steered" else ("top_logits", "top_logit_ids")
        promoted = [t for t, _ in (dash.get(key_l) or [])[: self.n_promoted]]
        promoted_ids = list((dash.get(key_i) or [])[: self.n_promoted])
        return {
            "key_tokens": key_tokens,
            "key_token_ids": [ids[t] for t in key_tokens if t in ids],
            "coverage": cum / total if total else 0.0,
            "context": context,
            "category": _category(key_tokens),
            "promoted": promoted,
            "promoted_ids": promoted_ids,
            "promoted_source": source,
        }

    def label(self, dash: dict) -> Label:
        a = self.analyse(dash)
        if not a["key_tokens"]:
            return Label(text="dead feature (never fired)", labeler=self.id)
        parts = [" / ".join(_quote(t) for t in a["key_tokens"])]
        if a["coverage"] < 0.3:
            parts[0] = f"mixed tokens, mostly {parts[0]}"
        if a["category"]:
            parts.append(f"({a['category']})")
        if a["context"]:
            parts.append("after " + _quote("".join(a["context"])))
        text = " ".join(parts)
        if a["promoted"]:
            text += " → promotes " + " / ".join(_quote(t) for t in a["promoted"])
        return Label(
            text=text,
            labeler=self.id,
            key_tokens=a["key_tokens"],
            key_token_ids=a["key_token_ids"],
            promoted=a["promoted"],
            promoted_ids=a["promoted_ids"],
            category=a["category"],
            context=a["context"],
            coverage=round(a["coverage"], 4),
            promoted_source=a["promoted_source"],
        )


# ----------------------------------------------------------------------------------------- cache
def dictionary_sha(dictionary) -> str:
    """sha256 of a dictionary's weights and config (identifies it in label caches)."""
    h = hashlib.sha256()
    h.update(json.dumps(dictionary.cfg.to_dict(), sort_keys=True).encode())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        t = getattr(dictionary, name).detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


class LabelCache:
    """Labels in one JSON file: ``{"<dict sha>/<feature>/<labeler id>": Label dict}``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict[str, dict] = {}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                loaded = {}
            if isinstance(loaded, dict):
                self.data = {k: v for k, v in loaded.items() if isinstance(v, dict)}

    @staticmethod
    def key(dict_sha: str, feature: int, labeler_id: str) -> str:
        return f"{dict_sha}/{int(feature)}/{labeler_id}"

    def get(self, dict_sha: str, feature: int, labeler_id: str) -> Label | None:
        d = self.data.get(self.key(dict_sha, feature, labeler_id))
        return Label.from_dict(d) if d else None

    def put(self, dict_sha: str, feature: int, label: Label) -> None:
        self.data[self.key(dict_sha, feature, label.labeler)] = label.to_dict()

    def save(self) -> None:
        from ..dictionary.io import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.data, ensure_ascii=False, indent=0, sort_keys=True))


def label_features(
    dashboards: dict[int, dict],
    labeler=None,
    *,
    features: Iterable[int] | None = None,
    cache: LabelCache | None = None,
    dict_sha: str | None = None,
    update_dashboards: bool = True,
) -> dict[int, Label]:
    """Label dashboards (built-in labeler by default), using and filling ``cache`` when given
    (``dict_sha`` is then required). Sets ``dashboard["label"]`` unless ``update_dashboards`` is False."""
    labeler = labeler or BuiltinLabeler()
    if cache is not None and not dict_sha:
        raise ValueError("a label cache needs dict_sha (see dictionary_sha)")
    out: dict[int, Label] = {}
    dirty = False
    for f in features if features is not None else sorted(dashboards):
        dash = dashboards[f]
        lab = cache.get(dict_sha, f, labeler.id) if cache is not None else None
        if lab is None:
            lab = labeler.label(dash)
            if cache is not None:
                cache.put(dict_sha, f, lab)
                dirty = True
        out[f] = lab
        if update_dashboards:
            dash["label"] = lab.text
            dash["label_info"] = lab.to_dict()
    if cache is not None and dirty:
        cache.save()
    return out
