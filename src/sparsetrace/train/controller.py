"""Sparsity control: the λ controller, JumpReLU threshold initialisation and the final L0 calibration.

:class:`L0Controller` steers log λ towards a target L0. It is an integral controller on the log-ratio
of the smoothed L0 to the target, with a look-ahead term: the error it integrates is the one expected
``horizon`` steps ahead at the current rate of change of log L0. The dictionary answers a change of λ
only after many optimiser steps, so a plain integral controller keeps raising λ while L0 is already
falling fast and overshoots far past the target (a 10-100x excursion of λ, a collapsed dictionary,
then a slow climb back). With the look-ahead it stops pushing once L0 is on its way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class L0Controller:
    """Integral control of log λ towards a target L0, on the error projected ``horizon`` steps ahead."""

    def __init__(self, target: float, log_lambda: float, gain: float, smoothing: float = 0.8,
                 horizon: float = 20.0):
        self.target = float(target)
        self.log_lambda = float(log_lambda)
        self.gain = float(gain)
        self.smoothing = smoothing
        self.horizon = float(horizon)
        self.ema_l0: float | None = None
        self.prev_err: float | None = None

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda)

    def update(self, l0: float) -> float:
        self.ema_l0 = l0 if self.ema_l0 is None else self.smoothing * self.ema_l0 + (1 - self.smoothing) * l0
        err = math.log((self.ema_l0 + 1.0) / (self.target + 1.0))
        slope = 0.0 if self.prev_err is None else err - self.prev_err
        self.prev_err = err
        ahead = err + self.horizon * slope
        self.log_lambda += self.gain * max(-1.0, min(1.0, ahead))
        self.log_lambda = max(-30.0, min(10.0, self.log_lambda))
        return self.value

    def state(self) -> dict:
        return {"log_lambda": self.log_lambda, "ema_l0": self.ema_l0, "prev_err": self.prev_err}

    def load(self, s: dict) -> None:
        self.log_lambda, self.ema_l0 = s["log_lambda"], s["ema_l0"]
        self.prev_err = s.get("prev_err")


@torch.no_grad()
def init_thresholds(pre: Tensor, fire_rate: float, floor: float = 1e-3) -> Tensor:
    """Per-feature JumpReLU thresholds at which each feature fires on ``fire_rate`` of the rows of ``pre``.

    A fixed initial threshold puts the start of training wherever the encoder's scale happens to put it
    (about half of all features active for unit-scale inputs), and the L0 penalty then has to move every
    threshold by several units through Adam steps of size ``lr``: far more steps than a run has.
    """
    q = min(max(1.0 - fire_rate, 0.0), 1.0)
    thr = torch.quantile(pre.float(), q, dim=0)
    return thr.clamp_min(floor)


@torch.no_grad()
def calibration_shift(pre: Tensor, threshold: Tensor | None, target: float, tolerance: float = 0.05) -> float:
    """One constant added to every pre-activation so the mean L0 over the rows of ``pre`` equals ``target``.

    Returns 0.0 when the L0 is already within ``tolerance`` (relative) of the target.
    """
    thr = threshold if threshold is not None else torch.zeros(pre.shape[-1], device=pre.device)

    def l0(shift: float) -> float:
        return float(((pre + shift) > thr).float().sum(-1).mean())

    if abs(l0(0.0) - target) / target <= tolerance:
        return 0.0
    span = float(pre.abs().max()) + float(thr.abs().max()) + 1.0
    lo, hi = -span, span  # l0 is increasing in shift
    for _ in range(50):
        mid = (lo + hi) / 2
        if l0(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
