"""The feature page's upstream panel: which features of earlier dictionaries drive a feature, by weights
alone (no prompt is run), and which input tokens drive each of them and the feature itself.

For a target feature ``f`` of the dictionary at layer L, every feature ``i`` of each dictionary at a
layer before L is scored by its virtual weight into ``f`` (see :mod:`sparsetrace.attribute.weights`):

* ``direct``: through the residual stream, ``W_enc[f] . N_mlp(W_dec[i])``;
* ``OV``: through one attention head h of a layer between them (the head attending fully to the
  source's position), ``W_enc[f] . N_mlp(W_O^h W_V^h N_attn(W_dec[i]))``.

``N`` is each norm's weight (and centring); its per-token scale is left out, so the scores are exact up
to one positive scalar per norm, the same for every source through the same path. The top ``k`` by
``|score|`` across all paths are kept. Each one, and the target itself, gets its de-embedding: the
tokens whose embedding drives it directly (``W_E[v] . N^T W_enc[i]``).

The work is bounded: dictionaries and the model are loaded once per run, and features are processed
until ``budget_s`` seconds have passed; the rest of the pages say that the panel was not computed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attribute.weights import _check_order, feature_input_tokens, head_ov, norm_linear, virtual_weights
from ..dictionary.io import find_dictionaries
from ..dictionary.load import load_dictionary
from ..dictionary.model import SparseDictionary
from ..errors import SparsetraceError
from ..model.adapter import LanguageModel

__all__ = ["add_upstream_panels", "upstream_panels"]

#: upstream features listed per feature page
TOP_K = 8
#: de-embedding tokens shown per feature
N_TOKENS = 6
#: default wall-clock budget for one run's panels (seconds, model loading included)
BUDGET_S = 60.0


def _load(run_dir: Path, warn: Callable[[str], None]) -> list[SparseDictionary]:
    try:
        paths = find_dictionaries(run_dir)
    except SparsetraceError:
        return []
    out = []
    for p in paths:
        try:
            out.append(load_dictionary(p))
        except (SparsetraceError, OSError, ValueError, RuntimeError) as exc:
            warn(f"upstream panel: dictionary {p.name} not used ({str(exc)[:160]})")
    return out


def _tokens(lm: LanguageModel, d: SparseDictionary, feature: int, cache: dict) -> list[list]:
    key = (id(d), feature)
    if key not in cache:
        cache[key] = [[t, round(float(s), 4)] for t, s in feature_input_tokens(lm, d, feature, k=N_TOKENS)]
    return cache[key]


@torch.no_grad()
def _ov_scores(lm: LanguageModel, attn_layer: int, src: SparseDictionary, u_tgt: torch.Tensor,
               heads: dict) -> torch.Tensor:
    """Virtual weights through each head of ``attn_layer`` for the target reader rows ``u_tgt`` [k, d]
    (already through the target's norm): [k, H, n_src]. Same quantity as ``ov_virtual_weights``, for
    several targets at once."""
    if attn_layer not in heads:
        W_V, W_O = head_ov(lm, attn_layer)
        gamma, centred = norm_linear(lm, attn_layer, "attn")
        heads[attn_layer] = (W_V, W_O, gamma, centred)
    W_V, W_O, gamma, centred = heads[attn_layer]
    uh = torch.einsum("hdk,fd->fhk", W_O, u_tgt)  # W_O^T u per head
    uh = torch.einsum("hkd,fhk->fhd", W_V, uh)  # W_V^T (.)
    uh = uh * gamma
    if centred:
        uh = uh - uh.mean(-1, keepdim=True)
    return uh @ src.W_dec.detach().float().t()


def _target_rows(lm: LanguageModel, tgt: SparseDictionary, feats: list[int]) -> torch.Tensor:
    u = tgt.W_enc.detach()[torch.tensor(feats)].float()
    if tgt.cfg.kind == "sae":
        return u
    gamma, centred = norm_linear(lm, tgt.cfg.layer, "mlp")
    u = u * gamma
    return u - u.mean(-1, keepdim=True) if centred else u


def _panels_for_layer(lm, tgt, sources, feats, cache, heads) -> dict[int, dict]:
    """Panels for ``feats`` of ``tgt``: {feature: panel}."""
    cands: list[tuple[torch.Tensor, SparseDictionary, str]] = []  # ([k, n_src] scores, source, path)
    for src in sources:
        try:
            direct = virtual_weights(src, tgt, feats, lm=lm)  # [k, n_src]
        except SparsetraceError:
            continue  # the source does not write before the target reads
        cands.append((direct, src, "direct"))
        u = _target_rows(lm, tgt, feats)
        for a in range(src.cfg.layer, tgt.cfg.layer + 1):
            try:
                _check_order(src, tgt, lm.arch.parallel_residual, via_attn=a)
            except SparsetraceError:
                continue  # attention layer a does not lie between the source's write and the target's read
            ov = _ov_scores(lm, a, src, u, heads)  # [k, H, n_src]
            for h in range(ov.shape[1]):
                cands.append((ov[:, h], src, f"L{a} attention head {h} (OV)"))
    out = {}
    for row, f in enumerate(feats):
        best: list[tuple[float, SparseDictionary, str, int]] = []
        for scores, src, path in cands:
            s = scores[row]
            v, i = s.abs().topk(min(TOP_K, s.numel()))
            best += [(float(s[j]), src, path, int(j)) for j in i.tolist()]
        best.sort(key=lambda r: -abs(r[0]))
        out[f] = {
            "deembedding": _tokens(lm, tgt, f, cache),
            "features": [
                {
                    "layer": int(src.cfg.layer),
                    "kind": src.cfg.kind,
                    "feature": j,
                    "path": path,
                    "weight": round(w, 6),
                    "deembedding": _tokens(lm, src, j, cache),
                }
                for w, src, path, j in best[:TOP_K]
            ],
            "n_sources": len(sources),
        }
    return out


def upstream_panels(
    run_dir: Path,
    targets: dict[int, list[int]],
    *,
    warn: Callable[[str], None],
    budget_s: float = BUDGET_S,
    batch: int = 16,
    progress: bool = True,
) -> dict[tuple[int, int], dict]:
    """{(layer, feature): panel} for the ``targets`` ({layer: [features]}) of the run in ``run_dir``.

    Returns {} (with a warning) when the run has no dictionary weights or its model cannot be loaded.
    Stops when ``budget_s`` seconds have passed and warns how many panels were left out.
    """
    t0 = time.monotonic()
    total = sum(len(v) for v in targets.values())
    if not total:
        return {}
    dicts = _load(Path(run_dir), warn)
    by_layer = {}
    for d in sorted(dicts, key=lambda d: (d.cfg.layer, d.cfg.kind)):
        by_layer.setdefault(int(d.cfg.layer), d)
    todo = {L: fs for L, fs in targets.items() if L in by_layer}
    if not todo:
        return {}
    ids = sorted({d.cfg.model_id for d in dicts if d.cfg.model_id})
    if len(ids) != 1:
        warn(f"upstream panel not computed: the dictionaries record model(s) {ids}; expected exactly one")
        return {}
    try:
        lm = LanguageModel.load(ids[0])
    except (SparsetraceError, OSError, ValueError, RuntimeError) as exc:
        warn(f"upstream panel not computed: cannot load model {ids[0]!r} ({str(exc)[:160]})")
        return {}
    out: dict[tuple[int, int], dict] = {}
    cache: dict = {}
    heads: dict = {}
    n_todo = sum(len(v) for v in todo.values())
    bar = tqdm(total=n_todo, desc="upstream panels", unit="feature", disable=not progress, leave=False)
    try:
        for L in sorted(todo):
            tgt = by_layer[L]
            sources = [d for d in dicts if d.cfg.layer < L]
            feats = sorted(f for f in todo[L] if 0 <= f < tgt.n_features)
            for c in range(0, len(feats), batch):
                if time.monotonic() - t0 > budget_s:
                    warn(f"upstream panel computed for {len(out)} of {n_todo} features within its "
                         f"{budget_s:g} s budget; the other feature pages say so")
                    return out
                part = feats[c : c + batch]
                for f, panel in _panels_for_layer(lm, tgt, sources, part, cache, heads).items():
                    out[(L, f)] = panel
                bar.update(len(part))
    finally:
        bar.close()
    return out


def add_upstream_panels(run_dir: Path, files: dict, *, warn: Callable[[str], None], budget_s: float = BUDGET_S) -> None:
    """Set ``dash["upstream"]`` (a panel, or None when not computed) in every dashboard of the report's
    feature data files ``files`` ({data file: (key "r{i}/L{layer}/c{k}", {feature: dashboard})})."""
    pages: dict[tuple[int, int], dict] = {}
    for key, part in files.values():
        m = re.fullmatch(r"r\d+/L(\d+)/c\d+", key)
        if m:
            for f, dash in part.items():
                pages[(int(m.group(1)), int(f))] = dash
    targets: dict[int, list[int]] = {}
    for layer, f in pages:
        targets.setdefault(layer, []).append(f)
    progress = os.environ.get("SPARSETRACE_NO_PROGRESS") != "1"
    panels = upstream_panels(run_dir, targets, warn=warn, budget_s=budget_s, progress=progress)
    for lf, dash in pages.items():
        dash["upstream"] = panels.get(lf)
