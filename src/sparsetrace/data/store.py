"""Harvesting activations and streaming them back as shuffled batches.

``harvest`` runs the frozen model over token windows, reads every requested hookpoint in the same
forward pass, stops after the deepest layer it needs, and writes the activations into an
:class:`ActivationCache`: one ``.npy`` file per hookpoint, ``[n_tokens, d]``, memory-mapped. Memory
stays bounded (the OS pages the files in and out) and batches are addressed by index, so the order of
batches is a pure function of ``(seed, step)``: a resumed run sees exactly the batches an
uninterrupted run would have seen, and DDP ranks take disjoint slices of the same permutation.

Caches are keyed by model, hookpoints and token windows, and reused across runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint
from .tokens import windows_digest


def default_cache_root() -> Path:
    return Path(os.environ.get("SPARSETRACE_CACHE", Path.home() / ".cache" / "sparsetrace"))


@dataclass
class CacheMeta:
    model_id: str
    hookpoints: list[str]
    n_tokens: int
    d: dict[str, int]
    dtype: str
    windows: str
    context: int
    complete: bool = False


class ActivationCache:
    """A folder of memory-mapped activation matrices, one per hookpoint."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise DataError(f"'{self.folder}' is not an activation cache (no meta.json)")
        try:
            self.meta = CacheMeta(**json.loads(meta_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, RecursionError) as e:
            raise DataError(f"activation cache '{self.folder}' has an unreadable meta.json ({e})") from None
        if not self.meta.complete:
            raise DataError(f"activation cache '{self.folder}' is incomplete (harvest was interrupted)")
        try:
            self.arrays = {
                hp: np.load(self.folder / f"{Path(hp).name}.npy", mmap_mode="r", allow_pickle=False)
                for hp in self.meta.hookpoints
            }
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"activation cache '{self.folder}' is corrupt ({e})") from None
        for hp, arr in self.arrays.items():
            if arr.ndim != 2 or arr.shape[0] != self.meta.n_tokens:
                raise DataError(
                    f"activation cache '{self.folder}' is corrupt: {hp}.npy has shape {arr.shape}, "
                    f"expected ({self.meta.n_tokens}, d)"
                )

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    def get(self, hookpoint: Hookpoint | str, index: Tensor | np.ndarray | slice) -> Tensor:
        arr = self.arrays[str(hookpoint)]
        if isinstance(index, Tensor):
            index = index.numpy()
        if isinstance(index, np.ndarray):
            index = np.sort(index)  # sorted gathers are much faster on a memmap; order is re-shuffled by caller
        return torch.from_numpy(np.array(arr[index], dtype=np.float32))

    def mean_sq_norm(self, hookpoint: Hookpoint | str, n: int = 20000) -> float:
        arr = self.arrays[str(hookpoint)]
        step = max(1, arr.shape[0] // n)
        x = torch.from_numpy(np.array(arr[::step], dtype=np.float32))
        return float((x**2).sum(-1).mean())


def cache_key(model_id: str, hookpoints: list[Hookpoint], windows: Tensor, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(",".join(str(x) for x in hookpoints).encode())
    h.update(windows_digest(windows).encode())
    h.update(dtype.encode())
    return h.hexdigest()[:20]


def harvest(
    lm: LanguageModel,
    windows: Tensor,
    hookpoints: list[Hookpoint],
    *,
    cache_dir: Path | None = None,
    batch_windows: int = 16,
    dtype: str = "float32",
    progress: bool = True,
    desc: str = "harvest",
) -> ActivationCache:
    """Harvest ``hookpoints`` over ``windows`` (BOS position dropped) into a memory-mapped cache."""
    hookpoints = sorted(set(hookpoints), key=lambda h: (h.layer, h.name))
    for hp in hookpoints:
        lm.check(hp)
    key = cache_key(lm.model_id, hookpoints, windows, dtype)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "activations"
    folder = root / key
    if (folder / "meta.json").exists():
        try:
            return ActivationCache(folder)
        except DataError:
            shutil.rmtree(folder, ignore_errors=True)
    skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
    n_windows, context = windows.shape
    per_window = context - skip
    n_tokens = n_windows * per_window
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    d = {str(hp): lm.d_model for hp in hookpoints}
    np_dtype = np.float16 if dtype == "float16" else np.float32
    try:
        tmp.mkdir(parents=True)
        arrays = {
            str(hp): np.lib.format.open_memmap(
                tmp / f"{hp}.npy", mode="w+", dtype=np_dtype, shape=(n_tokens, d[str(hp)])
            )
            for hp in hookpoints
        }
        for hp in hookpoints:
            _preallocate(tmp / f"{hp}.npy")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        need = n_tokens * sum(d.values()) * np.dtype(np_dtype).itemsize
        raise ConfigError(
            f"cannot write the activation cache in '{root}' ({e.strerror or e}; it needs {need / 1e6:.1f} MB); "
            f"free some space or set SPARSETRACE_CACHE to another folder"
        ) from None
    stop = max(h.layer for h in hookpoints)
    row = 0
    bar = tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False)
    for start in range(0, n_windows, batch_windows):
        ids = windows[start : start + batch_windows].to(lm.device)
        out = lm.run(ids, read=hookpoints, stop_after=stop)
        n = ids.shape[0] * per_window
        for hp in hookpoints:
            a = out.acts[hp][:, skip:, :].reshape(n, -1)
            if not torch.isfinite(a).all():
                bad = (~torch.isfinite(a)).nonzero()[0].tolist()
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(
                    f"non-finite activation (NaN/inf) at hookpoint {hp}, window {start + bad[0] // per_window}; "
                    f"expected finite values: check the model's dtype and weights"
                )
            arrays[str(hp)][row : row + n] = a.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()
        row += n
        bar.update(n)
    bar.close()
    for arr in arrays.values():
        arr.flush()
    del arrays
    meta = CacheMeta(
        model_id=lm.model_id,
        hookpoints=[str(h) for h in hookpoints],
        n_tokens=n_tokens,
        d=d,
        dtype=dtype,
        windows=windows_digest(windows),
        context=context,
        complete=True,
    )
    (tmp / "meta.json").write_text(json.dumps(meta.__dict__, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return ActivationCache(folder)


def _preallocate(path: Path) -> None:
    """Reserve a memory-mapped file's blocks now: on a full disk, writing into a sparse memmap later
    kills the process with SIGBUS instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            # the file system cannot preallocate (EOPNOTSUPP, EINVAL, ...): go on without it


class BatchSchedule:
    """Deterministic shuffled batches over a cache: batch ``step`` depends only on (seed, step).

    With ``world_size > 1`` each rank gets a disjoint ``batch_size // world_size`` slice of the
    global batch, so DDP sees the same data as a single process with the full batch.
    """

    def __init__(self, n_tokens: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        if batch_size > n_tokens:
            raise DataError(f"batch size {batch_size} is larger than the {n_tokens} harvested tokens")
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} is not divisible by world size {world_size}")
        self.n_tokens, self.batch_size, self.seed = n_tokens, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n_tokens // batch_size
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    def indices(self, step: int) -> Tensor:
        epoch, b = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.n_tokens, generator=g)
            self._perm_epoch = epoch
        assert self._perm is not None
        idx = self._perm[b * self.batch_size : (b + 1) * self.batch_size]
        per_rank = self.batch_size // self.world_size
        return idx[self.rank * per_rank : (self.rank + 1) * per_rank]

    def batches(self, cache: ActivationCache, hookpoints: list[str], start_step: int, n_steps: int) -> Iterator[dict]:
        for step in range(start_step, n_steps):
            idx = self.indices(step)
            order = torch.argsort(torch.argsort(idx))  # rows come back sorted; restore the random order
            yield {hp: cache.get(hp, idx)[order] for hp in hookpoints}
