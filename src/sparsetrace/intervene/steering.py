"""Steering at the last position of short contexts: the next-token logits with and without a feature's
decoder direction added to the dictionary's output hookpoint.

>>> d = steering_logit_change(lm, dictionary, feature, ids, typical_act=3.2)   # [vocab], mean over contexts

The vector is :func:`~sparsetrace.intervene.ops.steering_vector` (``scale × typical_act × W_dec[f]``);
whole-sequence steering and steered generation are :func:`~sparsetrace.intervene.ops.steer` and
:func:`~sparsetrace.intervene.ops.steer_generate`. Contexts here differ only in their last position, so
the clean and the steered run share one prefix: with a :class:`~sparsetrace.model.prefix_cache.PrefixCache`
the prefix runs once and the last token of each context runs twice in one batch (clean, steered).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.hookpoints import Hookpoint
from ..model.prefix_cache import (
    CHECK_ROWS,
    PrefixCache,
    call_last,
    check_close,
    is_checked,
    last_logits,
    mark_checked,
    run_sharing_prefix,
)
from .ops import steering_vector

__all__ = ["clean_and_steered", "steer_last", "steering_logit_change"]


def steer_last(delta: Tensor, rows: slice | None = None):
    """An edit that adds ``delta`` [d] at the last position (of the batch ``rows`` only, when given)."""

    def edit(x: Tensor) -> Tensor:
        x = x.clone()
        if rows is None:
            x[:, -1] = x[:, -1] + delta.to(x.device, x.dtype)
        else:
            x[rows, -1] = x[rows, -1] + delta.to(x.device, x.dtype)
        return x

    return edit


@torch.no_grad()
def clean_and_steered(
    lm, ids: Tensor, hp: Hookpoint, delta: Tensor, read: list[Hookpoint] = (), *, prefix: PrefixCache | None = None
) -> tuple[Tensor, Tensor, dict]:
    """Last-position logits [B, vocab] of ``ids`` [B, T] clean and with ``steer_last(delta)`` at ``hp``,
    and the clean run's ``read`` activations.

    Without ``prefix``: two full forward passes. With it (the cache of ``ids[:, :-1]``): one forward of the
    last token over 2B rows, each context twice and the second copy steered (reads [B, 1, d]); for a cache
    that cannot be repeated, two forwards of the last token."""
    read = list(read)
    if prefix is not None:
        try:
            kw = prefix.cache_kwargs(repeat=2)
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            kw = None
        if kw is not None:
            pair = prefix.last(ids).repeat_interleave(2, 0)
            with lm.hooks(read, {hp: steer_last(delta, slice(1, None, 2))}) as acts:
                out = call_last(lm.model, input_ids=pair, use_cache=True, **kw)
                logits = out.logits[:, -1].float()
                clean_acts = {h: a[0::2] for h, a in acts.items()}
            clean, steered = logits[0::2], logits[1::2]
            if not is_checked(lm.model):
                k = min(CHECK_ROWS, ids.shape[0])
                ref, ref_acts = last_logits(lm, ids[:k], read)
                ref_st, _ = last_logits(lm, ids[:k], (), {hp: steer_last(delta)})
                check_close(clean[:k], ref, lm.dtype, "logits")
                check_close(steered[:k], ref_st, lm.dtype, f"logits steered at {hp}")
                for h in read:
                    check_close(clean_acts[h][:k], ref_acts[h][:, -1:], lm.dtype, f"{h}")
                mark_checked(lm.model)
            return clean, steered, clean_acts
    clean, acts = last_logits(lm, ids, read, prefix=prefix)
    steered, _ = last_logits(lm, ids, (), {hp: steer_last(delta)}, prefix=prefix)
    return clean, steered, acts


@torch.no_grad()
def steering_logit_change(
    lm, dictionary, feature: int, ids: Tensor, *, typical_act: float, scale: float = 1.0, use_cache: bool = True
) -> Tensor:
    """Mean change [vocab] of the next-token logits of contexts ``ids`` [B, T] when
    ``scale × typical_act × W_dec[feature]`` is added at their last position (at the dictionary's output
    hookpoint; the real model runs on, nothing is replaced). ``use_cache=False``: two full forwards
    instead of a shared prefix cache (same result up to float rounding)."""
    hp = Hookpoint(dictionary.cfg.hookpoint_out, dictionary.cfg.layer)
    delta = steering_vector(lm, dictionary, int(feature), scale, typical_act=typical_act)
    ids = ids.to(lm.device)

    def change(prefix: PrefixCache | None) -> Tensor:
        clean, steered, _ = clean_and_steered(lm, ids, hp, delta, prefix=prefix)
        return (steered - clean).mean(0).cpu()

    return run_sharing_prefix(lm, ids, change, use_cache=use_cache)
