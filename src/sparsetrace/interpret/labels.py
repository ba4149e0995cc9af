"""Feature labels: a deterministic built-in labeler, pluggable LLM labelers, and a label cache.

>>> labeler = BuiltinLabeler()
>>> label = labeler.label(dashboard)
>>> label.text
'" Mary" / " John" (names) → promotes " she"'

Every labeler returns a :class:`Label`: the text plus the testable parts that
:mod:`sparsetrace.interpret.verify_labels` checks causally: ``key_tokens`` (what the feature should fire
on) and ``promoted`` (the output tokens it should push up).

LLM labelers (:class:`OpenAICompatibleLabeler`, :class:`TransformersLabeler`) write free text; their
key tokens are the quoted strings of the text that are among the dashboard's activating tokens, else
the built-in analysis's key tokens, and their promoted tokens are the dashboard's top logits.

Labels are cached in one JSON file keyed by ``(dictionary sha, feature, labeler id)``
(:class:`LabelCache`, :func:`label_features`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SparsetraceError


class LabelerError(SparsetraceError):
    """An LLM labeler could not produce a label (server unreachable, bad reply)."""


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


# ----------------------------------------------------------------------------------------- LLM labelers
SYSTEM_PROMPT = (
    "You label features of a sparse dictionary trained on a language model's activations. Given text "
    "excerpts where the feature fires (the token where it fires most is marked [[like this]], with its "
    "activation) and the output tokens it promotes, reply with ONE short label of at most 12 words. "
    'Quote the tokens it fires on in double quotes, e.g. "Mary" / "John" (names) → promotes "she".'
)


def build_prompt(dash: dict, *, n_examples: int = 10) -> str:
    lines = [f"Feature {dash.get('feature')} at layer {dash.get('layer')}; density {dash.get('density', 0):.2e}."]
    lines.append("Top activating excerpts:")
    for ex in (dash.get("top_examples") or [])[:n_examples]:
        toks, m = ex.get("tokens") or [], int(ex.get("max_pos", 0))
        text = "".join(f"[[{t}]]" if j == m else t for j, t in enumerate(toks))
        lines.append(f"- ({ex.get('max_act', 0):.2f}) {text!r}")
    if dash.get("top_logits"):
        lines.append("Promoted output tokens: " + ", ".join(repr(t) for t, _ in dash["top_logits"][:8]))
    if dash.get("bottom_logits"):
        lines.append("Suppressed output tokens: " + ", ".join(repr(t) for t, _ in dash["bottom_logits"][:5]))
    lines.append("Label:")
    return "\n".join(lines)


def _clean_reply(text: str) -> str:
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    text = re.sub(r"^(label\s*:\s*)", "", text, flags=re.IGNORECASE).strip()
    return text[:200]


def _label_from_text(text: str, dash: dict, labeler_id: str) -> Label:
    """Testable parts of a free-text label: quoted strings found among the activating tokens."""
    base = BuiltinLabeler().analyse(dash)
    seen: dict[str, tuple[str, int | None]] = {}
    for ex in dash.get("top_examples") or []:
        toks, m = ex.get("tokens") or [], int(ex.get("max_pos", 0))
        if toks and m < len(toks):
            seen.setdefault(_norm(toks[m]), (toks[m], ex.get("max_token_id")))
    keys, key_ids = [], []
    for q in re.findall(r'"([^"]+)"', text):
        hit = seen.get(_norm(q))
        if hit and hit[0] not in keys:
            keys.append(hit[0])
            if hit[1] is not None:
                key_ids.append(int(hit[1]))
    if not keys:
        keys, key_ids = base["key_tokens"], base["key_token_ids"]
    return Label(
        text=text,
        labeler=labeler_id,
        key_tokens=keys,
        key_token_ids=key_ids,
        promoted=base["promoted"],
        promoted_ids=base["promoted_ids"],
        category=base["category"],
        context=base["context"],
        coverage=round(base["coverage"], 4),
    )


class OpenAICompatibleLabeler:
    """Labels with any server speaking the OpenAI chat-completions JSON API (``POST {base_url}/chat/completions``).

    The API key is read from the environment variable ``api_key_env`` (no header when unset, which suits
    local servers such as llama.cpp / vLLM / Ollama).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        timeout: float = 60.0,
        max_tokens: int = 48,
        temperature: float = 0.0,
        retries: int = 1,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retries = retries
        self.id = f"openai:{self.base_url}:{model}"

    def complete(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        last: Exception | None = None
        for _ in range(self.retries + 1):
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                return str(reply["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500 and e.code != 429:
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = e
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise LabelerError(f"{url} returned an unexpected reply ({e}); expected chat-completions JSON") from None
        raise LabelerError(f"labeler request to {url} failed: {last}")

    def label(self, dash: dict) -> Label:
        text = _clean_reply(self.complete(build_prompt(dash)))
        if not text:
            raise LabelerError(f"{self.base_url} returned an empty label for feature {dash.get('feature')}")
        return _label_from_text(text, dash, self.id)


class TransformersLabeler:
    """Labels with a local causal LM (a zoo short name, local path or hub name), greedy decoding."""

    def __init__(self, model_name: str, *, max_new_tokens: int = 32, device: str = "cpu"):
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.id = f"transformers:{model_name}"
        self._model = None
        self._tok = None

    def _load(self):
        if self._model is None:
            from ..model.zoo import load_hf_model

            self._model, self._tok, _ = load_hf_model(self.model_name, device=self.device)
        return self._model, self._tok

    def complete(self, prompt: str) -> str:
        model, tok = self._load()
        text = None
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(
                    [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except (ValueError, TypeError, KeyError):
                text = None
        if text is None:
            text = SYSTEM_PROMPT + "\n\n" + prompt
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        max_len = int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 0) or 0)
        if max_len and ids.shape[1] + self.max_new_tokens > max_len:
            ids = ids[:, -(max_len - self.max_new_tokens) :]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def label(self, dash: dict) -> Label:
        text = _clean_reply(self.complete(build_prompt(dash)))
        if not text:
            text = "(no label)"
        return _label_from_text(text, dash, self.id)


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
