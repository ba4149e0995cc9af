"""What training knows that evaluation cannot see: statistics of the training stream and of the final
L0 calibration, saved beside each dictionary.

- ``training_stats.safetensors``: ``target_mean`` (the mean of the output hookpoint over the training
  stream's last pass, raw units: evaluation's mean-ablation reference), ``fire_count`` (per-feature
  firings over the same tokens: "dead" means 0 here), ``b_enc_before_calibration`` and, for JumpReLU,
  ``threshold_before_calibration`` (as training left them, so evaluation can measure what the
  calibration did; it shifts JumpReLU thresholds and the other activations' encoder bias).
- ``training_stats.json``: token count of that window, the controller's own L0 at the end of training
  (before calibration), the calibration shift, L0 and FVU on a training sample before and after it,
  and any warnings.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor

from ..data.store import ActivationCache
from ..dictionary.io import atomic_write_text, write_failed
from ..dictionary.model import Code
from .controller import calibration_shift

if TYPE_CHECKING:
    from .trainer import LayerTrainer

STATS_TENSORS = "training_stats.safetensors"
STATS_JSON = "training_stats.json"
L0_TOLERANCE = 0.25  # warn when the controller's own L0 is further than this (relative) from the target
CALIBRATION_FVU_TOLERANCE = 0.05  # warn when calibration raises FVU by more than this (relative)


class TrainingStream:
    """Per-feature firing counts and the target's sum over the steps from ``start_step`` on (this rank)."""

    def __init__(self, n_features: int, d_out: int, start_step: int, device: str | torch.device = "cpu"):
        self.start_step = start_step
        self.fire_count = torch.zeros(n_features, dtype=torch.long, device=device)
        self.sum_y = torch.zeros(d_out, dtype=torch.float64, device=device)
        self.n_tokens = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def add(self, step: int, counts: Tensor, y: Tensor) -> None:
        if step < self.start_step:
            return
        self.fire_count += counts
        self.sum_y += y.double().sum(0)
        self.n_tokens += y.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {"fire_count": self.fire_count, "sum_y": self.sum_y, "n_tokens": self.n_tokens}

    def load(self, t: dict[str, Tensor]) -> None:
        if t:  # checkpoints from before these statistics existed start them afresh
            self.fire_count = t["fire_count"].clone().to(self.fire_count.device)
            self.sum_y = t["sum_y"].clone().to(self.sum_y.device)
            self.n_tokens = t["n_tokens"].clone().to(self.n_tokens.device)

    def reduced(self, data_parallel: bool) -> dict[str, Tensor]:
        t = {k: v.clone() for k, v in self.tensors().items()}
        if data_parallel and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for v in t.values():
                dist.all_reduce(v)
        return t


def feature_counts(code: Code, n_features: int) -> Tensor:
    """How many rows each feature fired on, [n_features] long."""
    if code.counts is not None:
        return code.counts.to(torch.long)
    if code.dense is not None:
        return (code.dense > 0).sum(0).to(torch.long)
    active = code.values > 0
    return torch.bincount(code.indices[active].reshape(-1), minlength=n_features).to(torch.long)


def _fvu(y_hat: Tensor, y: Tensor) -> float:
    var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float((y_hat - y).pow(2).sum() / var)


def warn(msg: str) -> str:
    print(f"warning: {msg}", file=sys.stderr, flush=True)
    return msg


@torch.no_grad()
def finish_layer(tr: LayerTrainer, cache: ActivationCache, n_tokens: int = 8192) -> dict:
    """Measure the dictionary on a training sample, calibrate its L0 (ReLU/JumpReLU, unless turned off),
    measure again; returns the record (warnings included). Leaves the dictionary in eval mode."""
    d, tcfg = tr.dictionary, tr.tcfg
    d.eval()
    g = torch.Generator().manual_seed(tcfg.seed * 31 + 17)
    idx = torch.randint(0, cache.n_tokens, (min(n_tokens, cache.n_tokens),), generator=g)
    x = cache.get(tr.hp_in, idx).to(tcfg.device) / tr.in_scale
    y = cache.get(tr.hp_out, idx).to(tcfg.device) / tr.out_scale

    def measure() -> tuple[float, float]:
        f = d.features(x)
        return float((f > 0).sum(-1).float().mean()), _fvu(d.decode(f, x), y)

    l0_before, fvu_before = measure()
    b_before = d.b_enc.detach().clone()
    thr_before = d.threshold.detach().clone() if d.log_threshold is not None else None
    shift = None
    if tr.uses_lambda and tcfg.calibrate:
        shift = calibration_shift(d.pre_activations(x), d.threshold, tr.target_l0)
        if d.log_threshold is not None:
            # JumpReLU: move the thresholds, not the bias, so the values of the features that fire stay
            # as trained (pre + shift > θ  <=>  pre > θ - shift)
            d.log_threshold.copy_((d.threshold - shift).clamp_min(1e-6).log())
        else:
            d.b_enc.add_(shift)
    l0_after, fvu_after = measure() if shift else (l0_before, fvu_before)
    controller_l0 = tr.controller.ema_l0 if tr.uses_lambda else tr.last_l0
    rec = {
        "layer": tr.layer,
        "target_l0": tr.target_l0,
        "controller_l0": controller_l0,
        "lambda": tr.controller.value if tr.uses_lambda else None,
        "l0_before_calibration": l0_before,
        "fvu_before_calibration": fvu_before,
        "calibration_shift": shift,
        "l0_after_calibration": l0_after,
        "fvu_after_calibration": fvu_after,
        "sample_tokens": int(x.shape[0]),
        "warnings": [],
    }
    rec["warnings"] = sparsity_warnings(rec, tr.uses_lambda)
    tr.b_enc_before_calibration = b_before
    tr.threshold_before_calibration = thr_before
    return rec


def sparsity_warnings(rec: dict, uses_lambda: bool) -> list[str]:
    """The loud lines: the controller missed its target, or the calibration hurt reconstruction."""
    out = []
    target, layer = rec["target_l0"], rec["layer"]
    l0 = rec["l0_before_calibration"]
    if l0 is not None and abs(l0 - target) / target > L0_TOLERANCE:
        # every activation: BatchTopK's inference threshold (an estimate kept during training) can miss k
        what = "before calibration" if uses_lambda else "at inference (no calibration for this activation)"
        out.append(warn(
            f"layer {layer}: training ended at L0 {l0:.1f} for a target of {target:g} "
            f"({(l0 - target) / target:+.0%}, more than {L0_TOLERANCE:.0%} off) {what}"
        ))
    fb, fa = rec["fvu_before_calibration"], rec["fvu_after_calibration"]
    if rec.get("calibration_shift") and fb > 0 and (fa - fb) / fb > CALIBRATION_FVU_TOLERANCE:
        out.append(warn(
            f"layer {layer}: the final L0 calibration raised FVU from {fb:.3f} to {fa:.3f} "
            f"({(fa - fb) / fb:+.0%}) on training tokens"
        ))
    return out


def save_training_stats(tr: LayerTrainer, folder: Path, rec: dict, stream: dict[str, Tensor]) -> None:
    """Write the two training_stats files into the dictionary folder (atomically, beside its manifest)."""
    n = int(stream["n_tokens"].item())
    mean = (stream["sum_y"] / max(n, 1) * tr.out_scale).float().cpu()
    tensors = {
        "target_mean": mean,
        "fire_count": stream["fire_count"].cpu(),
        "b_enc_before_calibration": tr.b_enc_before_calibration.float().cpu(),
    }
    if tr.threshold_before_calibration is not None:
        tensors["threshold_before_calibration"] = tr.threshold_before_calibration.float().cpu()
    path = Path(folder) / STATS_TENSORS
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".stats.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, e) from None
    fired = stream["fire_count"]
    info = {**rec, "stream_tokens": n, "hookpoint_out": tr.hp_out,
            "dead_frac_train": float((fired == 0).float().mean()) if n else math.nan}
    atomic_write_text(Path(folder) / STATS_JSON, json.dumps(info, indent=2))
