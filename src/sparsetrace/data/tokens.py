"""Text -> fixed-length token windows.

Documents are tokenized, joined with EOS separators and cut into windows of ``context`` tokens; each
window starts with BOS (when the tokenizer has one) so every window looks like the start of a text.
The BOS position is excluded from harvested activations (its norm is an outlier in most models).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from ..errors import DataError


def tokenize_windows(
    tokenizer, texts: list[str], context: int, *, max_windows: int | None = None, batch_docs: int = 256
) -> Tensor:
    """Token windows [n_windows, context] (long)."""
    if context < 2:
        raise DataError(f"context={context} is too short; expected at least 2 tokens")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError("the corpus contains no text; expected at least one non-empty document")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = eos if eos is not None else bos
    body = context - 1 if bos is not None else context
    stream: list[int] = []
    windows: list[list[int]] = []
    for start in range(0, len(texts), batch_docs):
        enc = tokenizer(texts[start : start + batch_docs], add_special_tokens=False)["input_ids"]
        for ids in enc:
            stream.extend(ids)
            if sep is not None:
                stream.append(sep)
        while len(stream) >= body:
            w, stream = stream[:body], stream[body:]
            windows.append(([bos] if bos is not None else []) + w)
            if max_windows is not None and len(windows) >= max_windows:
                return torch.tensor(windows, dtype=torch.long)
    if not windows:
        raise DataError(
            f"the corpus has only {len(stream)} tokens; expected at least {body} for one window of {context}"
        )
    return torch.tensor(windows, dtype=torch.long)


def split_windows(windows: Tensor, eval_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic train / held-out split of windows."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(windows), generator=g)
    n_eval = max(1, int(round(len(windows) * eval_fraction)))
    if n_eval >= len(windows):
        raise DataError(f"only {len(windows)} windows: too few to hold out {eval_fraction:.0%} for evaluation")
    return windows[perm[n_eval:]], windows[perm[:n_eval]]


def windows_digest(windows: Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
