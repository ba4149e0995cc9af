"""Sparse activation functions: ReLU (+L1), TopK, BatchTopK and JumpReLU.

Each activation turns encoder pre-activations ``pre: [batch, n_features]`` into a sparse code. TopK
returns the code in *sparse form* (values + indices, ``[batch, k]`` each) so the decoder can gather
only k rows instead of multiplying a dense ``[batch, n_features]`` matrix; the others return dense
codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


class _TopKEncode(torch.autograd.Function):
    """``topk(relu(x @ W.T + b))`` with a sparse backward.

    The gradient w.r.t. the pre-activations is non-zero at only k of n_features entries per row, so
    dW_enc = S.T @ x where S is [batch, n_features] with k non-zeros per row; we compute it with an
    index_add over the selected rows instead of a dense [n_features, batch] @ [batch, d] matmul.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int):
        pre = torch.addmm(bias, x, weight.t())  # [batch, n_features]
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.clamp_min(0)
        ctx.save_for_backward(x, weight, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):
        x, weight, values, indices = ctx.saved_tensors
        g = grad_values * (values > 0).to(grad_values.dtype)  # [batch, k]
        n_features, d = weight.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dx = sum_j g[b,j] * W[idx[b,j]]
            grad_x = torch.nn.functional.embedding_bag(
                indices, weight, per_sample_weights=g, mode="sum"
            )
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_idx = indices.reshape(-1)
            if ctx.needs_input_grad[1]:
                grad_w = torch.zeros_like(weight)
                batch, k = g.shape
                chunk = max(1, (1 << 24) // max(1, k * d))  # bound the [chunk*k, d] temporary
                for s in range(0, batch, chunk):
                    gs, xs, ids = g[s : s + chunk], x[s : s + chunk], indices[s : s + chunk]
                    contrib = (gs.unsqueeze(-1) * xs.unsqueeze(1)).reshape(-1, d)
                    grad_w.index_add_(0, ids.reshape(-1), contrib)
            if ctx.needs_input_grad[2]:
                grad_b = torch.zeros(n_features, dtype=g.dtype, device=g.device)
                grad_b.index_add_(0, flat_idx, g.reshape(-1))
        return grad_x, grad_w, grad_b, None


def topk_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sparse TopK code: (values [batch, k], indices [batch, k])."""
    if x.requires_grad or weight.requires_grad:
        return _TopKEncode.apply(x, weight, bias, k)
    pre = torch.addmm(bias, x, weight.t())
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.clamp_min(0), indices


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Keep the k * batch largest positive pre-activations across the whole batch (dense code)."""
    pre = pre.relu()
    flat = pre.reshape(-1)
    n_keep = min(flat.numel(), k * pre.shape[0])
    values, idx = flat.topk(n_keep, sorted=False)
    out = torch.zeros_like(flat).scatter(0, idx, values)
    return out.view_as(pre)


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)`` with a rectangle-kernel pseudo-derivative for theta."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float):
        mask = pre > threshold
        ctx.save_for_backward(pre, threshold, mask)
        ctx.bandwidth = bandwidth
        return pre * mask

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold, mask = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad_out * mask
        near = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        grad_theta = -(threshold / bw) * near * grad_out
        return grad_pre, grad_theta.sum(0), None


class _StepL0(torch.autograd.Function):
    """``H(pre - theta)`` (for the L0 penalty) with the same pseudo-derivative w.r.t. theta."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        grad_theta = -(1.0 / bw) * near * grad_out
        return None, grad_theta.sum(0), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step_l0(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return _StepL0.apply(pre, threshold, bandwidth)
