"""Evaluating dictionaries against the real model on held-out text.

Per dictionary: MSE, FVU, L0, dead fraction (never fired over the last pass of the training stream,
as counted during training; over the evaluation tokens for dictionaries saved without those counts),
dense fraction (fires on >10% of evaluation tokens), CE loss with the dictionary spliced in, CE loss
recovered relative to zero-ablation and to mean-ablation of the same hookpoint (the mean over the
training activations, saved beside the dictionary), and KL(clean ‖ spliced). FVU and L0 are also
given before the final L0 calibration when training saved the encoder bias it left. Every figure has
a seeded 95% bootstrap interval over windows (``<key>_ci``, see :mod:`.bootstrap`).

Speed: each splice and ablation starts from the clean residual entering the dictionary's layer
(:func:`sparsetrace.model.suffix.start_at`, exact: the layers below are not touched by the splice), so
a splice at layer l costs L - l layers and the LM head, not a whole forward pass. ``per_layer_ce=False``
skips them altogether (FVU, L0, dead, dense and MSE still come from the one clean pass per batch):
``sparsetrace evaluate`` does that for runs whose transcoders replace every MLP, where the full
replacement is evaluated instead (:mod:`.replacement`) and 3 x 30 splices would dominate the time.

Substitution: the CE loss with the first k trained layers substituted at once, k = 1..n, which
measures how reconstruction error accumulates across layers (the seed's central limitation).

The BOS position is never spliced: dictionaries are not trained on it (its activations are outliers
in most models) and the model's own value is kept there in every condition, clean included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..dictionary.io import check_matches_model
from ..dictionary.model import SparseDictionary
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint
from ..model.suffix import start_at
from .bootstrap import LEVEL, interval, resample_counts

DENSE_THRESHOLD = 0.1


@dataclass
class _Accum:
    """Per-window sums for one dictionary (lists of [batch] / [batch, d] tensors, one entry per batch)."""

    sq_err: list = field(default_factory=list)
    sum_y: list = field(default_factory=list)
    sum_y2: list = field(default_factory=list)
    l0: list = field(default_factory=list)
    n: list = field(default_factory=list)
    sq_err_pre: list = field(default_factory=list)  # before the L0 calibration
    l0_pre: list = field(default_factory=list)
    fire_count: Tensor | None = None

    def add(self, y_hat: Tensor, y: Tensor, f: Tensor, pre: tuple[Tensor, Tensor] | None) -> None:
        """y_hat, y: [b, t, d]; f: [b, t, n_features]; pre: (y_hat, f) before calibration."""
        self.sq_err.append((y_hat - y).double().pow(2).sum((1, 2)))
        self.sum_y.append(y.double().sum(1))
        self.sum_y2.append(y.double().pow(2).sum((1, 2)))
        self.l0.append((f > 0).sum((1, 2)).double())
        self.n.append(torch.full((y.shape[0],), float(y.shape[1]), dtype=torch.float64))
        if pre is not None:
            self.sq_err_pre.append((pre[0] - y).double().pow(2).sum((1, 2)))
            self.l0_pre.append((pre[1] > 0).sum((1, 2)).double())
        fired = (f > 0).sum((0, 1)).to(torch.long)
        self.fire_count = fired if self.fire_count is None else self.fire_count + fired

    def stacked(self) -> dict[str, Tensor]:
        return {k: torch.cat([t.cpu() for t in getattr(self, k)]) for k in
                ("sq_err", "sum_y", "sum_y2", "l0", "n", "sq_err_pre", "l0_pre") if getattr(self, k)}


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


def _eval_means(lm: LanguageModel, windows: Tensor, hps: list[Hookpoint], batch_windows: int, skip: int
                ) -> dict[Hookpoint, Tensor]:
    """Means of ``hps`` over the evaluation windows (the fallback mean-ablation reference)."""
    sums: dict[Hookpoint, Tensor] = {}
    count = 0
    for s in range(0, len(windows), batch_windows):
        ids = windows[s : s + batch_windows].to(lm.device)
        out = lm.run(ids, read=hps, stop_after=max(h.layer for h in hps))
        for h in hps:
            x = out.acts[h][:, skip:].reshape(-1, out.acts[h].shape[-1]).double()
            sums[h] = sums.get(h, 0) + x.sum(0)
        count += ids.shape[0] * (ids.shape[1] - skip)
    return {h: (v / count).float() for h, v in sums.items()}


def _pre_calibration(d: SparseDictionary, ref: dict) -> SparseDictionary | None:
    """A copy of ``d`` with the encoder bias (and JumpReLU thresholds) that training left before the L0
    calibration; None when they were not saved or the calibration changed nothing."""
    b_enc, thr = ref.get("b_enc_before_calibration"), ref.get("threshold_before_calibration")
    if b_enc is None:
        return None
    same_b = torch.equal(b_enc.to(d.b_enc.device, d.b_enc.dtype), d.b_enc.detach())
    same_t = thr is None or d.log_threshold is None or torch.allclose(
        thr.to(d.log_threshold.device).log(), d.log_threshold.detach(), rtol=0, atol=1e-6)
    if same_b and same_t:
        return None
    import copy

    pre = copy.deepcopy(d)
    with torch.no_grad():
        pre.b_enc.copy_(b_enc.to(pre.b_enc.device, pre.b_enc.dtype))
        if thr is not None and pre.log_threshold is not None:
            pre.log_threshold.copy_(thr.to(pre.log_threshold.device).clamp_min(1e-12).log())
    return pre


@torch.no_grad()
def evaluate(
    lm: LanguageModel,
    dictionaries: list[SparseDictionary],
    windows: Tensor,
    *,
    batch_windows: int = 8,
    substitution: bool = True,
    progress: bool = True,
    references: list[dict | None] | None = None,
    seed: int = 0,
    per_layer_ce: bool = True,
) -> dict:
    """Evaluate ``dictionaries`` on held-out ``windows`` [n, ctx]. Returns the eval.json dict.

    ``references`` (parallel to ``dictionaries``): what training saved beside each dictionary,
    ``target_mean`` (mean-ablation reference from training activations) and ``b_enc_before_calibration``;
    without a training mean the mean over the evaluation windows is used, and the result says so.
    Every figure gets a seeded 95% bootstrap interval over windows (``<key>_ci``).
    """
    for d in dictionaries:
        check_matches_model(d, lm.model_id, lm.d_model, lm.n_layers)
    refs = list(references) if references is not None else [None] * len(dictionaries)
    order = sorted(range(len(dictionaries)), key=lambda i: dictionaries[i].cfg.layer)
    dictionaries = [dictionaries[i] for i in order]
    refs = [refs[i] or {} for i in order]
    skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
    device = lm.device
    for d in dictionaries:
        d.to(device).eval()
    read = sorted({h for d in dictionaries for h in _in_out(d)}, key=lambda h: (h.layer, h.name))
    starts = sorted({Hookpoint("resid_pre", d.cfg.layer) for d in dictionaries}, key=lambda h: h.layer)
    read_clean = sorted(set(read) | (set(starts) if per_layer_ce else set()), key=lambda h: (h.layer, h.name))
    notes: list[str] = []

    # mean-ablation references: the training mean saved with the dictionary, else the evaluation mean
    missing = [d for d, r in zip(dictionaries, refs, strict=True) if r.get("target_mean") is None and per_layer_ce]
    fallback = _eval_means(lm, windows, sorted({_in_out(d)[1] for d in missing}, key=str), batch_windows, skip) \
        if missing else {}
    means, mean_source = [], []
    for d, r in zip(dictionaries, refs, strict=True):
        if r.get("target_mean") is not None or not per_layer_ce:
            means.append(r["target_mean"].to(device).float() if r.get("target_mean") is not None else None)
            mean_source.append("training" if r.get("target_mean") is not None else "none (per-layer CE skipped)")
        else:
            means.append(fallback[_in_out(d)[1]])
            mean_source.append("evaluation windows")
            notes.append(f"layer {d.cfg.layer}: no training mean saved with this dictionary (trained before "
                         f"they were recorded); mean-ablation uses the mean over the evaluation windows")
    pre_dicts = [_pre_calibration(d, r) for d, r in zip(dictionaries, refs, strict=True)]

    acc = [_Accum() for _ in dictionaries]
    ce = {"clean": [], **{f"{i}:{k}": [] for i in range(len(dictionaries)) for k in ("spliced", "zero", "mean")}}
    kl: dict[int, list] = {i: [] for i in range(len(dictionaries))}
    subst_ce: dict[int, list] = {k: [] for k in range(1, len(dictionaries) + 1)}
    subst_kl: dict[int, list] = {k: [] for k in range(1, len(dictionaries) + 1)}
    subst_zero: list = []
    n_batches = -(-len(windows) // batch_windows)
    bar = tqdm(total=n_batches, desc="evaluate", disable=not progress, leave=False)
    for s in range(0, len(windows), batch_windows):
        ids = windows[s : s + batch_windows].to(device)
        clean = lm.run(ids, read=read_clean)
        ce["clean"].append(_ce(clean.logits, ids))
        for i, d in enumerate(dictionaries):
            hp_in, hp_out = _in_out(d)
            b, t = ids.shape[0], ids.shape[1] - skip
            x = clean.acts[hp_in][:, skip:].reshape(-1, d.cfg.d_in)
            y = clean.acts[hp_out][:, skip:].reshape(b, t, d.cfg.d_out)
            f = d.features(x)
            y_hat = d.decode(f, x).reshape(b, t, -1)
            pre = None
            if pre_dicts[i] is not None:
                f0 = pre_dicts[i].features(x)
                pre = (pre_dicts[i].decode(f0, x).reshape(b, t, -1), f0.reshape(b, t, -1))
            acc[i].add(y_hat, y, f.reshape(b, t, -1), pre)
            if not per_layer_ce:
                continue
            # spliced / ablated forwards from the clean residual entering the layer; the input hookpoint
            # comes from the same (spliced) forward
            store: dict[Hookpoint, Tensor] = {}
            resid = clean.acts[Hookpoint("resid_pre", d.cfg.layer)]
            for key, fn in (
                ("spliced", _splice(d, store, skip)),
                ("zero", _const(0.0, skip)),
                ("mean", _const(means[i], skip)),
            ):
                with start_at(lm, d.cfg.layer, resid), \
                        lm.hooks(read=[hp_in] if hp_in != hp_out else [], edit={hp_out: fn}, store=store):
                    logits = lm.model(input_ids=ids, use_cache=False).logits
                ce[f"{i}:{key}"].append(_ce(logits, ids))
                if key == "spliced":
                    kl[i].append(_kl(clean.logits, logits))
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

    def cat(xs: list) -> Tensor:
        return torch.cat([x.cpu() for x in xs]).double()

    n_w = len(windows)
    counts = resample_counts(n_w, seed=seed)
    ce_clean_w = cat(ce["clean"])
    results = []
    for i, d in enumerate(dictionaries):
        a = acc[i].stacked()
        per_window = {"clean": ce_clean_w, **a}
        if per_layer_ce:
            per_window.update({"spliced": cat(ce[f"{i}:spliced"]), "zero": cat(ce[f"{i}:zero"]),
                               "mean": cat(ce[f"{i}:mean"]), "kl": cat(kl[i])})
        point = _figures(torch.ones(1, n_w, dtype=torch.float64), per_window)
        boot = _figures(counts, per_window)
        fire = acc[i].fire_count.float()
        hp_in, hp_out = _in_out(d)
        row = {
            "layer": d.cfg.layer,
            "kind": d.cfg.kind,
            "activation": d.cfg.activation,
            "hookpoint_in": str(hp_in),
            "hookpoint_out": str(hp_out),
            "n_features": d.n_features,
            **{k: float(v[0]) for k, v in point.items()},
            "dead_frac_heldout": float((fire == 0).float().mean()),
            "dense_frac": float((fire / float(a["n"].sum()) > DENSE_THRESHOLD).float().mean()),
            "mean_ablation_reference": mean_source[i],
            "n_tokens": int(a["n"].sum()),
            "n_windows": n_w,
        }
        row["mse"] = float(a["sq_err"].sum()) / (row["n_tokens"] * d.cfg.d_out)
        if refs[i].get("fire_count") is not None:
            row["dead_frac"] = float((refs[i]["fire_count"] == 0).float().mean())
            row["dead_measured_on"] = f"training stream ({refs[i].get('stream_tokens', '?')} tokens)"
        else:
            row["dead_frac"] = row["dead_frac_heldout"]
            row["dead_measured_on"] = f"evaluation windows ({row['n_tokens']} tokens)"
            notes.append(f"layer {d.cfg.layer}: no training firing counts saved with this dictionary; "
                         f"'dead' is measured on the {row['n_tokens']} evaluation tokens")
        row.update({f"{k}_ci": interval(v) for k, v in boot.items()})
        results.append(row)
    subst = []
    if substitution and len(dictionaries) > 1:
        zero_all = float(cat(subst_zero).mean())
        ce_clean = float(ce_clean_w.mean())
        for k in range(1, len(dictionaries) + 1):
            c = float(cat(subst_ce[k]).mean())
            subst.append(
                {
                    "n_layers": k,
                    "layers": [d.cfg.layer for d in dictionaries[:k]],
                    "ce_loss": c,
                    "ce_increase": c - ce_clean,
                    "kl": float(cat(subst_kl[k]).mean()),
                    "ce_recovered_vs_zero": _recovered(ce_clean, c, zero_all) if k == len(dictionaries) else None,
                }
            )
    return {
        "model": lm.model_id,
        "clean_ce": float(ce_clean_w.mean()),
        "clean_ce_ci": interval(counts @ ce_clean_w / n_w),
        "n_windows": int(n_w),
        "ce_recovered_definition": "(CE_ablated - CE_spliced) / (CE_ablated - CE_clean); 'zero' replaces the "
        "output hookpoint with zeros, 'mean' with its mean over the training activations (the evaluation "
        "windows' mean for dictionaries saved without one; see mean_ablation_reference)",
        "interval_definition": f"{LEVEL:.0%} percentile bootstrap over windows, {counts.shape[0]} resamples, "
        f"seed {seed}",
        "notes": notes,
        "dictionaries": results,
        "substitution": subst,
    }


def _figures(w: Tensor, pw: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every reported figure from window weights ``w`` [B, n_windows] (ones: the sample itself; bootstrap
    counts: each resample) and per-window sums ``pw``. Returns [B] tensors."""
    n = w @ pw["n"]
    total = w.sum(-1)

    def mean(key: str) -> Tensor:
        return w @ pw[key] / total

    def fvu(sq: Tensor) -> Tensor:
        sum_y = w @ pw["sum_y"]
        var = w @ pw["sum_y2"] - (sum_y**2).sum(-1) / n
        return sq / var.clamp_min(1e-12)

    out = {"l0": w @ pw["l0"] / n, "fvu": fvu(w @ pw["sq_err"]), "ce_clean": mean("clean")}
    if "spliced" in pw:  # per-layer CE was measured
        clean, spliced, zero, mean_abl = mean("clean"), mean("spliced"), mean("zero"), mean("mean")
        out.update({
            "ce_spliced": spliced,
            "ce_zero_ablation": zero,
            "ce_mean_ablation": mean_abl,
            "ce_recovered_vs_zero": _recovered_t(clean, spliced, zero),
            "ce_recovered_vs_mean": _recovered_t(clean, spliced, mean_abl),
            "kl": mean("kl"),
        })
    if "sq_err_pre" in pw:
        out["fvu_before_calibration"] = fvu(w @ pw["sq_err_pre"])
        out["l0_before_calibration"] = w @ pw["l0_pre"] / n
    return out


def _recovered_t(clean: Tensor, spliced: Tensor, ablated: Tensor) -> Tensor:
    denom = ablated - clean
    return torch.where(denom.abs() < 1e-9, torch.full_like(denom, float("nan")), (ablated - spliced) / denom)


def _recovered(clean: float, spliced: float, ablated: float) -> float:
    denom = ablated - clean
    if abs(denom) < 1e-9:
        return float("nan")
    return (ablated - spliced) / denom
