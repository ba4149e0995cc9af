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


def window_source_counts(
    tokenizer, texts: list[str], sources: list[str], context: int, n_windows: int, *, batch_docs: int = 256
) -> tuple[Tensor, list[str]]:
    """Tokens of each source in each of the first ``n_windows`` windows of :func:`tokenize_windows`.

    Returns ``(counts [n_windows, n_sources] long, source names)``; a separator token counts for the
    document before it and the BOS of each window for no source.
    """
    names = sorted(set(sources))
    ids = {n: i for i, n in enumerate(names)}
    bos = getattr(tokenizer, "bos_token_id", None)
    sep = getattr(tokenizer, "eos_token_id", None)
    sep = sep if sep is not None else bos
    body = context - 1 if bos is not None else context
    need = n_windows * body
    owner: list[int] = []
    pairs = [(t, s) for t, s in zip(texts, sources, strict=True) if t and t.strip()]
    for start in range(0, len(pairs), batch_docs):
        chunk = pairs[start : start + batch_docs]
        enc = tokenizer([t for t, _ in chunk], add_special_tokens=False)["input_ids"]
        for tok, (_, src) in zip(enc, chunk, strict=True):
            owner.extend([ids[src]] * (len(tok) + (sep is not None)))
        if len(owner) >= need:
            break
    n = min(n_windows, len(owner) // body)
    grid = torch.tensor(owner[: n * body], dtype=torch.long).view(n, body)
    counts = torch.stack([(grid == i).sum(1) for i in range(len(names))], dim=1)
    return counts, names
