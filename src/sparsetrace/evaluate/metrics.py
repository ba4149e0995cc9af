"""Evaluating dictionaries against the real model on held-out text.

Per dictionary: MSE, FVU, L0, dead fraction (never fires on the eval set), dense fraction (fires on
>10% of tokens), CE loss with the dictionary spliced in, CE loss recovered relative to zero-ablation
and to mean-ablation of the same hookpoint (both reported), and KL(clean ‖ spliced).

Substitution: the CE loss with the first k trained layers substituted at once, k = 1..n, which
measures how reconstruction error accumulates across layers (the seed's central limitation).

The BOS position is never spliced: dictionaries are not trained on it (its activations are outliers
in most models) and the model's own value is kept there in every condition, clean included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..dictionary.io import check_matches_model
from ..dictionary.model import SparseDictionary
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint

DENSE_THRESHOLD = 0.1


@dataclass
class _Accum:
    n_tokens: int = 0
    sq_err: float = 0.0
    sum_y: Tensor | None = None
    sum_y2: float = 0.0
    l0_sum: float = 0.0
    fire_count: Tensor | None = None


def _in_out(d: SparseDictionary) -> tuple[Hookpoint, Hookpoint]:
    return Hookpoint(d.cfg.hookpoint_in, d.cfg.layer), Hookpoint(d.cfg.hookpoint_out, d.cfg.layer)


def _ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-window mean next-token CE [batch]."""
    lp = logits[:, :-1].float().log_softmax(-1)
    return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)


def _kl(clean_logits: Tensor, logits: Tensor) -> Tensor:
    p = clean_logits.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean(-1)  # [batch]


def _splice(d: SparseDictionary, inputs: dict[Hookpoint, Tensor], skip: int) -> Callable[[Tensor], Tensor]:
    hp_in, _ = _in_out(d)

    def fn(x_out: Tensor) -> Tensor:
        x_in = inputs[hp_in] if hp_in in inputs else x_out
        new = x_out.clone()
        new[:, skip:] = d(x_in[:, skip:]).to(x_out.dtype)
        return new

    return fn


def _const(value: Tensor | float, skip: int) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        new = x.clone()
        new[:, skip:] = value
        return new

    return fn


@torch.no_grad()
def evaluate(
    lm: LanguageModel,
    dictionaries: list[SparseDictionary],
    windows: Tensor,
    *,
    batch_windows: int = 8,
    substitution: bool = True,
    progress: bool = True,
) -> dict:
    """Evaluate ``dictionaries`` on held-out ``windows`` [n, ctx]. Returns the eval.json dict."""
    for d in dictionaries:
        check_matches_model(d, lm.model_id, lm.d_model, lm.n_layers)
    dictionaries = sorted(dictionaries, key=lambda d: d.cfg.layer)
    skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
    device = lm.device
    for d in dictionaries:
        d.to(device).eval()
    read = sorted({h for d in dictionaries for h in _in_out(d)}, key=lambda h: (h.layer, h.name))

    # pass 1: means of every output hookpoint (for mean-ablation)
    sums: dict[Hookpoint, Tensor] = {}
    count = 0
    for s in range(0, len(windows), batch_windows):
        ids = windows[s : s + batch_windows].to(device)
        out = lm.run(ids, read=read, stop_after=max(h.layer for h in read))
        for h in read:
            x = out.acts[h][:, skip:].reshape(-1, out.acts[h].shape[-1]).double()
            sums[h] = sums.get(h, 0) + x.sum(0)
        count += ids.shape[0] * (ids.shape[1] - skip)
    means = {h: (v / count).float() for h, v in sums.items()}

    acc = {id(d): _Accum() for d in dictionaries}
    ce = {"clean": [], **{f"{d.cfg.layer}:{k}": [] for d in dictionaries for k in ("spliced", "zero", "mean")}}
    kl: dict[str, list] = {f"{d.cfg.layer}": [] for d in dictionaries}
    subst_ce: dict[int, list] = {k: [] for k in range(1, len(dictionaries) + 1)}
    subst_kl: dict[int, list] = {k: [] for k in range(1, len(dictionaries) + 1)}
    subst_zero: list = []
    n_batches = -(-len(windows) // batch_windows)
    bar = tqdm(total=n_batches, desc="evaluate", disable=not progress, leave=False)
    for s in range(0, len(windows), batch_windows):
        ids = windows[s : s + batch_windows].to(device)
        clean = lm.run(ids, read=read)
        ce["clean"].append(_ce(clean.logits, ids))
        for d in dictionaries:
            hp_in, hp_out = _in_out(d)
            x = clean.acts[hp_in][:, skip:].reshape(-1, d.cfg.d_in)
            y = clean.acts[hp_out][:, skip:].reshape(-1, d.cfg.d_out)
            f = d.features(x)
            y_hat = d.decode(f, x)
            a = acc[id(d)]
            a.n_tokens += x.shape[0]
            a.sq_err += float((y_hat - y).double().pow(2).sum())
            a.sum_y = y.double().sum(0) if a.sum_y is None else a.sum_y + y.double().sum(0)
            a.sum_y2 += float(y.double().pow(2).sum())
            a.l0_sum += float((f > 0).sum())
            fired = (f > 0).sum(0).to(torch.long)
            a.fire_count = fired if a.fire_count is None else a.fire_count + fired
            # spliced / ablated forwards; the input hookpoint comes from the same (spliced) forward
            store: dict[Hookpoint, Tensor] = {}
            for key, fn in (
                ("spliced", _splice(d, store, skip)),
                ("zero", _const(0.0, skip)),
                ("mean", _const(means[hp_out], skip)),
            ):
                with lm.hooks(read=[hp_in] if hp_in != hp_out else [], edit={hp_out: fn}, store=store):
                    logits = lm.model(input_ids=ids, use_cache=False).logits
                ce[f"{d.cfg.layer}:{key}"].append(_ce(logits, ids))
                if key == "spliced":
                    kl[f"{d.cfg.layer}"].append(_kl(clean.logits, logits))
        if substitution and len(dictionaries) > 1:
            for k in range(1, len(dictionaries) + 1):
                subset = dictionaries[:k]
                store = {}
                edits = {_in_out(d)[1]: _splice(d, store, skip) for d in subset}
                reads = [_in_out(d)[0] for d in subset if _in_out(d)[0] != _in_out(d)[1]]
                with lm.hooks(read=reads, edit=edits, store=store):
                    logits = lm.model(input_ids=ids, use_cache=False).logits
                subst_ce[k].append(_ce(logits, ids))
                subst_kl[k].append(_kl(clean.logits, logits))
            edits = {_in_out(d)[1]: _const(0.0, skip) for d in dictionaries}
            with lm.hooks(edit=edits):
                logits = lm.model(input_ids=ids, use_cache=False).logits
            subst_zero.append(_ce(logits, ids))
        bar.update(1)
    bar.close()

    def mean(xs: list) -> float:
        return float(torch.cat(xs).mean()) if xs else float("nan")

    ce_clean = mean(ce["clean"])
    results = []
    for d in dictionaries:
        a = acc[id(d)]
        var = a.sum_y2 - float((a.sum_y**2).sum()) / a.n_tokens
        density = a.fire_count.float() / a.n_tokens
        spliced, zero, meanabl = (mean(ce[f"{d.cfg.layer}:{k}"]) for k in ("spliced", "zero", "mean"))
        hp_in, hp_out = _in_out(d)
        results.append(
            {
                "layer": d.cfg.layer,
                "kind": d.cfg.kind,
                "activation": d.cfg.activation,
                "hookpoint_in": str(hp_in),
                "hookpoint_out": str(hp_out),
                "n_features": d.n_features,
                "l0": a.l0_sum / a.n_tokens,
                "mse": a.sq_err / (a.n_tokens * d.cfg.d_out),
                "fvu": a.sq_err / max(var, 1e-12),
                "dead_frac": float((a.fire_count == 0).float().mean()),
                "dense_frac": float((density > DENSE_THRESHOLD).float().mean()),
                "ce_clean": ce_clean,
                "ce_spliced": spliced,
                "ce_zero_ablation": zero,
                "ce_mean_ablation": meanabl,
                "ce_recovered_vs_zero": _recovered(ce_clean, spliced, zero),
                "ce_recovered_vs_mean": _recovered(ce_clean, spliced, meanabl),
                "kl": mean(kl[f"{d.cfg.layer}"]),
                "n_tokens": a.n_tokens,
            }
        )
    subst = []
    if substitution and len(dictionaries) > 1:
        zero_all = mean(subst_zero)
        for k in range(1, len(dictionaries) + 1):
            c = mean(subst_ce[k])
            subst.append(
                {
                    "n_layers": k,
                    "layers": [d.cfg.layer for d in dictionaries[:k]],
                    "ce_loss": c,
                    "ce_increase": c - ce_clean,
                    "kl": mean(subst_kl[k]),
                    "ce_recovered_vs_zero": _recovered(ce_clean, c, zero_all) if k == len(dictionaries) else None,
                }
            )
    return {
        "model": lm.model_id,
        "clean_ce": ce_clean,
        "n_windows": int(len(windows)),
        "ce_recovered_definition": "(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); 'zero' replaces the "
        "output hookpoint with zeros, 'mean' with its mean over the eval tokens",
        "dictionaries": results,
        "substitution": subst,
    }


def _recovered(clean: float, spliced: float, ablated: float) -> float:
    denom = ablated - clean
    if abs(denom) < 1e-9:
        return float("nan")
    return (ablated - spliced) / denom
