"""Harvesting activations and streaming them back as shuffled batches.

``harvest`` runs the frozen model over token windows, reads every requested hookpoint in the same
forward pass, stops after the deepest layer it needs, and writes the activations into an
:class:`ActivationCache`: one ``.npy`` file per hookpoint, ``[n_tokens, d]``, written sequentially with
plain file writes (no page of it is mapped into the process) and read back memory-mapped. Batches are
addressed by index, so the order of batches is a pure function of ``(seed, step)``: a resumed run sees
exactly the batches an uninterrupted run would have seen, and DDP ranks take disjoint slices of the
same permutation.

Resident memory: every page of a memory-mapped file that a gather touches stays mapped, and counts in
the process's RSS, until the mapping goes away, so random batches over an epoch make the whole cache
resident. With ``max_resident_bytes`` the cache keeps at most that many bytes mapped: a cache that fits
is memory-mapped as usual; a larger one is read with positional reads (``preadv``) into fresh buffers,
which leave nothing mapped (the OS page cache still serves repeated reads, outside the process).
Counting touched pages and dropping them with ``madvise(MADV_DONTNEED)`` is not a bound: recent kernels
map a whole large folio (up to 2 MiB) on a read fault, so one 2 KiB row can add hundreds of KiB of RSS.
Both ways return the same bytes, so results are bit-identical with and without a budget.

Caches are keyed by model, hookpoints and token windows, and reused across runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
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
    """A folder of memory-mapped activation matrices, one per hookpoint.

    ``max_resident_bytes`` (optional) bounds how much of the files the process keeps mapped; see the
    module docstring. ``mapped`` tells which way rows are read.
    """

    def __init__(self, folder: Path, *, max_resident_bytes: int | None = None):
        self.folder = Path(folder)
        if max_resident_bytes is not None and max_resident_bytes < 0:
            raise ConfigError(f"max_resident_bytes {max_resident_bytes} is invalid; expected a number >= 0")
        self.max_resident_bytes = max_resident_bytes
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
        self.nbytes = sum(int(arr.nbytes) for arr in self.arrays.values())
        self.mapped = max_resident_bytes is None or self.nbytes <= max_resident_bytes
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    def get(self, hookpoint: Hookpoint | str, index: Tensor | np.ndarray | slice) -> Tensor:
        """Rows ``index`` of one hookpoint as float32, in ascending row order (callers re-shuffle)."""
        arr = self.arrays[str(hookpoint)]
        if isinstance(index, Tensor):
            index = index.numpy()
        if isinstance(index, np.ndarray):
            index = np.sort(index)  # sorted gathers are much faster on a memmap; order is re-shuffled by caller
        if self.mapped:
            return torch.from_numpy(np.array(arr[index], dtype=np.float32))
        rows = np.arange(arr.shape[0])[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        return torch.from_numpy(self._read_rows(str(hookpoint), arr, rows))

    def _read_rows(self, hp: str, arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows by positional reads, one read per run of consecutive rows: nothing stays mapped."""
        n, d = arr.shape
        rows = rows.reshape(-1)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {hp} with {n} rows")
        rows = np.where(rows < 0, rows + n, rows)
        buf = np.empty((rows.size, d), dtype=arr.dtype)
        row_bytes = d * arr.dtype.itemsize
        if rows.size and row_bytes:
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            starts = np.concatenate(([0], breaks)).tolist()
            ends = np.concatenate((breaks, [rows.size])).tolist()
            first = rows[starts].tolist()
            view = memoryview(buf.reshape(-1).view(np.uint8))
            f = self._file(hp)
            for s, e, r in zip(starts, ends, first, strict=True):
                _read_exact(f, view[s * row_bytes : e * row_bytes], arr.offset + r * row_bytes, self._lock)
        return buf if buf.dtype == np.float32 else np.array(buf, dtype=np.float32)

    def _file(self, hp: str):
        with self._lock:
            f = self._files.get(hp)
            if f is None:
                f = self._files[hp] = open(self.folder / f"{Path(hp).name}.npy", "rb", buffering=0)  # noqa: SIM115
            return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def mean_sq_norm(self, hookpoint: Hookpoint | str, n: int = 20000) -> float:
        arr = self.arrays[str(hookpoint)]
        step = max(1, arr.shape[0] // n)
        x = self.get(hookpoint, slice(None, None, step))
        return float((x**2).sum(-1).mean())


def _read_exact(f, view: memoryview, pos: int, lock: threading.Lock) -> None:
    while len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(f.fileno(), [view], pos)
        else:  # no positional reads here: seek + read under the cache's lock
            with lock:
                f.seek(pos)
                got = f.readinto(view)
        if not got:
            raise DataError(f"activation cache file '{f.name}' is truncated (no data at byte {pos})")
        view, pos = view[got:], pos + got


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
    max_resident_bytes: int | None = None,
) -> ActivationCache:
    """Harvest ``hookpoints`` over ``windows`` (BOS position dropped) into a memory-mapped cache.

    Rows are written with plain sequential file writes, so harvesting maps nothing of the cache into
    the process; ``max_resident_bytes`` is passed on to the returned :class:`ActivationCache`.
    """
    hookpoints = sorted(set(hookpoints), key=lambda h: (h.layer, h.name))
    for hp in hookpoints:
        lm.check(hp)
    # a model loaded in another dtype gives (slightly) other activations: its own cache entry
    model_key = lm.model_id if lm.dtype == torch.float32 else f"{lm.model_id}@{str(lm.dtype).removeprefix('torch.')}"
    key = cache_key(model_key, hookpoints, windows, dtype)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "activations"
    folder = root / key
    if (folder / "meta.json").exists():
        try:
            return ActivationCache(folder, max_resident_bytes=max_resident_bytes)
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
    need = n_tokens * sum(d.values()) * np.dtype(np_dtype).itemsize

    def cannot_write(e: OSError) -> ConfigError:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        return ConfigError(
            f"cannot write the activation cache in '{root}' ({e.strerror or e}; it needs {need / 1e6:.1f} MB); "
            f"free some space or set SPARSETRACE_CACHE to another folder"
        )

    files: dict[str, object] = {}
    try:
        tmp.mkdir(parents=True)
        for hp in hookpoints:
            path = tmp / f"{hp}.npy"
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np_dtype)), "fortran_order": False,
                      "shape": (n_tokens, d[str(hp)])}
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)  # the header np.lib.format.open_memmap writes
                data_start = f.tell()
                f.truncate(data_start + n_tokens * d[str(hp)] * np.dtype(np_dtype).itemsize)
            _preallocate(path)
            files[str(hp)] = f = open(path, "r+b")  # noqa: SIM115 - closed below or in cannot_write
            f.seek(data_start)
    except OSError as e:
        raise cannot_write(e) from None
    stop = max(h.layer for h in hookpoints)
    bar = tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False)
    for start in range(0, n_windows, batch_windows):
        ids = windows[start : start + batch_windows].to(lm.device)
        out = lm.run(ids, read=hookpoints, stop_after=stop)
        n = ids.shape[0] * per_window
        for hp in hookpoints:
            a = out.acts[hp][:, skip:, :].reshape(n, -1)
            if not torch.isfinite(a).all():
                bad = (~torch.isfinite(a)).nonzero()[0].tolist()
                for f in files.values():
                    f.close()
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(
                    f"non-finite activation (NaN/inf) at hookpoint {hp}, window {start + bad[0] // per_window}; "
                    f"expected finite values: check the model's dtype and weights"
                )
            rows = np.ascontiguousarray(a.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy())
            try:
                files[str(hp)].write(memoryview(rows.reshape(-1).view(np.uint8)))
            except OSError as e:
                raise cannot_write(e) from None
        del out
        bar.update(n)
    bar.close()
    try:
        for f in files.values():
            f.close()
    except OSError as e:
        raise cannot_write(e) from None
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
    return ActivationCache(folder, max_resident_bytes=max_resident_bytes)


def _preallocate(path: Path) -> None:
    """Reserve a cache file's blocks now, so a full disk fails before the model runs, not midway."""
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
