"""Upstream features of one dictionary feature, from the weights alone (no prompt).

For a target feature f (a transcoder's or a residual SAE's), every feature i of an earlier dictionary
is scored by its *virtual weight* to f (see :mod:`sparsetrace.attribute.weights`): how much one unit
of i's decoder direction moves f's encoder pre-activation

- ``direct``: through the residual stream (``W_enc[f] . N(W_dec[i])``), and
- ``attention``: through the OV circuit of head h of an attention layer between them, the head
  attending fully to i's position (``W_enc[f] . N(W_O^h W_V^h N_attn(W_dec[i]))``).

Norm weights (and LayerNorm centring) are applied; per-token norm scales are not (taken as 1), so
attention paths, which pass two norms, are on a different scale from direct ones when residual norms
are far from 1. Interactions between features, attention patterns and the features' thresholds are
ignored: this ranks candidates, it does not measure effects on a prompt (``sparsetrace trace`` does).
De-embeddings: the input tokens whose embeddings drive f directly (``W_E[v] . N(W_enc[f])``).

:func:`upstream_features` returns a JSON-able dict; :func:`format_upstream` renders it as a table;
:func:`upstream_file` / :func:`write_upstream` place it at ``RUN/upstream/L06_F123.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..dictionary.model import SparseDictionary
from ..errors import ConfigError
from ..model.adapter import LanguageModel
from . import weights as W

__all__ = ["UPSTREAM_FORMAT", "format_upstream", "parse_feature", "path_label", "target_dictionary", "upstream_features",
           "upstream_file", "write_upstream"]

UPSTREAM_FORMAT = "sparsetrace-upstream/1"
_FEATURE_RE = re.compile(r"^\s*(?:L?(\d+)\s*[:/]\s*F?(\d+))\s*$", re.IGNORECASE)


def parse_feature(text: str) -> tuple[int, int]:
    """``"6:123"`` (or ``"L6/F123"``) -> ``(6, 123)``; ConfigError naming the bad value otherwise."""
    m = _FEATURE_RE.match(str(text))
    if m is None:
        raise ConfigError(f"--feature '{text}' is invalid; expected LAYER:INDEX, e.g. 6:123")
    return int(m.group(1)), int(m.group(2))


def _describe(d: SparseDictionary) -> str:
    return f"{d.cfg.kind} at {d.cfg.hookpoint_in}.{d.cfg.layer}"


def target_dictionary(dictionaries: Sequence[SparseDictionary], layer: int | SparseDictionary,
                      feature: int) -> SparseDictionary:
    """The dictionary holding the target feature: ``layer`` itself when it is a dictionary, else the one
    dictionary of that layer. ConfigError when there is none or several, or ``feature`` is out of range."""
    if isinstance(layer, SparseDictionary):
        tgt = layer
    else:
        here = [d for d in dictionaries if d.cfg.layer == layer]
        if not here:
            have = sorted({d.cfg.layer for d in dictionaries})
            raise ConfigError(f"layer {layer} has no dictionary; expected one of the layers with dictionaries: "
                              f"{', '.join(map(str, have)) or 'none'}")
        if len(here) > 1:
            raise ConfigError(f"layer {layer} has {len(here)} dictionaries ({'; '.join(map(_describe, here))}); "
                              "pass the target dictionary itself")
        tgt = here[0]
    if not 0 <= feature < tgt.n_features:
        raise ConfigError(f"feature {feature} is out of range for the {_describe(tgt)} "
                          f"(expected 0..{tgt.n_features - 1})")
    W.path_exists(tgt, tgt, False)  # raises for a dictionary whose place in the forward is not known
    return tgt


def _entry(src: SparseDictionary, i: int, w: float, attn_layer: int | None = None, head: int | None = None) -> dict:
    return {"layer": src.cfg.layer, "kind": src.cfg.kind, "hookpoint": src.cfg.hookpoint_in, "feature": int(i),
            "weight": float(w), "path": "direct" if attn_layer is None else "attention",
            "attn_layer": attn_layer, "head": head}


def _top_abs(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(indices into the flattened scores, their values) of the ``k`` largest ``|scores|``."""
    flat = scores.reshape(-1)
    idx = flat.abs().topk(min(k, flat.numel())).indices
    return idx, flat[idx]


@torch.no_grad()
def upstream_features(lm: LanguageModel, dictionaries: Sequence[SparseDictionary], layer: int | SparseDictionary,
                      feature: int, *, top: int = 10, through_attention: bool = True, n_tokens: int = 10) -> dict:
    """The ``top`` upstream features of ``feature`` of the dictionary at ``layer`` (or of the dictionary
    passed as ``layer``), among ``dictionaries``, by absolute virtual weight, and its ``n_tokens`` top
    de-embedding tokens. See the module docstring for the dict returned (``format_upstream`` shows it)."""
    if top < 1 or n_tokens < 0:
        raise ConfigError(f"top={top}, n_tokens={n_tokens}; expected top >= 1 and n_tokens >= 0")
    tgt = target_dictionary(dictionaries, layer, feature)
    parallel = bool(lm.arch.parallel_residual)
    sources, skipped = [], []
    for d in dictionaries:
        if d is tgt:
            continue
        try:
            ok = W.path_exists(d, tgt, parallel) or (through_attention and any(
                W.path_exists(d, tgt, parallel, a) for a in range(lm.n_layers)))
        except ConfigError:  # a dictionary at a site weight-only attribution does not place (e.g. attn_out)
            skipped.append(_describe(d))
            continue
        if ok:
            sources.append(d)
    u = W.reader_vectors(lm, tgt, torch.tensor([feature]))[0]  # [d]
    cands: list[dict] = []
    for src in sources:
        if W.path_exists(src, tgt, parallel):
            idx, vals = _top_abs(src.W_dec.detach().float() @ u.to(src.W_dec.device), top)
            cands += [_entry(src, i, w) for i, w in zip(idx.tolist(), vals.tolist(), strict=True)]
    n_paths = sum(W.path_exists(s, tgt, parallel) for s in sources)
    if through_attention:
        readers: dict[int, Tensor] = {}  # attention layer -> [H, d], computed once per layer
        for src in sources:
            layers = [a for a in range(lm.n_layers) if W.path_exists(src, tgt, parallel, a)]
            if not layers:
                continue
            for a in layers:
                if a not in readers:
                    readers[a] = W.ov_readers(lm, a, u)
            uh = torch.cat([readers[a] for a in layers])  # [n_layers * H, d]: one matmul per source
            H = readers[layers[0]].shape[0]
            scores = uh.to(src.W_dec.device) @ src.W_dec.detach().float().t()  # [n_layers * H, n_src]
            idx, vals = _top_abs(scores, top)
            n_src = scores.shape[1]
            cands += [_entry(src, i % n_src, w, layers[i // n_src // H], i // n_src % H)
                      for i, w in zip(idx.tolist(), vals.tolist(), strict=True)]
            n_paths += scores.shape[0]
    cands.sort(key=lambda e: -abs(e["weight"]))
    _, emb_scores = W.feature_input_tokens(lm, tgt, feature, k=1, return_scores=True)
    tv, ti = emb_scores.topk(min(n_tokens, emb_scores.numel()))
    tokens = [{"token": t, "token_id": int(i), "weight": float(v)}
              for t, i, v in zip(lm.to_str_tokens(ti.tolist()), ti.tolist(), tv.tolist(), strict=True)]
    return {
        "format": UPSTREAM_FORMAT,
        "model": lm.model_id,
        "target": {"layer": tgt.cfg.layer, "feature": int(feature), "kind": tgt.cfg.kind,
                   "hookpoint": tgt.cfg.hookpoint_in, "n_features": tgt.n_features},
        "top": top,
        "through_attention": bool(through_attention),
        "norm_scales": "not applied (taken as 1)",
        "sources": [{"layer": s.cfg.layer, "kind": s.cfg.kind, "hookpoint": s.cfg.hookpoint_in,
                     "n_features": s.n_features} for s in sources],
        "skipped_sources": skipped,
        "n_paths": int(n_paths),
        "upstream": cands[:top],
        "tokens": tokens,
    }


def path_label(e: dict) -> str:
    """``residual`` or ``attn L3 H2 (OV)`` for an entry of ``upstream``."""
    return "residual" if e["path"] == "direct" else f"attn L{e['attn_layer']} H{e['head']} (OV)"


def format_upstream(doc: dict) -> str:
    """A plain-text table of an :func:`upstream_features` result."""
    t = doc["target"]
    lines = [f"upstream of L{t['layer']}/F{t['feature']} ({t['kind']}, {doc['model']}); virtual weights from "
             f"the weights alone, norm scales taken as 1; "
             f"{'direct and through attention OV' if doc['through_attention'] else 'direct paths only'}"]
    if doc["upstream"]:
        lines.append(f"{'rank':>4}  {'layer':>5}  {'feature':>7}  {'kind':<15}  {'weight':>10}  path")
        for r, e in enumerate(doc["upstream"], 1):
            lines.append(f"{r:>4}  {e['layer']:>5}  {e['feature']:>7}  {e['kind']:<15}  {e['weight']:>10.4f}  "
                         f"{path_label(e)}")
    else:
        lines.append("no upstream features: no dictionary writes before this one reads")
    if doc["tokens"]:
        lines.append("top input tokens (de-embedding): " + ", ".join(
            f"{e['token']!r} {e['weight']:.3f}" for e in doc["tokens"]))
    for s in doc.get("skipped_sources", []):
        lines.append(f"skipped {s}: weight-only attribution does not place it in the forward pass")
    return "\n".join(lines)


def upstream_file(run: str | Path, layer: int, feature: int, *, overwrite: bool = False) -> Path:
    """``RUN/upstream/L06_F123.json``; ConfigError if it exists and ``overwrite`` is False."""
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"run folder '{run}' does not exist; expected a folder of trained dictionaries")
    dest = run / "upstream" / f"L{layer:02d}_F{feature}.json"
    if dest.exists() and not overwrite:
        raise ConfigError(f"'{dest}' already exists; pass --overwrite to replace it")
    return dest


def write_upstream(dest: str | Path, doc: dict) -> Path:
    from ..dictionary.io import atomic_write_text

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return dest
