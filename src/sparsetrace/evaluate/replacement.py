"""Evaluating a full replacement: every replaced MLP substituted at once, in one forward pass.

Given an :class:`~sparsetrace.dictionary.replacement_set.MLPReplacement` (per-layer transcoders or a
cross-layer transcoder), the *substituted pass* runs the model with the MLP of every replaced layer
swapped for the replacement. Each layer's dictionary reads the replacement's own residual stream (the
MLP input of the substituted pass, not the clean model's), and a CLT's output at layer ``j`` sums the
features of every source layer ``<= j`` computed earlier in the same pass. Reported, with seeded 95%
bootstrap intervals over windows (``<key>_ci``, :mod:`.bootstrap`):

- ``ce``, ``kl`` (KL(clean ‖ replacement) per token), ``top1_agreement`` (the replacement's argmax
  equals the clean model's argmax, over the positions CE is measured on);
- ``ce_recovered`` = (CE_zero - CE_repl) / (CE_zero - CE_clean), CE_zero with the MLP of every replaced
  layer zero-ablated at once; ``ce_recovered_vs_mean`` the same against mean-ablating every replaced
  MLP (the mean MLP output over the *training* activations when the run saved it, else over the
  evaluation windows; ``mean_ablation_reference`` says which);
- ``nmse_by_layer[l]`` = Σ‖ŷ_l − y_l‖² / Σ‖y_l‖², ŷ_l the substituted pass's MLP output at ``l`` and
  y_l the *clean* model's MLP output there: the error that reaches layer ``l``, compounded from below;
  ``nmse_local_by_layer[l]`` the same against the true MLP applied to the substituted pass's own MLP input
  (the dictionary's error on the replacement's inputs, not compounded);
- ``by_depth``: CE, KL and top-1 agreement with only the first ``k`` replaced layers substituted,
  k = 1..n. Run ``k`` equals the substituted pass up to the ``k``-th replaced layer, so it starts from that
  pass's residual entering the next layer (:func:`sparsetrace.model.suffix.start_at`) and runs only the
  remaining layers, clean; the ``k = n`` record is the substituted pass itself.

As in :mod:`.metrics`, the BOS position is never substituted: the true MLP output is kept there.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..dictionary.replacement_set import MLPReplacement
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint
from ..model.suffix import start_at
from .bootstrap import LEVEL, interval, resample_counts

DEFINITIONS = {
    "ce_recovered": "(CE_zero - CE_replacement) / (CE_zero - CE_clean), CE_zero with every replaced MLP "
    "zero-ablated at once",
    "ce_recovered_vs_mean": "the same against mean-ablating every replaced MLP at once",
    "kl": "KL(clean || replacement) in nats per token, mean over every position",
    "top1_agreement": "fraction of positions (all but the last of each window) where the replacement's "
    "most likely next token is the clean model's",
    "nmse_by_layer": "sum |y_hat - y_clean|^2 / sum |y_clean|^2 over non-BOS tokens: the substituted pass's "
    "MLP output at the layer vs the clean model's MLP output there (error compounded from lower layers)",
    "nmse_local_by_layer": "the same vs the true MLP applied to the substituted pass's own MLP input "
    "(the dictionary's own error on the replacement's inputs)",
    "by_depth": "the first k replaced layers substituted, every later MLP real, k = 1..n",
}


def _mlp(lm: LanguageModel, layer: int, x: Tensor) -> Tensor:
    """The true MLP of ``layer`` on ``x`` (also while its forward is swapped out by a replace_mlp edit)."""
    mlp = lm.arch.mlp(layer)
    return type(mlp).forward(mlp, x)


class _Clean:
    """The clean model's next-token distribution on one batch, kept for the KL of every variant.

    Every variant's figures come from its raw logits in three passes over the [tokens, vocab] block
    (logsumexp, one batched dot product with the clean probabilities, argmax): with lse = logsumexp(z),
    CE = lse - z[target] and KL(p || softmax z) = sum p log p - sum p z + lse."""

    ROWS = 16  # positions scored at once: 16 x 49k float32 logits = 3 MB, within a core's L2

    def __init__(self, logits: Tensor, ids: Tensor):
        z = logits.float()
        b, t, v = z.shape
        zf = z.reshape(b * t, v)
        nxt = torch.cat([ids[:, 1:], ids[:, -1:]], 1).reshape(-1)  # next token (the last position's is unused)
        self.ids = ids
        self.p = torch.empty_like(zf)
        ce, p_log_p = zf.new_empty(b * t), zf.new_empty(b * t)
        top = torch.empty(b * t, dtype=torch.long, device=z.device)
        for i in range(0, b * t, self.ROWS):  # in cache-sized chunks, as in scores()
            lp = zf[i:i + self.ROWS].log_softmax(-1)
            ce[i:i + self.ROWS] = -lp.gather(-1, nxt[i:i + self.ROWS, None]).squeeze(-1)
            top[i:i + self.ROWS] = lp.max(-1).indices
            p = torch.exp(lp, out=self.p[i:i + self.ROWS])
            p_log_p[i:i + self.ROWS] = (p * lp).sum(-1)
        self.ce = ce.reshape(b, t)[:, :-1].mean(-1)
        self.top = top.reshape(b, t)[:, :-1]
        self.p = self.p.reshape(b, t, v)
        self.p_log_p = p_log_p.reshape(b, t)

    def scores(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-window CE, KL(clean || logits) and top-1 agreement count [batch].

        The three passes run on ``ROWS`` positions at a time, whose logits (a few MB) stay in cache between
        them; over the whole [tokens, vocab] block each pass reads it from memory again (3.5x slower
        measured at 8 x 128 positions of SmolLM2's 49k vocabulary)."""
        z = logits.float()
        b, t, v = z.shape
        zf, pf = z.reshape(b * t, v), self.p.reshape(b * t, v)
        lse, p_z = zf.new_empty(b * t), zf.new_empty(b * t)
        top = torch.empty(b * t, dtype=torch.long, device=z.device)
        for i in range(0, b * t, self.ROWS):
            c = zf[i:i + self.ROWS]
            lse[i:i + self.ROWS] = c.logsumexp(-1)
            p_z[i:i + self.ROWS] = (pf[i:i + self.ROWS] * c).sum(-1)  # (a per-chunk bmm is 14x slower)
            top[i:i + self.ROWS] = c.max(-1).indices  # (argmax is 2x slower on CPU)
        lse, p_z, top = lse.reshape(b, t), p_z.reshape(b, t), top.reshape(b, t)
        ce = (lse[:, :-1] - z[:, :-1].gather(-1, self.ids[:, 1:, None]).squeeze(-1)).mean(-1)
        kl = (self.p_log_p - p_z + lse).mean(-1)
        agree = (top[:, :-1] == self.top).sum(-1).double()
        return ce, kl, agree


class _Series:
    """Per-window values of named figures, appended batch by batch."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}

    def add(self, key: str, value: Tensor) -> None:
        self.parts.setdefault(key, []).append(value.detach().double().cpu())

    def get(self, key: str) -> Tensor:
        return torch.cat(self.parts[key], -1)


def _substitute(lm, rep: MLPReplacement, layer: int, skip: int, feats: dict, errs: dict | None):
    """replace_mlp edit for ``layer``: the replacement's output on the pass's own MLP input (BOS kept)."""

    def fn(x: Tensor) -> Tensor:
        b, t, d = x.shape
        true = _mlp(lm, layer, x if errs is not None else x[:, :skip])
        xs = x[:, skip:].reshape(-1, d)
        feats[layer] = rep.encode(layer, xs)
        y = rep.decode(layer, feats, xs).reshape(b, t - skip, -1).to(x.dtype)
        if errs is not None:
            errs[layer] = (y, true[:, skip:])
        return torch.cat([true[:, :skip], y], 1)

    return fn


def _ablate(lm, layer: int, skip: int, value: Tensor | float):
    def fn(x: Tensor) -> Tensor:
        b, t, _ = x.shape
        true = _mlp(lm, layer, x[:, :skip])
        if isinstance(value, Tensor):
            fill = value.to(x.dtype).expand(b, t - skip, true.shape[-1])
        else:
            fill = torch.full((b, t - skip, true.shape[-1]), value, dtype=x.dtype, device=x.device)
        return torch.cat([true[:, :skip], fill], 1)

    return fn


def _forward(lm: LanguageModel, ids: Tensor, edits: dict, read: list[Hookpoint] = ()):
    with lm.hooks(read=read, edit=edits, replace_mlp=True) as acts:
        logits = lm.model(input_ids=ids, use_cache=False).logits
    return logits, dict(acts)


@torch.no_grad()
def evaluate_replacement(
    lm: LanguageModel,
    rep: MLPReplacement,
    windows: Tensor,
    *,
    means: dict[int, Tensor] | None = None,
    batch_windows: int = 8,
    by_depth: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Evaluate ``rep`` with every replaced MLP substituted at once, on held-out ``windows`` [n, ctx].

    ``means``: the mean-ablation reference per replaced layer (training activations' mean MLP output);
    None (or a layer missing) uses the mean clean MLP output over the evaluation windows, and says so.
    """
    t0 = time.perf_counter()
    layers = sorted(rep.layers)
    n_layers = lm.n_layers
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"replacement layers {layers} do not fit a {n_layers}-layer model")
    skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
    device = lm.device
    means = {ly: m.to(device).float() for ly, m in (means or {}).items() if ly in layers}
    need_eval_means = [ly for ly in layers if ly not in means]
    # where run k (first k replaced layers substituted) resumes: the layer after the k-th replaced one
    starts = {k: layers[k - 1] + 1 for k in range(1, len(layers)) if by_depth}
    read = sorted({Hookpoint("resid_pre", s) for s in starts.values()}, key=lambda h: h.layer)
    s = _Series()
    mean_sum = {ly: 0.0 for ly in need_eval_means}
    n_mean = 0
    n_batches = -(-len(windows) // batch_windows)
    bar = tqdm(total=n_batches * (2 if need_eval_means else 1), desc="replacement", disable=not progress,
               leave=False)
    for b0 in range(0, len(windows), batch_windows):
        ids = windows[b0 : b0 + batch_windows].to(device)
        clean = lm.run(ids, read=[Hookpoint("mlp_out", ly) for ly in layers])
        ref = _Clean(clean.logits, ids)
        s.add("ce_clean", ref.ce)
        s.add("n_pos", torch.full((ids.shape[0],), float(ids.shape[1] - 1)))
        for ly in need_eval_means:
            mean_sum[ly] = mean_sum[ly] + clean.acts[Hookpoint("mlp_out", ly)][:, skip:].double().sum((0, 1))
        n_mean += ids.shape[0] * (ids.shape[1] - skip)
        # the substituted pass
        feats: dict[int, Tensor] = {}
        errs: dict[int, tuple[Tensor, Tensor]] = {}
        logits, acts = _forward(lm, ids, {Hookpoint("mlp_out", ly): _substitute(lm, rep, ly, skip, feats, errs)
                                          for ly in layers}, read)
        for key, v in zip(("ce", "kl", "agree"), ref.scores(logits), strict=True):
            s.add(f"{key}:{len(layers)}", v)
        for ly in layers:
            y_hat, local = errs[ly]
            y = clean.acts[Hookpoint("mlp_out", ly)][:, skip:]
            s.add(f"sq:{ly}", (y_hat - y).double().pow(2).sum((1, 2)))
            s.add(f"norm:{ly}", y.double().pow(2).sum((1, 2)))
            s.add(f"sql:{ly}", (y_hat - local).double().pow(2).sum((1, 2)))
            s.add(f"norml:{ly}", local.double().pow(2).sum((1, 2)))
        del feats, errs, logits
        # every replaced MLP ablated at once
        logits, _ = _forward(lm, ids, {Hookpoint("mlp_out", ly): _ablate(lm, ly, skip, 0.0) for ly in layers})
        s.add("ce_zero", ref.scores(logits)[0])
        if not need_eval_means:
            logits, _ = _forward(lm, ids, {Hookpoint("mlp_out", ly): _ablate(lm, ly, skip, means[ly]) for ly in layers})
            s.add("ce_mean", ref.scores(logits)[0])
        # first k substituted: resume from the substituted pass's residual, the rest of the model clean
        for k, start in starts.items():
            with start_at(lm, start, acts[Hookpoint("resid_pre", start)]):
                logits = lm.model(input_ids=ids, use_cache=False).logits
            for key, v in zip(("ce", "kl", "agree"), ref.scores(logits), strict=True):
                s.add(f"{key}:{k}", v)
        del acts, logits, ref
        bar.update(1)
    mean_source = "training" if not need_eval_means else "evaluation windows" if len(need_eval_means) == len(
        layers) else "training, evaluation windows for layers " + ",".join(map(str, need_eval_means))
    if need_eval_means:  # a second pass, now that the evaluation means are known
        for ly in need_eval_means:
            means[ly] = (mean_sum[ly] / max(n_mean, 1)).float()
        for b0 in range(0, len(windows), batch_windows):
            ids = windows[b0 : b0 + batch_windows].to(device)
            logits, _ = _forward(lm, ids, {Hookpoint("mlp_out", ly): _ablate(lm, ly, skip, means[ly]) for ly in layers})
            lp = logits.float().log_softmax(-1)
            s.add("ce_mean", -lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1))
            bar.update(1)
    bar.close()
    return _summarise(rep, layers, s, len(windows), seed, mean_source, by_depth,
                      seconds=time.perf_counter() - t0, n_tokens=int(windows.numel()))


def _recovered(clean: Tensor, repl: Tensor, ablated: Tensor) -> Tensor:
    denom = ablated - clean
    return torch.where(denom.abs() < 1e-9, torch.full_like(denom, float("nan")), (ablated - repl) / denom)


def _summarise(rep, layers, s: _Series, n_w: int, seed: int, mean_source: str, by_depth: bool, *,
               seconds: float, n_tokens: int) -> dict:
    counts = resample_counts(n_w, seed=seed)
    weights = {"point": torch.ones(1, n_w, dtype=torch.float64), "boot": counts}
    n = len(layers)

    def figures(w: Tensor) -> dict[str, Tensor]:
        tot = w.sum(-1)

        def mean(key: str) -> Tensor:
            return w @ s.get(key) / tot

        clean, repl, zero, mean_abl = mean("ce_clean"), mean(f"ce:{n}"), mean("ce_zero"), mean("ce_mean")
        out = {
            "clean_ce": clean, "ce": repl, "ce_increase": repl - clean, "ce_zero_ablation": zero,
            "ce_mean_ablation": mean_abl, "ce_recovered": _recovered(clean, repl, zero),
            "ce_recovered_vs_mean": _recovered(clean, repl, mean_abl), "kl": mean(f"kl:{n}"),
            "top1_agreement": w @ s.get(f"agree:{n}") / (w @ s.get("n_pos")),
        }
        for ly in layers:
            out[f"nmse:{ly}"] = w @ s.get(f"sq:{ly}") / (w @ s.get(f"norm:{ly}")).clamp_min(1e-30)
            out[f"nmse_local:{ly}"] = w @ s.get(f"sql:{ly}") / (w @ s.get(f"norml:{ly}")).clamp_min(1e-30)
        for k in range(1, n + 1) if by_depth else ():
            out[f"d_ce:{k}"] = mean(f"ce:{k}")
            out[f"d_kl:{k}"] = mean(f"kl:{k}")
            out[f"d_top1:{k}"] = w @ s.get(f"agree:{k}") / (w @ s.get("n_pos"))
        return out

    point = {k: float(v[0]) for k, v in figures(weights["point"]).items()}
    boot = {k: interval(v) for k, v in figures(weights["boot"]).items()}
    main = ("clean_ce", "ce", "ce_increase", "ce_zero_ablation", "ce_mean_ablation", "ce_recovered",
            "ce_recovered_vs_mean", "kl", "top1_agreement")
    result = {
        "kind": rep.kind,
        "layers": layers,
        "n_features": {str(ly): int(rep.n_features[ly]) for ly in layers},
        "n_windows": n_w,
        "n_tokens": n_tokens,
        **{k: point[k] for k in main},
        **{f"{k}_ci": boot[k] for k in main},
        "mean_ablation_reference": mean_source,
        "nmse_by_layer": {str(ly): point[f"nmse:{ly}"] for ly in layers},
        "nmse_by_layer_ci": {str(ly): boot[f"nmse:{ly}"] for ly in layers},
        "nmse_local_by_layer": {str(ly): point[f"nmse_local:{ly}"] for ly in layers},
        "by_depth": [],
        "definitions": DEFINITIONS,
        "interval_definition": f"{LEVEL:.0%} percentile bootstrap over windows, {counts.shape[0]} resamples, "
        f"seed {seed}",
        "seconds": round(seconds, 2),
    }
    for k in range(1, n + 1) if by_depth else ():
        result["by_depth"].append({
            "k": k, "last_layer": layers[k - 1],
            "ce": point[f"d_ce:{k}"], "ce_ci": boot[f"d_ce:{k}"],
            "ce_increase": point[f"d_ce:{k}"] - point["clean_ce"],
            "kl": point[f"d_kl:{k}"], "kl_ci": boot[f"d_kl:{k}"],
            "top1_agreement": point[f"d_top1:{k}"], "top1_agreement_ci": boot[f"d_top1:{k}"],
        })
    return result


def as_substitution(result: dict) -> list[dict]:
    """``by_depth`` in the older ``substitution`` format of eval.json (the report's substitution curve)."""
    out = []
    for r in result.get("by_depth", []):
        out.append({"n_layers": r["k"], "layers": result["layers"][: r["k"]], "ce_loss": r["ce"],
                    "ce_increase": r["ce_increase"], "kl": r["kl"],
                    "ce_recovered_vs_zero": result["ce_recovered"] if r["k"] == len(result["layers"]) else None})
    return out


def format_replacement(result: dict) -> str:
    """The replacement summary and the by-depth table, for the terminal."""

    def ci(key: str, fmt: str, r: dict = result) -> str:
        lo, hi = r.get(f"{key}_ci", [float("nan")] * 2)
        return f"{fmt.format(r[key])} [{fmt.format(lo)}, {fmt.format(hi)}]"

    layers = result["layers"]
    span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))
    out = [
        f"full replacement ({result['kind']}, layers {span}, every replaced MLP substituted at once; "
        f"{result['n_windows']} windows, {result['seconds']:.0f} s):",
        f"  CE {ci('ce', '{:.3f}')}  (clean {result['clean_ce']:.3f}, +{result['ce_increase']:.3f} nats)",
        f"  CE recovered vs zero-ablating every replaced MLP {ci('ce_recovered', '{:.1%}')}  "
        f"(CE zero-ablated {result['ce_zero_ablation']:.3f})",
        f"  CE recovered vs mean-ablating every replaced MLP {ci('ce_recovered_vs_mean', '{:.1%}')}  "
        f"(CE mean-ablated {result['ce_mean_ablation']:.3f}; means from {result['mean_ablation_reference']})",
        f"  KL {ci('kl', '{:.4f}')}   top-1 agreement {ci('top1_agreement', '{:.1%}')}",
    ]
    if result.get("by_depth"):
        out.append("  first k replaced layers substituted (the rest real):")
        out.append("      k  layer        CE    +CE       KL   top-1   NMSE   NMSE local")
        for r in result["by_depth"]:
            ly = str(r["last_layer"])
            out.append(f"  {r['k']:5d}  {ly:>5}  {r['ce']:8.3f} {r['ce_increase']:+6.3f} {r['kl']:8.4f} "
                       f"{r['top1_agreement']:7.1%} {result['nmse_by_layer'][ly]:6.3f} "
                       f"{result['nmse_local_by_layer'][ly]:12.3f}")
    return "\n".join(out)
