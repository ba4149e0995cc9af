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

Afterwards the weight-based views are added: promoted / suppressed output tokens (``W_dec[f]`` through
the final norm's weight and the unembedding), top input tokens (token embeddings through the norm in
front of the dictionary's input and ``W_enc[f]``) and nearest features by decoder cosine.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from ..model.hookpoints import Hookpoint
from ..model.norms import norm_info


# ----------------------------------------------------------------------------------------- encoding
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


class _Enough(Exception):
    """Raised by a hook once the activation we need has been read."""


@torch.no_grad()
def harvest(lm, ids: Tensor, hp: Hookpoint, *, prefix: PrefixCache | None = None) -> Tensor:
    """Activation at ``hp`` for token ids [B, T], stopping the forward pass right after it is read
    (for ``mlp_in.L`` the MLP of layer L is not computed).

    With ``prefix`` (the cache of ``ids[:, :-1]``, see :class:`PrefixCache`) only the last token is run
    and the result is that position's activation [B, 1, d]."""
    out = _harvest(lm, ids, hp, prefix)
    if prefix is not None and _PREFIX_OK.get(lm.model) is not True:
        k = min(_CHECK_ROWS, ids.shape[0])
        _check_close(out[:k], _harvest(lm, ids[:k], hp, None)[:, -1:], lm.dtype, f"{hp}")
    return out


def _harvest(lm, ids: Tensor, hp: Hookpoint, prefix: PrefixCache | None) -> Tensor:
    with lm.hooks([hp]) as acts:
        if hp.name == "mlp_in":
            mod, post = lm.arch.mlp(hp.layer), False
        elif hp.name == "resid_pre":
            mod, post = lm.arch.layer(hp.layer), False
        elif hp.name == "attn_out":
            mod, post = lm.arch.attn(hp.layer), True
        else:
            mod, post = lm.arch.layer(hp.layer), True

        def stop(*_args, **_kw):
            raise _Enough

        # registered after the read hook, so it runs after the activation has been stored
        h = mod.register_forward_hook(stop) if post else mod.register_forward_pre_hook(stop)
        try:
            if prefix is None:
                lm.model(input_ids=ids, use_cache=False)
            else:
                lm.model(input_ids=prefix.last(ids), use_cache=True, **prefix.cache_kwargs())
        except _Enough:
            pass
        finally:
            h.remove()
        if hp not in acts:
            raise RuntimeError(f"hookpoint {hp} was not reached")
        return acts[hp]


# ----------------------------------------------------------------------------------------- prefix cache
#: models (held weakly) for which the cached-prefix path was checked against full forwards (True) or failed
#: (False): a model is checked once per process, on its first use
_PREFIX_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHECK_ROWS = 2  # contexts re-run in full for that check
_R = TypeVar("_R")


class PrefixMismatch(RuntimeError):
    """Running the last token on a cached prefix did not reproduce the full forward pass."""


class PrefixError(Exception):
    """Token ids passed with a :class:`PrefixCache` do not extend its prefix by one token."""


#: what a model that cannot reuse its key/value cache may raise (the full forward is used instead)
_CACHE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, NotImplementedError, RuntimeError)


def _cache_kwarg(model) -> str:
    """The forward's name for a key/value cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class PrefixCache:
    """The key/value cache of ``ids[:, :-1]``, computed with one forward pass.

    Contexts that share that prefix and differ at most in their last token (a clean and a steered run, or
    a control token swapped in) then run only their last token: attention is causal, so an edit of the last
    position cannot change earlier ones. Every use runs on a copy, so the cache itself is never extended.
    Reads and edits made with it see the last position only ([B, 1, d])."""

    def __init__(self, lm, ids: Tensor):
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"a prefix cache needs contexts [B, T] with T >= 2, got {list(ids.shape)}")
        self.prefix = ids[:, :-1]
        self.kwarg = _cache_kwarg(lm.model)
        base = getattr(lm.model, "base_model", None)
        body = base if isinstance(base, torch.nn.Module) and base is not lm.model else None
        if body is not None:  # the decoder alone: no final norm / unembedding of the prefix
            out = body(input_ids=self.prefix, use_cache=True)
        else:
            out = _call(lm.model, input_ids=self.prefix, use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            raise ValueError(f"{type(lm.model).__name__} returned no key/value cache")
        self.cache = cache

    def last(self, ids: Tensor) -> Tensor:
        """The last token [B, 1] of contexts ``ids`` [B, T], which must extend the prefix by one token."""
        if ids.dim() != 2 or ids.shape[1] != self.prefix.shape[1] + 1 or not torch.equal(ids[:, :-1], self.prefix):
            raise PrefixError(f"contexts {list(ids.shape)} do not extend the cached prefix {list(self.prefix.shape)}")
        return ids[:, -1:]

    def cache_kwargs(self, repeat: int = 1) -> dict:
        """Forward keyword for a fresh copy of the cache (a forward pass appends to the cache it is given),
        with each context repeated ``repeat`` times (``repeat_interleave`` order: c0, c0, c1, c1, ...)."""
        cache = copy.deepcopy(self.cache)
        if repeat > 1:
            if hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(repeat)
            elif isinstance(cache, tuple):  # legacy format: per layer (key, value, ...)
                cache = tuple(tuple(t.repeat_interleave(repeat, 0) for t in layer) for layer in cache)
            else:
                raise NotImplementedError(f"cannot repeat a {type(cache).__name__}")
        return {self.kwarg: cache}


def run_sharing_prefix(lm, ids: Tensor, body: Callable[[PrefixCache | None], _R], *, use_cache: bool = True) -> _R:
    """``body(prefix)`` with a :class:`PrefixCache` of contexts ``ids`` [B, T], or ``body(None)`` (full
    forward passes) when ``use_cache`` is False, the contexts are one token long, or the model cannot reuse
    its cache (it raises, or a check of its first use against full forwards fails; then the fast path is
    not tried again for that model). ``body`` must not have side effects: it may run twice."""
    model = lm.model
    if use_cache and ids.dim() == 2 and ids.shape[1] >= 2 and _PREFIX_OK.get(model, True):
        try:
            return body(PrefixCache(lm, ids))
        except _CACHE_ERRORS:
            _PREFIX_OK[model] = False
    return body(None)


def _check_close(fast: Tensor, ref: Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise :class:`PrefixMismatch` unless the cached-prefix result equals the full one up to rounding."""
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    fast, ref = fast.float(), ref.float()
    err = float((fast - ref).abs().max()) if fast.shape == ref.shape else math.inf
    if not err <= tol * (1.0 + float(ref.abs().max())):
        raise PrefixMismatch(f"{what}: cached-prefix result differs from the full forward by {err:.3g}")


# ----------------------------------------------------------------------------------------- state
class DashboardState:
    """Fixed-size running statistics for ``n_feats`` features (nothing grows with the corpus)."""

    def __init__(
        self,
        n_feats: int,
        *,
        n_top: int = 20,
        width: int = 24,
        per_bin: int = 5,
        hist_range: tuple[float, float] = (1e-3, 1e3),
        hist_bins_per_decade: int = 10,
        reservoir_bins_per_decade: int = 5,
        seed: int = 0,
    ):
        lo, hi = hist_range
        if not (0 < lo < hi):
            raise ValueError(f"hist_range={hist_range} is invalid; expected 0 < lo < hi")
        decades = math.log10(hi) - math.log10(lo)
        n_h = max(1, round(decades * hist_bins_per_decade))
        n_r = max(1, round(decades * reservoir_bins_per_decade))
        self.F, self.n_top, self.width, self.per_bin = n_feats, n_top, width, per_bin
        #: histogram edges; values below lo / above hi are counted in the first / last bin
        self.hist_edges = torch.logspace(math.log10(lo), math.log10(hi), n_h + 1)
        self.res_edges = torch.logspace(math.log10(lo), math.log10(hi), n_r + 1)
        self.n_hist, self.n_res = n_h, n_r
        self.n_tokens = 0
        self.n_windows = 0
        self.n_fire = torch.zeros(n_feats, dtype=torch.long)
        self.sum_act = torch.zeros(n_feats, dtype=torch.float64)
        self.max_act = torch.zeros(n_feats)
        self.hist = torch.zeros(n_feats, n_h, dtype=torch.long)
        # top-k windows
        self.top_val = torch.full((n_feats, n_top), -math.inf)
        self.top_win = torch.full((n_feats, n_top), -1, dtype=torch.long)
        self.top_start = torch.zeros(n_feats, n_top, dtype=torch.long)
        self.top_acts = torch.zeros(n_feats, n_top, width)
        # reservoirs: slot = feature * n_res + coarse bin; per_bin entries each
        S = n_feats * n_r
        self.res_count = torch.zeros(S, dtype=torch.long)  # windows seen per slot
        self.res_key = torch.full((S * per_bin,), math.inf)
        self.res_win = torch.full((S * per_bin,), -1, dtype=torch.long)
        self.res_start = torch.zeros(S * per_bin, dtype=torch.long)
        self.res_val = torch.zeros(S * per_bin)
        self.res_acts = torch.zeros(S * per_bin, width)
        self.gen = torch.Generator().manual_seed(seed)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in vars(self).values()
            if isinstance(t, Tensor)
        )

    @torch.no_grad()
    def update(self, acts: Tensor, valid: Tensor, window_ids: Tensor) -> None:
        """acts [B, T, F] (already zero where ``valid`` is False), valid [B, T] bool, window_ids [B]."""
        B, T, Fn = acts.shape
        assert Fn == self.F
        W = min(self.width, T)
        self.n_tokens += int(valid.sum())
        self.n_windows += B
        fire = acts > 0
        self.n_fire += fire.sum((0, 1))
        self.sum_act += acts.sum((0, 1)).double()
        # histogram of firing activations
        vals = acts[fire]
        if vals.numel():
            fidx = fire.nonzero()[:, 2]
            b = torch.bucketize(vals, self.hist_edges[1:-1])
            self.hist += torch.bincount(fidx * self.n_hist + b, minlength=self.F * self.n_hist).view(
                self.F, self.n_hist
            )
        # per-window maxima and trimmed excerpts around them
        wmax, wpos = acts.max(dim=1)  # [B, F]
        self.max_act = torch.maximum(self.max_act, wmax.max(0).values)
        start = (wpos - W // 2).clamp(0, T - W)  # [B, F]
        idx = start.unsqueeze(-1) + torch.arange(W)  # [B, F, W]
        excerpt = acts.permute(0, 2, 1).gather(2, idx)  # [B, F, W]
        if W < self.width:
            excerpt = F.pad(excerpt, (0, self.width - W))
        self._merge_top(wmax, start, excerpt, window_ids)
        self._merge_reservoir(wmax, start, excerpt, window_ids)

    def _merge_top(self, wmax: Tensor, start: Tensor, excerpt: Tensor, window_ids: Tensor) -> None:
        B = wmax.shape[0]
        cand = torch.where(wmax > 0, wmax, torch.full_like(wmax, -math.inf)).t()  # [F, B]
        if not bool((cand > self.top_val[:, -1:]).any()):
            return
        vals = torch.cat([self.top_val, cand], 1)
        # sort is stable: on ties the earlier (already kept) window wins
        order = vals.argsort(dim=1, descending=True, stable=True)[:, : self.n_top]
        self.top_val = vals.gather(1, order)
        self.top_win = torch.cat([self.top_win, window_ids.expand(self.F, B)], 1).gather(1, order)
        self.top_start = torch.cat([self.top_start, start.t()], 1).gather(1, order)
        acts = torch.cat([self.top_acts, excerpt.permute(1, 0, 2)], 1)
        self.top_acts = acts.gather(1, order.unsqueeze(-1).expand(-1, -1, self.width))

    def _merge_reservoir(self, wmax: Tensor, start: Tensor, excerpt: Tensor, window_ids: Tensor) -> None:
        nz = (wmax > 0).nonzero()  # [N, 2] (b, f)
        if nz.numel() == 0:
            return
        b, f = nz[:, 0], nz[:, 1]
        v = wmax[b, f]
        k = torch.bucketize(v, self.res_edges[1:-1])
        slot = f * self.n_res + k
        self.res_count += torch.bincount(slot, minlength=self.res_count.numel())
        key = torch.rand(v.shape[0], generator=self.gen)
        # existing entries of the touched slots
        touched = torch.unique(slot)
        P = self.per_bin
        ex = (touched.unsqueeze(1) * P + torch.arange(P)).reshape(-1)
        all_slot = torch.cat([ex // P, slot])
        all_key = torch.cat([self.res_key[ex], key])
        o1 = all_key.argsort(stable=True)
        o2 = all_slot[o1].argsort(stable=True)
        perm = o1[o2]
        s_sorted = all_slot[perm]
        first = torch.searchsorted(s_sorted, s_sorted)
        rank = torch.arange(s_sorted.numel()) - first
        keep = rank < P
        src = perm[keep]
        dest = s_sorted[keep] * P + rank[keep]
        n_ex = ex.numel()
        from_ex = src < n_ex
        cand = (src - n_ex).clamp_min(0)
        ex_src = ex[src.clamp_max(n_ex - 1)]

        def pick(old: Tensor, new: Tensor) -> Tensor:
            o = old[ex_src]
            n = new[cand]
            if o.dim() > 1:
                return torch.where(from_ex.unsqueeze(-1), o, n)
            return torch.where(from_ex, o, n)

        new_key = pick(self.res_key, key)
        new_win = pick(self.res_win, window_ids[b])
        new_start = pick(self.res_start, start[b, f])
        new_val = pick(self.res_val, v)
        new_acts = pick(self.res_acts, excerpt[b, f])
        self.res_key[dest] = new_key
        self.res_win[dest] = new_win
        self.res_start[dest] = new_start
        self.res_val[dest] = new_val
        self.res_acts[dest] = new_acts

    # ---------------------------------------------------------------- read-out
    def quantile_groups(self, i: int, n_groups: int, per_bin: int, gen: torch.Generator) -> list[dict]:
        """Split feature ``i``'s window maxima into ~equal-count groups of coarse bins and draw
        ``per_bin`` windows from each (weighted so every window in the group is equally likely)."""
        P = self.per_bin
        counts = self.res_count[i * self.n_res : (i + 1) * self.n_res]
        total = int(counts.sum())
        if total == 0:
            return []
        cum = counts.cumsum(0)
        # group of each non-empty bin: which quantile its cumulative count midpoint falls into
        mid = (cum - counts / 2) / total
        group = (mid * n_groups).floor().clamp_max(n_groups - 1).long()
        top_windows = set(self.top_win[i].tolist())
        out = []
        for g in range(n_groups):
            bins = ((group == g) & (counts > 0)).nonzero().flatten()
            if bins.numel() == 0:
                continue
            ent, w = [], []
            for kb in bins.tolist():
                base = (i * self.n_res + kb) * P
                n_have = min(int(counts[kb]), P)
                for j in range(n_have):
                    if int(self.res_win[base + j]) < 0:
                        continue
                    ent.append(base + j)
                    w.append(float(counts[kb]) / n_have)
            # top windows are shown already; leave them out of the highest group when possible
            others = [e for e in ent if int(self.res_win[e]) not in top_windows]
            if len(others) >= min(per_bin, len(ent)):
                w = [wi for e, wi in zip(ent, w, strict=True) if int(self.res_win[e]) not in top_windows]
                ent = others
            if not ent:
                continue
            n_pick = min(per_bin, len(ent))
            pick = torch.multinomial(torch.tensor(w), n_pick, replacement=False, generator=gen).tolist()
            chosen = sorted((ent[p] for p in pick), key=lambda e: -float(self.res_val[e]))
            lo = float(self.res_edges[int(bins[0])]) if int(bins[0]) > 0 else 0.0
            hi = float(self.res_edges[int(bins[-1]) + 1]) if int(bins[-1]) < self.n_res - 1 else math.inf
            hi = min(hi, float(self.max_act[i]))
            out.append({"range": [lo, hi], "n_windows": int(counts[bins].sum()), "entries": chosen})
        return out


# ----------------------------------------------------------------------------------------- weights
def input_norm(lm, hookpoint: str, layer: int):
    """The norm module in front of a dictionary's input hookpoint (None for residual hookpoints); from
    the one table in :mod:`sparsetrace.model.norms`."""
    return norm_info(lm, layer, "mlp").module if hookpoint == "mlp_in" else None


@torch.no_grad()
def logit_effects(lm, W_dec: Tensor) -> Tensor:
    """Direct effect on the logits of writing each row of ``W_dec`` [n, d] into the residual stream:
    through the final norm's weight (centred first for LayerNorm; ``1 + w`` for Gemma) and the
    unembedding. [n, vocab]."""
    w = W_dec.float()
    info = norm_info(lm, None, "final")
    if info.centred:
        w = w - w.mean(-1, keepdim=True)
    w = w * info.gamma.to(w.device)
    return w @ lm.arch.unembed.weight.detach().float().t()


@torch.no_grad()
def deembedding(lm, dictionary, W_enc: Tensor) -> Tensor:
    """How strongly each vocabulary token's embedding drives each encoder row [n, d] -> [n, vocab],
    with the embedding passed through the norm in front of the dictionary's input (normalised and
    scaled by its weight, ``1 + w`` for Gemma) when there is one."""
    E = lm.arch.embed.weight.detach().float()
    if dictionary.cfg.hookpoint_in == "mlp_in":
        info = norm_info(lm, dictionary.cfg.layer, "mlp")
        if info.module is not None:
            if info.centred:
                E = E - E.mean(-1, keepdim=True)
            E = E * torch.rsqrt(E.pow(2).mean(-1, keepdim=True) + info.eps)
            E = E * info.gamma.to(E.device)
    return W_enc.float() @ E.t()


# ----------------------------------------------------------------------------------------- main
class _TokenText:
    """Decodes token ids to strings once each."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self.cache})
        if missing:
            for i, s in zip(missing, self.tok.batch_decode([[i] for i in missing]), strict=True):
                self.cache[i] = s
        return [self.cache[i] for i in ids]


def _r(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (JSON size); non-finite values become 0."""
    if not math.isfinite(x):
        return 0.0
    return float(f"{x:.{digits}g}")


def _example(text: _TokenText, windows: Tensor, win: int, start: int, acts: Tensor, width: int) -> dict:
    T = windows.shape[1]
    w = min(width, T)
    ids = windows[win, start : start + w].tolist()
    a = acts[:w].tolist()
    m = max(range(len(a)), key=a.__getitem__)
    return {
        "tokens": text(ids),
        "acts": [_r(v) for v in a],
        "max_act": _r(a[m]),
        "max_pos": m,
        "max_token_id": int(ids[m]),
        "window": int(win),
        "start": int(start),
    }


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
    text = _TokenText(lm.tokenizer)
    gen = torch.Generator().manual_seed(seed + 1)
    W_dec = dictionary.W_dec.detach().float().cpu()
    W_enc = dictionary.W_enc.detach().float().cpu()
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
    # logit effects and de-embedding, in chunks to bound the [chunk, vocab] temporaries
    lt_v, lt_i, lb_v, lb_i, in_v, in_i = [], [], [], [], [], []
    for c in range(0, len(features), 256):
        sub = feats[c : c + 256]
        eff = logit_effects(lm, W_dec[sub].to(lm.device)).cpu()
        v, i = eff.topk(n_logits, dim=1)
        lt_v.append(v)
        lt_i.append(i)
        v, i = eff.topk(n_logits, dim=1, largest=False)
        lb_v.append(v)
        lb_i.append(i)
        de = deembedding(lm, dictionary, W_enc[sub].to(lm.device)).cpu()
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
            edges = [_r(float(e)) for e in state.hist_edges[b0 : b1 + 1]]
            counts = [int(c) for c in hist[b0:b1]]
        else:
            edges, counts = [], []
        top = []
        for j in range(state.n_top):
            if not math.isfinite(float(state.top_val[i, j])) or int(state.top_win[i, j]) < 0:
                break
            top.append(
                _example(text, windows, int(state.top_win[i, j]), int(state.top_start[i, j]), state.top_acts[i, j], state.width)
            )
        quant = []
        for g in state.quantile_groups(i, n_quantile_bins, per_bin, gen):
            exs = [
                _example(text, windows, int(state.res_win[e]), int(state.res_start[e]), state.res_acts[e], state.width)
                for e in g["entries"]
            ]
            quant.append({"range": [_r(g["range"][0]), _r(g["range"][1])], "n_windows": g["n_windows"], "examples": exs})
        nbs = [
            [int(j), _r(float(v))]
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
            "max_act": _r(float(state.max_act[i])),
            "mean_act": _r(float(state.sum_act[i]) / n_fire) if n_fire else 0.0,
            "n_tokens": state.n_tokens,
            "n_windows": state.n_windows,
            "histogram": {"edges": edges, "counts": counts, "n_zero": state.n_tokens - n_fire},
            "top_examples": top,
            "quantile_examples": quant,
            "top_logits": [[s, _r(v)] for s, v in zip(text(lt_i[i].tolist()), lt_v[i].tolist(), strict=True)],
            "bottom_logits": [[s, _r(v)] for s, v in zip(text(lb_i[i].tolist()), lb_v[i].tolist(), strict=True)],
            "top_logit_ids": lt_i[i].tolist(),
            "bottom_logit_ids": lb_i[i].tolist(),
            "top_inputs": [[s, _r(v)] for s, v in zip(text(in_i[i].tolist()), in_v[i].tolist(), strict=True)],
            "top_input_ids": in_i[i].tolist(),
            "neighbors": nbs,
        }
        if harvest_seconds is not None:
            out[f]["harvest_seconds"] = round(harvest_seconds, 2)
    return out


def _call(model, **kw):
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:
        return model(**kw)


@torch.no_grad()
def last_logits(
    lm, ids: Tensor, read: list[Hookpoint] = (), edit: dict | None = None, *, prefix: PrefixCache | None = None
) -> tuple[Tensor, dict]:
    """Logits at the last position [B, vocab] (+ read activations), with optional edits.

    With ``prefix`` (the cache of ``ids[:, :-1]``, see :class:`PrefixCache`) only the last token is run:
    reads and edits see the last position only ([B, 1, d]). The first such use for a model is checked
    against full forwards of a few contexts (:class:`PrefixMismatch` when they differ)."""
    logits, acts = _last_logits(lm, ids, read, edit, prefix)
    if prefix is not None and _PREFIX_OK.get(lm.model) is not True:
        k = min(_CHECK_ROWS, ids.shape[0])
        ref, ref_acts = _last_logits(lm, ids[:k], read, edit, None)
        _check_close(logits[:k], ref, lm.dtype, "logits")
        for hp in read:
            _check_close(acts[hp][:k, -1:], ref_acts[hp][:, -1:], lm.dtype, f"{hp}")
        _PREFIX_OK[lm.model] = True
    return logits, acts


def _last_logits(lm, ids: Tensor, read, edit, prefix: PrefixCache | None) -> tuple[Tensor, dict]:
    with lm.hooks(list(read), edit) as acts:
        if prefix is None:
            out = _call(lm.model, input_ids=ids, use_cache=False)
        else:
            last = prefix.last(ids)
            try:
                out = lm.model(input_ids=last, use_cache=True, logits_to_keep=1, **prefix.cache_kwargs())
            except TypeError:
                out = lm.model(input_ids=last, use_cache=True, **prefix.cache_kwargs())
        return out.logits[:, -1].float(), dict(acts)


def steer_last(delta: Tensor, rows: slice | None = None):
    """An edit that adds ``delta`` [d] at the last position (of the batch ``rows`` only, when given)."""

    def edit(x: Tensor) -> Tensor:
        x = x.clone()
        if rows is None:
            x[:, -1] = x[:, -1] + delta.to(x.device, x.dtype)
        else:
            x[rows, -1] = x[rows, -1] + delta.to(x.device, x.dtype)
        return x

    return edit


@torch.no_grad()
def clean_and_steered(
    lm, ids: Tensor, hp: Hookpoint, delta: Tensor, read: list[Hookpoint] = (), *, prefix: PrefixCache | None = None
) -> tuple[Tensor, Tensor, dict]:
    """Last-position logits [B, vocab] of ``ids`` [B, T] clean and with ``steer_last(delta)`` at ``hp``,
    and the clean run's ``read`` activations.

    Without ``prefix``: two full forward passes. With it (the cache of ``ids[:, :-1]``): one forward of the
    last token over 2B rows, each context twice and the second copy steered (reads [B, 1, d]); for a cache
    that cannot be repeated, two forwards of the last token."""
    read = list(read)
    if prefix is not None:
        try:
            kw = prefix.cache_kwargs(repeat=2)
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            kw = None
        if kw is not None:
            pair = prefix.last(ids).repeat_interleave(2, 0)
            with lm.hooks(read, {hp: steer_last(delta, slice(1, None, 2))}) as acts:
                try:
                    out = lm.model(input_ids=pair, use_cache=True, logits_to_keep=1, **kw)
                except TypeError:
                    out = lm.model(input_ids=pair, use_cache=True, **prefix.cache_kwargs(repeat=2))
                logits = out.logits[:, -1].float()
                clean_acts = {h: a[0::2] for h, a in acts.items()}
            clean, steered = logits[0::2], logits[1::2]
            if _PREFIX_OK.get(lm.model) is not True:
                k = min(_CHECK_ROWS, ids.shape[0])
                ref, ref_acts = _last_logits(lm, ids[:k], read, None, None)
                ref_st, _ = _last_logits(lm, ids[:k], (), {hp: steer_last(delta)}, None)
                _check_close(clean[:k], ref, lm.dtype, "logits")
                _check_close(steered[:k], ref_st, lm.dtype, f"logits steered at {hp}")
                for h in read:
                    _check_close(clean_acts[h][:k], ref_acts[h][:, -1:], lm.dtype, f"{h}")
                _PREFIX_OK[lm.model] = True
            return clean, steered, clean_acts
    clean, acts = last_logits(lm, ids, read, prefix=prefix)
    steered, _ = last_logits(lm, ids, (), {hp: steer_last(delta)}, prefix=prefix)
    return clean, steered, acts


@torch.no_grad()
def add_steered_logits(
    lm,
    dictionary,
    dashboards: dict[int, dict],
    windows: Tensor,
    features: list[int] | None = None,
    *,
    n_contexts: int = 8,
    context_len: int = 32,
    steer_scale: float = 1.0,
    n_logits: int = 10,
    use_cache: bool = True,
) -> dict[int, dict]:
    """Measured (not direct-path) output effects: add ``steer_scale × max_act × W_dec[f]`` at the
    max-activation token of the feature's top examples (contexts cut to end there) and average the
    change of the next-token logits. Adds ``steered_logits`` / ``steered_bottom_logits`` (+ ids) to each
    dashboard. Costs one forward pass of ``n_contexts`` short contexts per feature (their prefix; then the
    last token alone, clean and steered in one batch, on its cache; ``use_cache=False``: two full forwards,
    same result up to float rounding), so it is optional (the direct-path ``top_logits`` are free)."""
    text = _TokenText(lm.tokenizer)
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    hp = Hookpoint(dictionary.cfg.hookpoint_out, dictionary.cfg.layer)
    for f in features if features is not None else sorted(dashboards):
        dash = dashboards[f]
        ends = [(e["window"], e["start"] + e["max_pos"]) for e in dash.get("top_examples", [])[:n_contexts]]
        ends = [(w, p) for w, p in ends if p >= 1]
        if not ends or not dash.get("max_act"):
            continue
        L = min(context_len, min(p for _, p in ends))
        rows = [windows[w, p - L + 1 : p + 1] for w, p in ends]
        ids = torch.stack(rows)
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos), ids], 1)
        ids = ids.to(lm.device)
        delta = (steer_scale * float(dash["max_act"])) * dictionary.W_dec[f].detach()

        def change(prefix: PrefixCache | None, ids=ids, delta=delta) -> Tensor:
            clean, steered, _ = clean_and_steered(lm, ids, hp, delta, prefix=prefix)
            return (steered - clean).mean(0).cpu()

        d = run_sharing_prefix(lm, ids, change, use_cache=use_cache)
        v, i = d.topk(n_logits)
        vb, ib = d.topk(n_logits, largest=False)
        dash["steered_logits"] = [[s, _r(x)] for s, x in zip(text(i.tolist()), v.tolist(), strict=True)]
        dash["steered_logit_ids"] = i.tolist()
        dash["steered_bottom_logits"] = [[s, _r(x)] for s, x in zip(text(ib.tolist()), vb.tolist(), strict=True)]
        dash["steered_bottom_logit_ids"] = ib.tolist()
        dash["steered_config"] = {"n_contexts": len(ends), "context_len": L, "steer_scale": steer_scale}
    return dashboards


def write_dashboards(run_dir: str | Path, layer: int, dashboards: dict[int, dict]) -> Path:
    """Write ``features/L{layer:02d}/f{feature}.json`` for each dashboard plus ``index.json``.

    An existing index is merged: entries of features not in ``dashboards`` are kept.
    """
    from ..dictionary.io import atomic_write_text

    folder = Path(run_dir) / "features" / f"L{layer:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[int, dict] = {}
    idx_path = folder / "index.json"
    if idx_path.exists():
        try:
            for e in json.loads(idx_path.read_text(encoding="utf-8")):
                if isinstance(e, dict) and isinstance(e.get("feature"), int):
                    index[e["feature"]] = e
        except (ValueError, TypeError):
            index = {}
    for f, dash in sorted(dashboards.items()):
        atomic_write_text(folder / f"f{int(f)}.json", json.dumps(dash, ensure_ascii=False, allow_nan=False))
        index[int(f)] = {
            "feature": int(f),
            "label": dash.get("label"),
            "verdict": dash.get("verdict"),
            "density": dash.get("density"),
            "max_act": dash.get("max_act"),
        }
    atomic_write_text(idx_path, json.dumps([index[f] for f in sorted(index)], indent=0, ensure_ascii=False))
    return folder
