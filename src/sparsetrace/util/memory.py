"""Handing freed heap memory back to the operating system.

glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold on the heap for reuse; a
long-lived allocation placed after them keeps the whole range resident. Attribution frees a retained
forward (GBs of activations) and merges its row store between batches of backward passes, so without
a trim the peak resident memory holds the old and new pieces side by side (measured: 6.4 GB against
4.5 GB at 512 tokens on 30 layers of SmolLM2). ``malloc_trim(0)`` returns the free pages at no cost to
later allocations (fixing the mmap threshold instead does the same but page-faults every large
allocation: 25% slower there)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_free_memory"]


@functools.cache
def _trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


def release_free_memory() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); False where that does not exist."""
    fn = _trim()
    if fn is None:
        return False
    fn(0)
    return True
