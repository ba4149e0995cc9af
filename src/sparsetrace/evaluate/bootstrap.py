"""Seeded bootstrap intervals over held-out windows.

Every figure evaluate reports is a ratio of sums over windows (a mean CE, FVU = squared error over
variance, CE recovered = a ratio of CE differences). Resampling windows with replacement is then one
matrix product: ``counts [n_boot, n_windows] @ per_window [n_windows, ...]`` gives each resample's sums,
and the figure is computed from those sums exactly as from the full sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

N_BOOT = 1000
LEVEL = 0.95


def resample_counts(n_windows: int, n_boot: int = N_BOOT, seed: int = 0) -> Tensor:
    """[n_boot, n_windows] float64: how often each window is drawn in each resample."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_windows, (n_boot, n_windows), generator=g)
    rows = torch.arange(n_boot).unsqueeze(1).expand_as(idx)
    counts = torch.zeros(n_boot, n_windows, dtype=torch.float64)
    counts.index_put_((rows.reshape(-1), idx.reshape(-1)), torch.ones(idx.numel(), dtype=torch.float64),
                      accumulate=True)
    return counts


def interval(values: Tensor, level: float = LEVEL) -> list[float]:
    """The central ``level`` percentile interval of bootstrap ``values`` (NaNs dropped)."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0:
        return [float("nan"), float("nan")]
    lo, hi = torch.quantile(v, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [float(lo), float(hi)]
