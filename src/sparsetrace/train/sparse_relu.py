"""A ReLU training step that touches only the active features.

Once λ has brought L0 near its target (after the first ~10% of a run), a ReLU dictionary has tens of
active features out of thousands per token. The dense step then spends four of its five matmuls on
zeros: the decoder forward ``f @ W_dec``, ``dL/df = dL/dŷ @ W_decᵀ`` (needed only where f > 0, since
ReLU's gradient is zero elsewhere), ``dW_dec = fᵀ @ dL/dŷ`` and ``dW_enc = (dL/dpre)ᵀ @ x``. Here only
the encoder forward stays dense; the other four run over the ``nnz`` active entries:

- decode: ``embedding_bag`` over each row's active features weighted by their values;
- encoder backward: ``dW_enc`` as one ``embedding_bag`` per feature over the token rows it fired on
  (the TopK path's kernel), ``db_enc`` as an ``index_add`` of the active entries' gradients.

The result equals the dense computation up to float rounding (tested). The trainer switches to it
when the smoothed L0 is below :data:`SPARSE_DENSITY` of the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dictionary.activations import _group_by_feature, _sparse_t_matmul

SPARSE_DENSITY = 0.02  # use the sparse step when mean L0 < this fraction of n_features


def _row_offsets(rows: Tensor, batch: int) -> Tensor:
    """Where each batch row's entries start in a row-major ragged code (empty rows included)."""
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


class ActiveReluEncode(torch.autograd.Function):
    """pre = x @ W_encᵀ + b_enc; returns the positive entries only, row-major:
    values [nnz], rows [nnz], cols [nnz] (feature ids). Back-propagates through those entries alone."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor):  # type: ignore[override]
        pre = torch.addmm(b_enc, x, W_enc.t())  # [batch, n_features]
        rows, cols = (pre > 0).nonzero(as_tuple=True)
        values = pre[rows, cols]
        ctx.save_for_backward(x, W_enc, rows, cols)
        ctx.mark_non_differentiable(rows, cols)
        return values, rows, cols

    @staticmethod
    def backward(ctx, g_values: Tensor, _g_rows, _g_cols):  # type: ignore[override]
        x, W_enc, rows, cols = ctx.saved_tensors
        n, batch = W_enc.shape[0], x.shape[0]
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[1]:
            # dW_enc = (dL/dpre)ᵀ @ x over the active entries: one bag of x rows per feature
            g_w = _sparse_t_matmul(_group_by_feature(cols, n, rows), g_values, x).to(W_enc.dtype)
        if ctx.needs_input_grad[0]:  # dx[b] = sum of g * W_enc[f] over row b's active features
            g_x = F.embedding_bag(cols, W_enc, _row_offsets(rows, batch), per_sample_weights=g_values.to(W_enc.dtype),
                                  mode="sum")
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(n, dtype=g_values.dtype, device=g_values.device).index_add_(0, cols, g_values)
        return g_x, g_w, g_b


def active_relu_forward(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor):
    """x [batch, d_in] -> (ŷ [batch, d_out] without any skip term, values, rows, cols)."""
    values, rows, cols = ActiveReluEncode.apply(x, W_enc, b_enc)
    offsets = _row_offsets(rows, x.shape[0])
    # under autocast the values can be bf16 while W_dec stays float32
    y_hat = F.embedding_bag(cols, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum") + b_dec
    return y_hat, values, rows, cols
