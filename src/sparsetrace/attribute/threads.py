"""Torch thread settings for graph building and edge checks."""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["auto_threads", "one_thread", "threads"]


@contextlib.contextmanager
def threads(n: int):
    """Run the block with ``n`` torch threads (the previous count restored after)."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def one_thread():
    """One torch thread: for loops of many small ops, where OpenMP hand-offs cost more than they save."""
    return threads(1)


def auto_threads() -> int:
    """torch's thread count, or 1 when the machine is oversubscribed (1-minute load average above 1.5x
    the CPU count): OpenMP threads then wait for each other at every op and run slower than one thread
    (measured on a shared 2-core machine at load 6-8: 0.96 s vs 1.5 s per batched backward)."""
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return n
    return 1 if n > 1 and load > 1.5 * (os.cpu_count() or 1) else n

