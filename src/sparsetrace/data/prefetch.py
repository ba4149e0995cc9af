"""Background prefetching of training batches.

:func:`prefetch` wraps any iterator of batches (``BatchSchedule.batches`` yields ``{hookpoint: Tensor}``)
and produces the next ``depth`` batches in a background thread while the training step runs: the
memory-mapped gather (numpy releases the GIL while copying rows, the OS pages the file in), the
re-shuffle, and, for an accelerator, the copy into pinned host memory and the asynchronous
host-to-device transfer on a side stream. The order of batches is unchanged, so a run with prefetching
sees exactly the batches of a run without it (and resume stays bit-identical).

>>> for batch in prefetch(schedule.batches(cache, hps, start, end), device="cuda"):
...     trainer.train_step(batch[hp_in], batch[hp_out])

Errors raised while producing a batch are re-raised in the consumer at that batch. Closing the
generator (or breaking out of the loop) stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _to_device(obj: Any, device: torch.device, stream) -> Any:
    if isinstance(obj, Tensor):
        if obj.device == device:
            return obj
        if device.type == "cuda":
            src = obj if obj.is_pinned() else obj.pin_memory()
            with torch.cuda.stream(stream):
                return src.to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, stream) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, stream) for v in obj)
    return obj


def _record(obj: Any, stream) -> None:
    """Tell the caching allocator the tensors are used on the consumer's stream too."""
    if isinstance(obj, Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, dict):
        for v in obj.values():
            _record(v, stream)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _record(v, stream)


def prefetch(batches: Iterable[Any], *, depth: int = 2, device: str | torch.device | None = None) -> Iterator[Any]:
    """Iterate ``batches`` with up to ``depth`` batches produced ahead in a background thread.

    ``device``: move tensors there (pinned memory + non-blocking copy on a side stream for CUDA);
    ``None`` leaves them where the producer put them. ``depth <= 0`` disables the thread.
    """
    dev = torch.device(device) if device is not None else None
    if depth <= 0:
        for b in batches:
            yield _to_device(b, dev, None) if dev is not None else b
        return
    use_cuda = dev is not None and dev.type == "cuda"
    side = torch.cuda.Stream(device=dev) if use_cuda else None
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for b in batches:
                if dev is not None:
                    b = _to_device(b, dev, side)
                    if use_cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                        b = (b, event)
                if not put(b):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="sparsetrace-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            if use_cuda:
                item, event = item
                cur = torch.cuda.current_stream(dev)
                cur.wait_event(event)
                _record(item, cur)
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
