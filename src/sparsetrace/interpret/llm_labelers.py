"""LLM labelers: any OpenAI-compatible chat server, or a local transformers model; ``make_labeler``
turns an ``explain --labeler`` value into a labeler.

>>> make_labeler("builtin")                                   # the deterministic built-in labeler
>>> make_labeler("local:/models/SmolLM2-135M-Instruct")       # a transformers model folder
>>> make_labeler("openai:http://127.0.0.1:8080/v1#qwen2.5")   # an OpenAI-compatible server (#model)

They write free text (one line); the verifier tests what that text says (:mod:`.predictions`).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..errors import ConfigError, SparsetraceError
from .labels import BuiltinLabeler, Label, _norm

__all__ = [
    "LABELER_EXPECTED",
    "LabelerError",
    "OpenAICompatibleLabeler",
    "TransformersLabeler",
    "build_prompt",
    "make_labeler",
]


class LabelerError(SparsetraceError):
    """An LLM labeler could not produce a label (server unreachable, bad reply)."""


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
    promoted = dash.get("steered_logits") or dash.get("top_logits")
    if promoted:
        lines.append("Promoted output tokens: " + ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in promoted[:8]))
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


# ----------------------------------------------------------------------------------------- --labeler
LABELER_EXPECTED = (
    "expected builtin, local:PATH (a transformers model folder) or openai:URL[#MODEL] (an OpenAI-compatible "
    "server, e.g. openai:http://127.0.0.1:8080/v1#qwen2.5)"
)


def make_labeler(spec: str, *, promoted: str = "steered", device: str = "cpu"):
    """A labeler from an ``explain --labeler`` value (:class:`ConfigError` naming the bad value otherwise).

    ``builtin``: :class:`~.labels.BuiltinLabeler` (``promoted`` says where its promoted outputs come from);
    ``local:PATH``: :class:`TransformersLabeler` on a local model folder (with a ``config.json``);
    ``openai:URL[#MODEL]``: :class:`OpenAICompatibleLabeler` (``MODEL`` defaults to ``default``; the API
    key, if any, is read from ``OPENAI_API_KEY``)."""
    s = str(spec or "").strip()
    kind, _, rest = s.partition(":")
    kind = kind.lower()
    if kind == "builtin" and not rest:
        return BuiltinLabeler(promoted_from=promoted)
    if kind == "local" and rest:
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--labeler '{spec}': folder '{rest}' does not exist; {LABELER_EXPECTED}")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--labeler '{spec}': '{rest}' has no config.json, so it is not a transformers model "
                              f"folder; {LABELER_EXPECTED}")
        return TransformersLabeler(str(path.resolve()), device=device)
    if kind == "openai" and rest:
        url, _, model = rest.partition("#")
        if not re.match(r"^https?://[^/\s#]+", url):
            raise ConfigError(f"--labeler '{spec}': '{url}' is not an http(s) URL; {LABELER_EXPECTED}")
        return OpenAICompatibleLabeler(url, model.strip() or "default")
    raise ConfigError(f"--labeler '{spec}' is unknown; {LABELER_EXPECTED}")
