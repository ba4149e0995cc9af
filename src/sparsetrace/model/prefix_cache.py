"""Running a model on the last token of contexts that share a prefix, reusing the prefix's key/value cache.

>>> pc = PrefixCache(lm, ids)                               # one forward pass of ids[:, :-1]
>>> logits, acts = last_logits(lm, ids, [hp], prefix=pc)    # only the last token runs
>>> x = harvest(lm, other_ids, hp, prefix=pc)              # same prefix, another last token

:func:`harvest` reads one hookpoint and stops the forward pass right after it; :func:`last_logits` gives
the next-token logits of the last position (with optional reads and edits). Both take an optional
:class:`PrefixCache`. The first cached use for a model is checked against full forward passes
(:class:`PrefixMismatch` when they differ), and :func:`run_sharing_prefix` falls back to full forwards
for models whose cache cannot be reused.
"""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from .hookpoints import Hookpoint

__all__ = [
    "PrefixCache",
    "PrefixError",
    "PrefixMismatch",
    "call_last",
    "check_close",
    "harvest",
    "is_checked",
    "last_logits",
    "mark_checked",
    "run_sharing_prefix",
]

#: models (held weakly) for which the cached-prefix path was checked against full forwards (True) or failed
#: (False): a model is checked once per process, on its first use
_PREFIX_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CHECK_ROWS = 2  # contexts re-run in full for that check
_R = TypeVar("_R")


class PrefixMismatch(RuntimeError):
    """Running the last token on a cached prefix did not reproduce the full forward pass."""


class PrefixError(Exception):
    """Token ids passed with a :class:`PrefixCache` do not extend its prefix by one token."""


#: what a model that cannot reuse its key/value cache may raise (the full forward is used instead)
_CACHE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, NotImplementedError, RuntimeError)


def is_checked(model) -> bool:
    """Whether the cached-prefix path of ``model`` was already checked against full forwards."""
    return _PREFIX_OK.get(model) is True


def mark_checked(model, ok: bool = True) -> None:
    _PREFIX_OK[model] = ok


def _cache_kwarg(model) -> str:
    """The forward's name for a key/value cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def call_last(model, **kw):
    """``model(**kw)`` computing the logits of the last position only when the model supports it."""
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:
        return model(**kw)


class PrefixCache:
    """The key/value cache of ``ids[:, :-1]``, computed with one forward pass.

    Contexts that share that prefix and differ at most in their last token (a clean and a steered run, or
    a control token swapped in) then run only their last token: attention is causal, so an edit of the last
    position cannot change earlier ones. Every use runs on a copy, so the cache itself is never extended.
    Reads and edits made with it see the last position only ([B, 1, d])."""

    def __init__(self, lm, ids: Tensor):
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"a prefix cache needs contexts [B, T] with T >= 2, got {list(ids.shape)}")
        self.prefix = ids[:, :-1]
        self.kwarg = _cache_kwarg(lm.model)
        base = getattr(lm.model, "base_model", None)
        body = base if isinstance(base, torch.nn.Module) and base is not lm.model else None
        if body is not None:  # the decoder alone: no final norm / unembedding of the prefix
            out = body(input_ids=self.prefix, use_cache=True)
        else:
            out = call_last(lm.model, input_ids=self.prefix, use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None:
            raise ValueError(f"{type(lm.model).__name__} returned no key/value cache")
        self.cache = cache

    def last(self, ids: Tensor) -> Tensor:
        """The last token [B, 1] of contexts ``ids`` [B, T], which must extend the prefix by one token."""
        if ids.dim() != 2 or ids.shape[1] != self.prefix.shape[1] + 1 or not torch.equal(ids[:, :-1], self.prefix):
            raise PrefixError(f"contexts {list(ids.shape)} do not extend the cached prefix {list(self.prefix.shape)}")
        return ids[:, -1:]

    def cache_kwargs(self, repeat: int = 1) -> dict:
        """Forward keyword for a fresh copy of the cache (a forward pass appends to the cache it is given),
        with each context repeated ``repeat`` times (``repeat_interleave`` order: c0, c0, c1, c1, ...)."""
        cache = copy.deepcopy(self.cache)
        if repeat > 1:
            if hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(repeat)
            elif isinstance(cache, tuple):  # legacy format: per layer (key, value, ...)
                cache = tuple(tuple(t.repeat_interleave(repeat, 0) for t in layer) for layer in cache)
            else:
                raise NotImplementedError(f"cannot repeat a {type(cache).__name__}")
        return {self.kwarg: cache}


def run_sharing_prefix(lm, ids: Tensor, body: Callable[[PrefixCache | None], _R], *, use_cache: bool = True) -> _R:
    """``body(prefix)`` with a :class:`PrefixCache` of contexts ``ids`` [B, T], or ``body(None)`` (full
    forward passes) when ``use_cache`` is False, the contexts are one token long, or the model cannot reuse
    its cache (it raises, or a check of its first use against full forwards fails; then the fast path is
    not tried again for that model). ``body`` must not have side effects: it may run twice."""
    model = lm.model
    if use_cache and ids.dim() == 2 and ids.shape[1] >= 2 and _PREFIX_OK.get(model, True):
        try:
            return body(PrefixCache(lm, ids))
        except _CACHE_ERRORS:
            _PREFIX_OK[model] = False
    return body(None)


def check_close(fast: Tensor, ref: Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise :class:`PrefixMismatch` unless the cached-prefix result equals the full one up to rounding."""
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    fast, ref = fast.float(), ref.float()
    err = float((fast - ref).abs().max()) if fast.shape == ref.shape else math.inf
    if not err <= tol * (1.0 + float(ref.abs().max())):
        raise PrefixMismatch(f"{what}: cached-prefix result differs from the full forward by {err:.3g}")


# ----------------------------------------------------------------------------------------- harvest
class _Enough(Exception):
    """Raised by a hook once the activation we need has been read."""


@torch.no_grad()
def harvest(lm, ids: Tensor, hp: Hookpoint, *, prefix: PrefixCache | None = None) -> Tensor:
    """Activation at ``hp`` for token ids [B, T], stopping the forward pass right after it is read
    (for ``mlp_in.L`` the MLP of layer L is not computed).

    With ``prefix`` (the cache of ``ids[:, :-1]``, see :class:`PrefixCache`) only the last token is run
    and the result is that position's activation [B, 1, d]."""
    out = _harvest(lm, ids, hp, prefix)
    if prefix is not None and _PREFIX_OK.get(lm.model) is not True:
        k = min(CHECK_ROWS, ids.shape[0])
        check_close(out[:k], _harvest(lm, ids[:k], hp, None)[:, -1:], lm.dtype, f"{hp}")
    return out


def _harvest(lm, ids: Tensor, hp: Hookpoint, prefix: PrefixCache | None) -> Tensor:
    with lm.hooks([hp]) as acts:
        if hp.name == "mlp_in":
            mod, post = lm.arch.mlp(hp.layer), False
        elif hp.name == "resid_pre":
            mod, post = lm.arch.layer(hp.layer), False
        elif hp.name == "attn_out":
            mod, post = lm.arch.attn(hp.layer), True
        else:
            mod, post = lm.arch.layer(hp.layer), True

        def stop(*_args, **_kw):
            raise _Enough

        # registered after the read hook, so it runs after the activation has been stored
        h = mod.register_forward_hook(stop) if post else mod.register_forward_pre_hook(stop)
        try:
            if prefix is None:
                lm.model(input_ids=ids, use_cache=False)
            else:
                lm.model(input_ids=prefix.last(ids), use_cache=True, **prefix.cache_kwargs())
        except _Enough:
            pass
        finally:
            h.remove()
        if hp not in acts:
            raise RuntimeError(f"hookpoint {hp} was not reached")
        return acts[hp]


# ----------------------------------------------------------------------------------------- last logits
@torch.no_grad()
def last_logits(
    lm, ids: Tensor, read: list[Hookpoint] = (), edit: dict | None = None, *, prefix: PrefixCache | None = None
) -> tuple[Tensor, dict]:
    """Logits at the last position [B, vocab] (+ read activations), with optional edits.

    With ``prefix`` (the cache of ``ids[:, :-1]``, see :class:`PrefixCache`) only the last token is run:
    reads and edits see the last position only ([B, 1, d]). The first such use for a model is checked
    against full forwards of a few contexts (:class:`PrefixMismatch` when they differ)."""
    logits, acts = _last_logits(lm, ids, read, edit, prefix)
    if prefix is not None and _PREFIX_OK.get(lm.model) is not True:
        k = min(CHECK_ROWS, ids.shape[0])
        ref, ref_acts = _last_logits(lm, ids[:k], read, edit, None)
        check_close(logits[:k], ref, lm.dtype, "logits")
        for hp in read:
            check_close(acts[hp][:k, -1:], ref_acts[hp][:, -1:], lm.dtype, f"{hp}")
        _PREFIX_OK[lm.model] = True
    return logits, acts


def _last_logits(lm, ids: Tensor, read, edit, prefix: PrefixCache | None) -> tuple[Tensor, dict]:
    with lm.hooks(list(read), edit) as acts:
        if prefix is None:
            out = call_last(lm.model, input_ids=ids, use_cache=False)
        else:
            out = call_last(lm.model, input_ids=prefix.last(ids), use_cache=True, **prefix.cache_kwargs())
        return out.logits[:, -1].float(), dict(acts)
