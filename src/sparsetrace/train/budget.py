"""Wall-time budgets and snapshots for per-layer training (``--time-budget``, ``--snapshot-at``).

A user rarely trains for a number of steps: they train until their time is up. With ``time_budget``
(minutes) the clock starts when the run starts (``run_training``: before the corpus and the model are
loaded, so loading, tokenising and harvesting count), training stops at the first step boundary after
the budget is spent, and the dictionaries are then finished and saved as usual (the L0 calibration and
the save run after the budget). The learning-rate warm-up and decay, the JumpReLU threshold warm-up and
the end of dead-feature resampling follow the fraction of the *training* time elapsed (from the first
batch's arrival to the end of the budget) instead of the fraction of steps; ``n_tokens * epochs`` is then only an
upper bound on the steps.

``snapshot_at`` (minutes on the same clock) saves a copy of every dictionary, normalisation folded in but
not calibrated, to ``OUT/snapshots/<minutes>min/<dictionary>/`` at the first step boundary after each
time, with ``snapshot.json`` (elapsed seconds, steps, tokens). A time-budget run cannot be resumed (its
schedule depends on the wall time it had), so it writes no checkpoints.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ..dictionary.io import atomic_write_text, save_dictionary
from .checkpoint import dictionary_dirname
from .config import TrainConfig


def schedule_factor(progress: float, warmup_frac: float, decay_frac: float) -> float:
    """Learning-rate multiplier at ``progress`` (0..1 of the training time): linear warm-up over the
    first ``warmup_frac``, constant, linear decay to 0 over the last ``decay_frac``."""
    p = min(max(progress, 0.0), 1.0)
    if warmup_frac > 0 and p < warmup_frac:
        return max(p, 1e-3) / warmup_frac
    if decay_frac > 0 and p >= 1 - decay_frac:
        return max(0.0, (1 - p) / decay_frac)
    return 1.0


class WallClock:
    """The run's wall clock: budget, schedule progress and due snapshots (``time.time()`` seconds)."""

    def __init__(self, tcfg: TrainConfig, start: float | None = None, now=time.time):
        self.now = now
        self.start = self.now() if start is None else start
        self.budget_s = None if tcfg.time_budget is None else 60.0 * tcfg.time_budget
        self.pending = sorted(float(m) for m in tcfg.snapshot_at)
        self.train_start: float | None = None
        self.steps = 0
        self.stop_reason = "steps"  # or "time budget"
        self.stopped_s: float | None = None  # elapsed seconds when the last step ended (before the final save)
        self.snapshots: list[dict] = []

    @property
    def active(self) -> bool:
        return self.budget_s is not None

    def begin_training(self) -> None:
        self.train_start = self.now()

    def elapsed(self) -> float:
        return self.now() - self.start

    def progress(self) -> float | None:
        """Fraction of the training time elapsed (None without a budget)."""
        if self.budget_s is None:
            return None
        t0 = self.train_start if self.train_start is not None else self.now()
        span = self.start + self.budget_s - t0
        if span <= 0:
            return 1.0
        return min(1.0, max(0.0, (self.now() - t0) / span))

    def spent(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s

    def due(self) -> list[float]:
        """Snapshot times (minutes) that have passed since the last call."""
        t = self.elapsed() / 60.0
        out = [m for m in self.pending if m <= t]
        self.pending = [m for m in self.pending if m > t]
        return out


def save_snapshot(trainers, out_dir: Path, minutes: float, clock: WallClock, batch_size: int) -> Path:
    """A usable copy of every trainer's dictionary now (normalisation folded in, no calibration)."""
    folder = Path(out_dir) / "snapshots" / f"{minutes:g}min"
    for tr in trainers:
        d = copy.deepcopy(tr.dictionary)
        d.eval()
        d.fold_normalisation(tr.in_scale, tr.out_scale)
        save_dictionary(d, folder / dictionary_dirname(tr.layer, tr.tcfg.kind))
    steps = min(tr.step for tr in trainers)
    rec = {"minutes": minutes, "elapsed_s": round(clock.elapsed(), 2), "steps": steps,
           "tokens": steps * batch_size, "calibrated": False}
    atomic_write_text(folder / "snapshot.json", json.dumps(rec, indent=2))
    clock.snapshots.append({**rec, "path": str(folder)})
    return folder
