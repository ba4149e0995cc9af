"""Feature dashboards in one pass over a corpus, with bounded memory.

>>> dash = compute_dashboards(lm, dictionary, windows, features=[3, 17, 42])
>>> write_dashboards(run_dir, dictionary.cfg.layer, dash)

The model runs only up to the dictionary's layer (``stop_after``). For each requested feature a
:class:`DashboardState` keeps fixed-size tensors that do not grow with the corpus:

- running top-k windows by the feature's maximum activation in the window (window index, where the
  trimmed excerpt starts, and the per-token activations of that excerpt only), merged per batch with
  one ``topk`` over ``[features, k + batch]``;
- an activation histogram over fixed log-spaced bins (``torch.bucketize`` + ``bincount``) and firing
  counts (density = firing tokens / tokens);
- uniform samples of windows per coarse activation bin (a seeded bottom-k-by-random-key reservoir,
  merged per batch with two stable sorts), from which ``n_quantile_bins`` quantile groups are drawn
  at the end, weighted by how many windows each coarse bin saw.

Afterwards the weight-based views are added (from :mod:`sparsetrace.attribute.weights`): promoted /
suppressed output tokens (``W_dec[f]`` through the final norm's weight and the unembedding), top input
tokens (token embeddings through the norm in front of the dictionary's input and ``W_enc[f]``) and
nearest features by decoder cosine. The running statistics are :class:`.dashboard_state.DashboardState`;
the writer is :func:`.writer.write_dashboards`; measured (steered) output effects are
:func:`.steered.add_steered_logits`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attribute.weights import deembedding_matrix, logit_effect_matrix
from ..errors import DataError
from ..model.hookpoints import Hookpoint
from ..model.prefix_cache import harvest
from .dashboard_state import DashboardState
from .text import TokenText, example, rnd

__all__ = ["DashboardState", "compute_dashboards", "encode_subset", "finish_dashboards"]


def encode_subset(dictionary, x: Tensor, feats: Tensor | None) -> Tensor:
    """Dense activations [batch, len(feats)] of the requested features only.

    Elementwise activations (ReLU, JumpReLU, BatchTopK at inference) are computed from the requested
    encoder rows alone; TopK needs every pre-activation, so it encodes fully and selects.
    """
    cfg = dictionary.cfg
    if feats is None:
        return dictionary.features(x)
    act = cfg.activation
    if act == "topk" or (act == "batchtopk" and dictionary.training):
        return dictionary.features(x)[:, feats]
    pre = torch.addmm(dictionary.b_enc[feats], x, dictionary.W_enc[feats].t())
    if act == "relu":
        return F.relu(pre)
    if act == "jumprelu":
        return pre * (pre > dictionary.threshold[feats])
    return pre * (pre > dictionary.batch_threshold)


@torch.no_grad()
def compute_dashboards(
    lm,
    dictionary,
    windows: Tensor,
    features: list[int] | None = None,
    *,
    n_top: int = 20,
    n_quantile_bins: int = 4,
    per_bin: int = 5,
    batch_windows: int = 16,
    width: int = 24,
    n_logits: int = 10,
    n_inputs: int = 10,
    n_neighbors: int = 10,
    hist_range: tuple[float, float] = (1e-3, 1e3),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, dict]:
    """Dashboards for ``features`` (all when None) of ``dictionary`` over token ``windows`` [n, ctx].

    Returns {feature: dashboard dict} in the format of ``docs/formats.md``. Positions holding the BOS
    token are excluded (their activations are outliers in most models).
    """
    if windows.dim() != 2 or windows.numel() == 0:
        raise DataError(f"windows must be a non-empty [n_windows, context] tensor, got shape {list(windows.shape)}")
    cfg = dictionary.cfg
    n = dictionary.n_features
    if features is None:
        features = list(range(n))
    features = [int(f) for f in features]
    bad = [f for f in features if not (0 <= f < n)]
    if bad:
        raise DataError(f"features {bad[:5]} are out of range; this dictionary has {n} features")
    if len(set(features)) != len(features):
        raise DataError("features contains duplicates")
    feats = torch.tensor(features, dtype=torch.long)
    hp = Hookpoint(cfg.hookpoint_in, cfg.layer)
    state = DashboardState(len(features), n_top=n_top, width=width, per_bin=per_bin, hist_range=hist_range, seed=seed)
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    dictionary = dictionary.eval()
    dev = lm.device
    dict_dtype = dictionary.W_enc.dtype
    t0 = time.perf_counter()
    n_w = windows.shape[0]
    for s in range(0, n_w, batch_windows):
        ids = windows[s : s + batch_windows]
        x = harvest(lm, ids.to(dev), hp)
        B, T, d = x.shape
        a = encode_subset(dictionary, x.reshape(-1, d).to(dict_dtype), feats).float().cpu().view(B, T, -1)
        valid = ids != bos if bos is not None else torch.ones_like(ids, dtype=torch.bool)
        a = a * valid.unsqueeze(-1)
        state.update(a, valid, torch.arange(s, s + B))
        if progress is not None:
            progress(min(s + batch_windows, n_w), n_w)
    harvest_s = time.perf_counter() - t0
    return finish_dashboards(
        lm, dictionary, windows, features, state,
        n_quantile_bins=n_quantile_bins, per_bin=per_bin, n_logits=n_logits, n_inputs=n_inputs,
        n_neighbors=n_neighbors, seed=seed, harvest_seconds=harvest_s,
    )


@torch.no_grad()
def finish_dashboards(
    lm,
    dictionary,
    windows: Tensor,
    features: list[int],
    state: DashboardState,
    *,
    n_quantile_bins: int = 4,
    per_bin: int = 5,
    n_logits: int = 10,
    n_inputs: int = 10,
    n_neighbors: int = 10,
    seed: int = 0,
    harvest_seconds: float | None = None,
) -> dict[int, dict]:
    """Turn harvested statistics into dashboard dicts (adds the weight-based views)."""
    cfg = dictionary.cfg
    feats = torch.tensor(features, dtype=torch.long)
    text = TokenText(lm.tokenizer)
    gen = torch.Generator().manual_seed(seed + 1)
    W_dec = dictionary.W_dec.detach().float().cpu()
    # neighbours by decoder cosine
    dn = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    k_nb = min(n_neighbors + 1, dictionary.n_features)
    nb_val, nb_idx = [], []
    for c in range(0, len(features), 512):
        sims = dn[feats[c : c + 512]] @ dn.t()
        v, i = sims.topk(k_nb, dim=1)
        nb_val.append(v)
        nb_idx.append(i)
    nb_val, nb_idx = torch.cat(nb_val), torch.cat(nb_idx)
    # logit effects and de-embedding (attribute.weights), in chunks to bound the [chunk, vocab] temporaries
    lt_v, lt_i, lb_v, lb_i, in_v, in_i = [], [], [], [], [], []
    for c in range(0, len(features), 256):
        sub = feats[c : c + 256]
        eff = logit_effect_matrix(lm, W_dec[sub]).cpu()
        v, i = eff.topk(n_logits, dim=1)
        lt_v.append(v)
        lt_i.append(i)
        v, i = eff.topk(n_logits, dim=1, largest=False)
        lb_v.append(v)
        lb_i.append(i)
        de = deembedding_matrix(lm, dictionary, sub).cpu()
        v, i = de.topk(n_inputs, dim=1)
        in_v.append(v)
        in_i.append(i)
    lt_v, lt_i, lb_v, lb_i = torch.cat(lt_v), torch.cat(lt_i), torch.cat(lb_v), torch.cat(lb_i)
    in_v, in_i = torch.cat(in_v), torch.cat(in_i)

    n_tok = max(state.n_tokens, 1)
    out: dict[int, dict] = {}
    for i, f in enumerate(features):
        n_fire = int(state.n_fire[i])
        hist = state.hist[i]
        nzb = hist.nonzero().flatten()
        if nzb.numel():
            b0, b1 = int(nzb[0]), int(nzb[-1]) + 1
            edges = [rnd(float(e)) for e in state.hist_edges[b0 : b1 + 1]]
            counts = [int(c) for c in hist[b0:b1]]
        else:
            edges, counts = [], []
        top = []
        for j in range(state.n_top):
            if not math.isfinite(float(state.top_val[i, j])) or int(state.top_win[i, j]) < 0:
                break
            top.append(
                example(text, windows, int(state.top_win[i, j]), int(state.top_start[i, j]), state.top_acts[i, j], state.width)
            )
        quant = []
        for g in state.quantile_groups(i, n_quantile_bins, per_bin, gen):
            exs = [
                example(text, windows, int(state.res_win[e]), int(state.res_start[e]), state.res_acts[e], state.width)
                for e in g["entries"]
            ]
            quant.append({"range": [rnd(g["range"][0]), rnd(g["range"][1])], "n_windows": g["n_windows"], "examples": exs})
        nbs = [
            [int(j), rnd(float(v))]
            for v, j in zip(nb_val[i].tolist(), nb_idx[i].tolist(), strict=True)
            if int(j) != f
        ][:n_neighbors]
        out[f] = {
            "layer": int(cfg.layer),
            "feature": f,
            "hookpoint_in": f"{cfg.hookpoint_in}.{cfg.layer}",
            "hookpoint_out": f"{cfg.hookpoint_out}.{cfg.layer}",
            "label": None,
            "verdict": None,
            "density": n_fire / n_tok,
            "max_act": rnd(float(state.max_act[i])),
            "mean_act": rnd(float(state.sum_act[i]) / n_fire) if n_fire else 0.0,
            "n_tokens": state.n_tokens,
            "n_windows": state.n_windows,
            "histogram": {"edges": edges, "counts": counts, "n_zero": state.n_tokens - n_fire},
            "top_examples": top,
            "quantile_examples": quant,
            "top_logits": [[s, rnd(v)] for s, v in zip(text(lt_i[i].tolist()), lt_v[i].tolist(), strict=True)],
            "bottom_logits": [[s, rnd(v)] for s, v in zip(text(lb_i[i].tolist()), lb_v[i].tolist(), strict=True)],
            "top_logit_ids": lt_i[i].tolist(),
            "bottom_logit_ids": lb_i[i].tolist(),
            "top_inputs": [[s, rnd(v)] for s, v in zip(text(in_i[i].tolist()), in_v[i].tolist(), strict=True)],
            "top_input_ids": in_i[i].tolist(),
            "neighbors": nbs,
        }
        if harvest_seconds is not None:
            out[f]["harvest_seconds"] = round(harvest_seconds, 2)
    return out
