"""Streaming activations: batches straight from the model's forward passes, no on-disk store.

The frozen model runs over *chunks* of token windows (stopping after the deepest layer needed, no LM
head); each chunk's activations of every requested hookpoint go into one bounded buffer (at most
``buffer_tokens`` rows per hookpoint), whose rows are read in a shuffled order; batches are
``dict[str(hookpoint) -> Tensor[batch, d]]``, the same dicts :meth:`~.store.BatchSchedule.batches`
yields, so every layer's dictionary trains on the same batches.

Order, a pure function of ``(seed, step)`` (and of the windows, batch size, buffer size and world size):

* epoch ``e`` permutes the windows (the same permutation on every rank); rank ``r`` of ``world_size``
  takes every ``world_size``-th of them, in that order, and cuts them into chunks of
  ``ceil(buffer_tokens / tokens_per_window)`` windows;
* chunk ``j``'s rows are read in a permutation seeded by ``(seed, e, j, r)``; the rank's stream of an
  epoch is its chunks one after another, and batch ``step`` is rows ``[i * b, (i + 1) * b)`` of epoch
  ``e`` where ``e, i = divmod(step, steps_per_epoch)`` and ``b = batch_size // world_size``; rows left
  over at the end of an epoch are dropped, as :class:`~.store.BatchSchedule` does.

So a run resumed at step ``s`` recomputes only the chunk holding batch ``s`` (the run is not replayed),
and DDP ranks read disjoint windows, each rank running the model on its own share only. Each epoch
runs the model over the corpus again: ``epochs`` x the forward cost of a single harvest (a disk cache
pays it once and then reads the disk), except when one process's buffer holds every window: then the
buffer is computed once, in window order, and each epoch only re-permutes its rows (same order rule). The resident cost is the buffer (rows x hookpoints x d x dtype)
plus one forward pass of ``batch_windows`` windows.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import DataError
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint

__all__ = ["ActivationStream", "stream_batches"]


def _generator(*parts: int) -> torch.Generator:
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


@dataclass
class StreamMeta:
    """What the trainer reads of a cache's ``meta``: the width of each hookpoint."""

    hookpoints: list[str]
    d: dict[str, int] = field(default_factory=dict)


class ActivationStream:
    """Shuffled batches of activations computed on the fly, with the face of an activation cache.

    ``batches(hookpoints, start_step, end_step)`` yields the batches of steps ``start_step..end_step-1``.
    ``n_tokens`` and ``get(hp, idx)`` address the rows of the buffer now held (the chunk that holds the
    last batch yielded; the first chunk before any; rank 0's under DDP), which is where dead-feature
    resampling and the final calibration draw their samples; ``mean_sq_norm(hp)`` is measured on the first chunk of epoch 0
    (averaged over DDP ranks), whatever step a run starts at. ``total_tokens``: tokens per epoch over
    all ranks.
    """

    def __init__(
        self,
        lm: LanguageModel,
        windows: Tensor,
        hookpoints: list[Hookpoint | str],
        *,
        batch_size: int,
        seed: int,
        buffer_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        batch_windows: int = 16,
        dtype: str = "float32",
        progress: bool = True,
    ):
        hps = sorted({h if isinstance(h, Hookpoint) else Hookpoint.parse(str(h)) for h in hookpoints},
                     key=lambda h: (h.layer, h.name))
        if not hps:
            raise DataError("no hookpoints to stream; expected at least one")
        for hp in hps:
            lm.check(hp)
        if batch_size < 1 or batch_size % world_size:
            raise DataError(f"batch size {batch_size} is not divisible by world size {world_size}")
        if buffer_tokens < 1:
            raise DataError(f"stream buffer of {buffer_tokens} tokens is invalid; expected at least 1")
        self.lm, self.hookpoints = lm, hps
        self.windows = windows
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch = batch_size // world_size
        self.skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
        n_windows, context = windows.shape
        self.per_window = context - self.skip
        self.windows_per_rank = n_windows // world_size
        self.rows_per_epoch = self.windows_per_rank * self.per_window
        if self.rows_per_epoch < self.batch:
            raise DataError(
                f"batch size {batch_size} is larger than the {self.rows_per_epoch * world_size} streamed tokens"
            )
        self.steps_per_epoch = self.rows_per_epoch // self.batch
        self.chunk_windows = max(1, math.ceil(buffer_tokens / self.per_window))
        # one process whose buffer holds every window: the model runs once, later epochs re-permute
        self.whole = world_size == 1 and self.chunk_windows >= self.windows_per_rank
        if self.whole:
            self.chunk_windows = self.windows_per_rank
        self.chunk_rows = self.chunk_windows * self.per_window
        self.total_tokens = self.rows_per_epoch * world_size
        self.batch_windows = max(1, int(batch_windows))
        self.store_dtype = torch.float16 if dtype == "float16" else torch.float32
        self.meta = StreamMeta([str(h) for h in hps], {str(h): lm.d_model for h in hps})
        self.progress = progress
        self.forwarded = 0  # tokens run through the model (all chunks, this process)
        self.seconds_forward = 0.0  # wall time spent computing chunks
        self._key: tuple[int, int] | None = None
        self._buf: dict[str, Tensor] = {}
        self._perm: Tensor | None = None
        self._norms: dict[str, float] | None = None
        self._bar: tqdm | None = None

    # ------------------------------------------------------------------ the cache-like face
    @property
    def buffer_rows(self) -> int:
        """Rows the buffer holds at most (one chunk)."""
        return self.chunk_rows

    @property
    def n_tokens(self) -> int:
        if self._key is None:
            self._load(0, 0)
        return int(self._perm.numel())

    def get(self, hookpoint: Hookpoint | str, index: Tensor | slice) -> Tensor:
        """Rows ``index`` of the buffer now held, as float32 (a copy). Under DDP every rank gets rank 0's
        rows (ranks hold different windows; resampling and calibration must pick the same rows on all)."""
        if self._key is None:
            self._load(0, 0)
        rows = self._buf[str(hookpoint)][index].float()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            rows = rows.contiguous()
            dist.broadcast(rows, src=0)
        return rows

    def mean_sq_norm(self, hookpoint: Hookpoint | str, n: int = 20000) -> float:  # noqa: ARG002 - cache's API
        if self._norms is None:
            if self._key != (0, 0):
                self._load(0, 0)
            assert self._norms is not None
        return self._norms[str(hookpoint)]

    def close(self) -> None:
        self._buf, self._perm, self._key = {}, None, None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ batches
    def batches(self, hookpoints: list[str] | None, start_step: int, end_step: int) -> Iterator[dict[str, Tensor]]:
        names = [str(h) for h in (hookpoints if hookpoints is not None else self.hookpoints)]
        for name in names:
            if name not in self.meta.d:
                raise DataError(f"hookpoint '{name}' is not streamed; expected one of {', '.join(self.meta.d)}")
        if self.progress and self._bar is None:  # tokens through the model (about one per batch row)
            self._bar = tqdm(total=max(0, end_step - start_step) * self.batch, desc="stream", unit="tok",
                             unit_scale=True, leave=False, position=1)
        try:
            for step in range(start_step, end_step):
                yield self.batch_at(step, names)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def batch_at(self, step: int, names: list[str]) -> dict[str, Tensor]:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        lo, hi = i * self.batch, (i + 1) * self.batch
        pieces: list[dict[str, Tensor]] = []
        while lo < hi:
            j = lo // self.chunk_rows
            end = min(hi, (j + 1) * self.chunk_rows)
            self._load(epoch, j)
            rows = self._perm[lo - j * self.chunk_rows : end - j * self.chunk_rows]
            pieces.append({n: self._buf[n][rows].float() for n in names})
            lo = end
        if len(pieces) == 1:
            return pieces[0]
        return {n: torch.cat([p[n] for p in pieces]) for n in names}

    # ------------------------------------------------------------------ chunks
    def chunk_windows_of(self, epoch: int, j: int) -> Tensor:
        """Indices (into ``windows``) of chunk ``j`` of ``epoch`` on this rank."""
        perm = torch.randperm(self.windows.shape[0], generator=_generator(self.seed, 1, epoch))
        mine = perm[self.rank :: self.world_size][: self.windows_per_rank]
        return mine[j * self.chunk_windows : (j + 1) * self.chunk_windows]

    def _load(self, epoch: int, j: int) -> None:
        if self._key == (epoch, j):
            return
        t0 = time.perf_counter()
        if self.whole:  # the buffer holds every window: computed once, each epoch re-permutes it
            if not self._buf:
                self._buf = self._forward(torch.arange(self.windows_per_rank))
            order = self.chunk_windows_of(epoch, 0)
            rows = (order[:, None] * self.per_window + torch.arange(self.per_window)).reshape(-1)
            self._perm = rows[torch.randperm(rows.numel(), generator=_generator(self.seed, 2, epoch, 0, self.rank))]
        else:
            self._buf, self._perm, self._key = {}, None, None  # free the old chunk before the next is computed
            self._buf = self._forward(self.chunk_windows_of(epoch, j))
            n = next(iter(self._buf.values())).shape[0]
            self._perm = torch.randperm(n, generator=_generator(self.seed, 2, epoch, j, self.rank))
        self._key = (epoch, j)
        self.seconds_forward += time.perf_counter() - t0
        if (epoch, j) == (0, 0) and self._norms is None:
            self._norms = self._first_norms()

    def _forward(self, idx: Tensor) -> dict[str, Tensor]:
        """Every hookpoint's activations over windows ``idx`` (BOS dropped), rows in window order."""
        n = idx.numel() * self.per_window
        buf = {str(h): torch.empty(n, self.lm.d_model, dtype=self.store_dtype) for h in self.hookpoints}
        stop = max(h.layer for h in self.hookpoints)
        at = 0
        for s in range(0, idx.numel(), self.batch_windows):
            sub = idx[s : s + self.batch_windows]
            out = self.lm.run(self.windows[sub].to(self.lm.device), read=self.hookpoints, stop_after=stop)
            m = sub.numel() * self.per_window
            for h in self.hookpoints:
                a = out.acts[h][:, self.skip :, :].reshape(m, -1)
                if not torch.isfinite(a).all():
                    w = int(sub[int((~torch.isfinite(a)).nonzero()[0, 0]) // self.per_window])
                    raise DataError(
                        f"non-finite activation (NaN/inf) at hookpoint {h}, window {w}; "
                        f"expected finite values: check the model's dtype and weights"
                    )
                buf[str(h)][at : at + m] = a.to(device="cpu", dtype=self.store_dtype)
            del out
            at += m
            self.forwarded += m
            if self._bar is not None:
                self._bar.update(m)
        return buf

    def _first_norms(self) -> dict[str, float]:
        names = list(self.meta.d)
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        for k, n in enumerate(names):
            buf = self._buf[n]
            for s in range(0, buf.shape[0], 4096):  # in slices: no full-size temporary
                sums[k] += buf[s : s + 4096].float().pow(2).sum(dtype=torch.float64)
        sums[-1] = float(self._perm.numel())
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        count = float(sums[-1])
        return {n: float(sums[k]) / max(count, 1.0) for k, n in enumerate(names)}


def stream_batches(
    lm: LanguageModel,
    windows: Tensor,
    hookpoints: list[Hookpoint | str],
    batch_size: int,
    seed: int,
    start_step: int,
    n_steps: int,
    buffer_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Batches of steps ``start_step .. n_steps - 1`` (``n_steps``: the run's total, so a resumed run
    passes its resume step and the same ``n_steps``); each a ``dict[str(hookpoint) -> float32
    Tensor[batch_size // world_size, d_model]]`` on the CPU. Deterministic in ``(seed, step)``; see the
    module docstring. ``buffer_tokens``: rows held per hookpoint (the memory bound); rank ``rank`` of
    ``world_size`` gets its disjoint share of every global batch of ``batch_size`` tokens."""
    stream = ActivationStream(lm, windows, hookpoints, batch_size=batch_size, seed=seed,
                              buffer_tokens=buffer_tokens, rank=rank, world_size=world_size, progress=progress)
    yield from stream.batches(None, start_step, n_steps)
