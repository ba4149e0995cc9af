"""Frozen attention and normalisation for the local replacement model (:class:`FreezeMode`).

The forward runs under a ``TorchFunctionMode`` that intercepts softmax, ``scaled_dot_product_attention``,
``rsqrt``, ``layer_norm`` and ``rms_norm``: ``record`` computes them normally but returns detached
results and stores them on a tape; ``replay`` returns the taped values (broadcast to the current
batch), so the forward is linear in its inputs in value as well as in gradient. No per-model code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import ModelError

__all__ = ["FreezeMode"]

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
_RSQRT = {torch.rsqrt, torch.Tensor.rsqrt}
_LAYER_NORM = {F.layer_norm, torch.layer_norm}
_RMS_NORM = {f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None}
_SDPA = {F.scaled_dot_product_attention}


class FreezeMode(TorchFunctionMode):
    """Detach (record) or replay attention probabilities and normalisation scales.

    - softmax (``F.softmax``, ``torch.softmax``, ``Tensor.softmax``): output detached;
    - ``F.scaled_dot_product_attention``: computed explicitly, probabilities detached;
    - ``torch.rsqrt`` / ``Tensor.rsqrt`` (RMSNorm in Llama/Mistral/Qwen/Gemma): detached;
    - ``F.layer_norm``: ``(x - mean(x)) * rsqrt(var + eps).detach() * w + b`` (the mean subtraction is
      linear and keeps its gradient);
    - ``F.rms_norm``: ``x * rsqrt(mean(x^2) + eps).detach() * w``.

    ``tape=None`` records (``self.tape`` fills up); a tape from an earlier recording replays it, so the
    constants are those of the recorded run whatever the current input is. Replayed values are
    broadcast over the batch dimension, so a batch-1 recording serves any batch size.
    """

    def __init__(self, tape: list | None = None):
        super().__init__()
        self.recording = tape is None
        self.tape: list[tuple[str, Tensor]] = [] if tape is None else tape
        self.pos = 0

    def _next(self, kind: str) -> Tensor:
        """The next taped value (replay), as recorded."""
        if self.pos >= len(self.tape):
            raise ModelError(f"frozen replay ran past its tape at a {kind} call; the forward differs from the recorded one")
        k, v = self.tape[self.pos]
        self.pos += 1
        if k != kind:
            raise ModelError(f"frozen replay expected a {k} call but got {kind}; the forward differs from the recorded one")
        return v

    def _const(self, kind: str, shape: torch.Size, value: Tensor | None = None) -> Tensor:
        if self.recording:
            assert value is not None
            value = value.detach()
            self.tape.append((kind, value))
            return value
        v = self._next(kind)
        try:
            return v.expand(shape)
        except RuntimeError:
            raise ModelError(f"frozen replay: recorded {kind} of shape {list(v.shape)} does not fit {list(shape)}") from None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX:
            x = args[0]
            if self.recording:
                return self._const("softmax", x.shape, func(*args, **kwargs))
            return self._const("softmax", x.shape)
        if func in _RSQRT:
            x = args[0]
            if self.recording:
                return self._const("rsqrt", x.shape, func(*args, **kwargs))
            return self._const("rsqrt", x.shape)
        if func in _LAYER_NORM:
            return self._layer_norm(*args, **kwargs)
        if func in _RMS_NORM:
            return self._rms_norm(*args, **kwargs)
        if func in _SDPA:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ replacements
    def _layer_norm(self, x, normalized_shape, weight=None, bias=None, eps=1e-5, *_, **__):
        dims = tuple(range(-len(normalized_shape), 0))
        xc = x - x.mean(dim=dims, keepdim=True)
        shape = x.shape[: x.dim() - len(dims)] + (1,) * len(dims)
        if self.recording:
            with torch.no_grad():
                inv = torch.rsqrt(xc.pow(2).mean(dim=dims, keepdim=True) + eps)
            inv = self._const("layer_norm", shape, inv)
        else:
            inv = self._const("layer_norm", shape)
        out = xc * inv
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        return out

    def _rms_norm(self, x, normalized_shape, weight=None, eps=None, *_, **__):
        dims = tuple(range(-len(normalized_shape), 0))
        shape = x.shape[: x.dim() - len(dims)] + (1,) * len(dims)
        if eps is None:
            eps = torch.finfo(x.dtype).eps
        if self.recording:
            with torch.no_grad():
                inv = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
            inv = self._const("rms_norm", shape, inv)
        else:
            inv = self._const("rms_norm", shape)
        out = x * inv
        if weight is not None:
            out = out * weight
        return out

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, **_):
        n_q, n_kv = query.size(-3), key.size(-3)
        if n_q % n_kv:
            raise ModelError(f"attention with {n_q} query heads and {n_kv} key/value heads is not supported")
        rep = n_q // n_kv  # grouped-query attention: broadcast rather than copy keys/values
        L, S = query.size(-2), key.size(-2)
        shape = (*query.shape[:-1], S)
        if self.recording:
            with torch.no_grad():
                if rep > 1:
                    key = key.unsqueeze(-3).expand(*key.shape[:-2], rep, *key.shape[-2:]).flatten(-4, -3)
                s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
                scores = torch.matmul(query, key.transpose(-2, -1)) * s
                if is_causal:
                    causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(diagonal=0)
                    scores = scores.masked_fill(~causal, float("-inf"))
                if attn_mask is not None:
                    if attn_mask.dtype == torch.bool:
                        scores = scores.masked_fill(~attn_mask, float("-inf"))
                    else:
                        scores = scores + attn_mask
                probs = torch.softmax(scores if scores.dtype in (torch.float32, torch.float64) else scores.float(), dim=-1).to(query.dtype)
            probs = self._const("sdpa", shape, probs)
        else:
            probs = self._next("sdpa")
            if probs.dim() == 4 and probs.shape[0] == 1 and value.dim() == 4 and probs.shape[1:] == shape[1:]:
                return _shared_probs_matmul(probs[0], value, n_kv, rep)
            try:
                probs = probs.expand(shape)
            except RuntimeError:
                raise ModelError(f"frozen replay: recorded sdpa of shape {list(probs.shape)} does not fit "
                                 f"{list(shape)}") from None
        if rep > 1:  # [.., n_kv, rep * L, S] @ [.., n_kv, S, dh]: no broadcasting, so no reductions in backward
            out = torch.matmul(probs.reshape(*probs.shape[:-3], n_kv, rep * L, S), value)
            return out.reshape(*out.shape[:-3], n_q, L, out.shape[-1])
        return torch.matmul(probs, value)


def _shared_probs_matmul(probs: Tensor, value: Tensor, n_kv: int, rep: int) -> Tensor:
    """``probs @ value`` for probabilities shared by the whole batch (``probs`` [n_q, L, S], recorded on one
    copy; ``value`` [B, n_kv, S, dh]) as one matmul per key/value head, batch and head dim side by side:
    ``[rep * L, S] @ [S, B * dh]``. Broadcasting ``probs`` over the batch instead makes matmul copy it
    (``B * n_q * L * S`` floats per layer) and keep that copy for the backward of a retained forward:
    quadratic in the prompt length (9 GB at 1,024 tokens, batch 8, 30 layers of SmolLM2)."""
    B, _, S, dh = value.shape
    L = probs.shape[-2]
    v = value.permute(1, 2, 0, 3).reshape(n_kv, S, B * dh)  # [n_kv, S, B*dh]
    out = torch.matmul(probs.reshape(n_kv, rep * L, S), v)  # [n_kv, rep*L, B*dh]
    return out.reshape(n_kv * rep, L, B, dh).permute(2, 0, 1, 3)  # [B, n_q, L, dh]
