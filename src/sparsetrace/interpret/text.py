"""Token text and number formatting shared by the dashboard JSON writers."""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["TokenText", "example", "rnd"]


class TokenText:
    """Decodes token ids to strings once each."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self.cache})
        if missing:
            for i, s in zip(missing, self.tok.batch_decode([[i] for i in missing]), strict=True):
                self.cache[i] = s
        return [self.cache[i] for i in ids]


def rnd(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (JSON size); non-finite values become 0."""
    if not math.isfinite(x):
        return 0.0
    return float(f"{x:.{digits}g}")


def example(text: TokenText, windows: Tensor, win: int, start: int, acts: Tensor, width: int) -> dict:
    T = windows.shape[1]
    w = min(width, T)
    ids = windows[win, start : start + w].tolist()
    a = acts[:w].tolist()
    m = max(range(len(a)), key=a.__getitem__)
    return {
        "tokens": text(ids),
        "acts": [rnd(v) for v in a],
        "max_act": rnd(a[m]),
        "max_pos": m,
        "max_token_id": int(ids[m]),
        "window": int(win),
        "start": int(start),
    }
