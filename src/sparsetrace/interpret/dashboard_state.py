"""Fixed-size running statistics of feature activations for dashboards (nothing grows with the corpus).

- running top-k windows by the feature's maximum activation in the window (window index, where the
  trimmed excerpt starts, and the per-token activations of that excerpt only), merged per batch with
  one ``topk`` over ``[features, k + batch]``;
- an activation histogram over fixed log-spaced bins (``torch.bucketize`` + ``bincount``) and firing
  counts (density = firing tokens / tokens);
- uniform samples of windows per coarse activation bin (a seeded bottom-k-by-random-key reservoir,
  merged per batch with two stable sorts), from which quantile groups are drawn at the end, weighted by
  how many windows each coarse bin saw.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DashboardState"]


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
