"""The dense ReLU+L1 step with a hand-written backward.

Early in a ReLU run about half the features fire on every token, so the step is dense: five
[batch, d] x [d, n_features] matmuls and a handful of elementwise passes over the [batch, n_features]
code. Autograd's version of the same math makes about a dozen such passes (ReLU, its mask, the L1
product and its sum, their backward products, the L0 count, dtype copies under autocast), and the
column reductions among them run far below memory speed. This one makes three elementwise passes (the
ReLU in place, its 0/1 mask, the mask applied in the backward); biases ride inside the matmuls as an
extra column, and every column sum (the L1 term and its decoder-norm gradient, the firing counts) is a
matmul with a ones matrix.

``compute_dtype`` bfloat16 runs the five matmuls on bf16 copies of the inputs and weights (float32
accumulation; AMX/AVX512-BF16 on recent x86 CPUs, tensor cores on GPUs); parameters, optimizer state,
the loss and the reconstruction error stay float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EXACT_ROWS = 256  # bfloat16 holds every integer up to 256: sums of at most this many 0/1 rows are exact


def _row_blocks(n_rows: int, dtype: torch.dtype, device) -> Tensor:
    """[n_blocks, n_rows] of 0/1: a matmul with it sums the rows in blocks (one block in float32; blocks of
    256 rows in bfloat16, whose matmul output is rounded to bf16, so 0/1 counts stay exact)."""
    size = _EXACT_ROWS if dtype == torch.bfloat16 else n_rows
    n_blocks = -(-n_rows // size)
    blocks = torch.zeros(n_blocks, n_rows, dtype=dtype, device=device)
    for b in range(n_blocks):
        blocks[b, b * size:(b + 1) * size] = 1
    return blocks


def _column_sums(blocks: Tensor, a: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum of ``a``'s rows as ``dtype`` [n] (a matmul: one pass over ``a`` at matmul speed)."""
    return torch.mm(blocks, a).to(dtype).sum(0)


class _DenseReluCode(torch.autograd.Function):
    """(x, W_enc, b_enc, W_dec, b_dec) -> (y_hat, l1 sum, firing counts, code).

    ``l1 sum`` is sum over rows and features of f * |W_dec row|, so the mean L1 is it / batch."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, compute_dtype):  # noqa: N803 (weight names)
        ctx.set_materialize_grads(False)
        cdt = compute_dtype
        # the encoder bias rides in the matmul as a column of ones (no separate pass over [batch, n]); the
        # same augmented input gives W_enc's and b_enc's gradients in one matmul in the backward
        xa = torch.cat([x.to(cdt), x.new_ones(x.shape[0], 1, dtype=cdt)], 1)
        f = torch.mm(xa, torch.cat([W_enc, b_enc.unsqueeze(1)], 1).to(cdt).t())
        f.relu_()
        fired = torch.sign(f)  # 0/1 (f >= 0): the ReLU mask, kept for the backward
        wd = W_dec.to(cdt)
        y_hat = torch.addmm(b_dec.to(cdt), f, wd).to(W_dec.dtype)
        blocks = _row_blocks(f.shape[0], cdt, f.device)
        norms = W_dec.detach().norm(dim=-1)
        col = _column_sums(blocks, f, W_dec.dtype)
        l1 = col @ norms
        counts = _column_sums(blocks, fired, W_dec.dtype).round_().to(torch.long)
        ctx.save_for_backward(xa, wd, f, fired, col, norms, W_dec)
        ctx.mark_non_differentiable(counts, f)
        return y_hat, l1, counts, f

    @staticmethod
    def backward(ctx, g_y, g_l1, _g_counts, _g_f):
        xa, wd, f, fired, col, norms, W_dec = ctx.saved_tensors  # noqa: N806
        if ctx.needs_input_grad[0]:
            raise RuntimeError("the dense ReLU step does not back-propagate into its input")
        cdt = f.dtype
        if g_l1 is None:
            g_l1 = torch.zeros((), device=f.device, dtype=W_dec.dtype)
        if g_y is None:
            g_y = torch.zeros(f.shape[0], W_dec.shape[1], device=f.device, dtype=W_dec.dtype)
        gc = g_y.to(cdt)
        # d/dW_dec: the reconstruction term, plus the L1 term through each row's norm
        g_wdec = torch.mm(f.t(), gc).to(W_dec.dtype)
        g_wdec.addcmul_(W_dec, (g_l1 * col / norms.clamp_min(1e-12)).unsqueeze(1).to(W_dec.dtype))
        g_bdec = g_y.sum(0)
        # d/df = g_y W_dec^T + g_l1 |W_dec row| (the second term as one more column of the matmul); the ReLU
        # mask turns it into d/d(pre-activation)
        ga = torch.cat([gc, gc.new_ones(gc.shape[0], 1)], 1)
        g_pre = torch.mm(ga, torch.cat([wd, (g_l1 * norms).to(cdt).unsqueeze(1)], 1).t())
        g_pre.mul_(fired)
        g_enc = torch.mm(g_pre.t(), xa).to(W_dec.dtype)  # [n, d_in + 1]: W_enc's gradient, then b_enc's
        return None, g_enc[:, :-1], g_enc[:, -1], g_wdec, g_bdec, None


def dense_relu_forward(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,  # noqa: N803
                       compute_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y_hat, mean L1 over rows, per-feature firing counts [n] long, code [batch, n]).

    ``compute_dtype`` float32 means "the parameters' own dtype" (float64 parameters stay float64). Under an
    enclosing ``torch.autocast``, its dtype is the compute dtype (the step casts for itself)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    elif compute_dtype == torch.float32:
        compute_dtype = W_enc.dtype
    with torch.autocast(dev, enabled=False):
        y_hat, l1_sum, counts, f = _DenseReluCode.apply(x, W_enc, b_enc, W_dec, b_dec, compute_dtype)
    return y_hat, l1_sum / x.shape[0], counts, f
