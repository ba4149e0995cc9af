"""One training step's loss for a sparse dictionary (MSE plus the activation's sparsity term)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..dictionary.model import Code, SparseDictionary
from .dense_relu import dense_relu_forward
from .sparse_relu import active_relu_forward


class _Objective(nn.Module):
    """Computes one step's loss inside ``forward`` so DDP sees every parameter use."""

    def __init__(self, dictionary: SparseDictionary, aux_k_coef: float, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dictionary = dictionary
        self.aux_k_coef = aux_k_coef
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor, y: Tensor, lam: Tensor, dead: Tensor, active_only: bool = False
                ) -> tuple[Tensor, Tensor, Code, Tensor]:
        d = self.dictionary
        act = d.cfg.activation
        if act == "relu" and active_only:
            # few active features: decode and back-propagate through the active entries only (same math)
            y_hat, values, rows, cols = active_relu_forward(x, d.W_enc, d.b_enc, d.W_dec, d.b_dec)
            if d.W_skip is not None:
                y_hat = y_hat + x @ d.W_skip.t()
            code = Code(values=values, indices=cols, rows=rows, n_rows=x.shape[0])
            l1 = (values * d.W_dec.norm(dim=-1)[cols]).sum() / x.shape[0]
        elif act == "relu":
            # dense: the hand-written step (train/dense_relu.py), same math as encode/decode/l1_penalty
            y_hat, l1, counts, dense = dense_relu_forward(x, d.W_enc, d.b_enc, d.W_dec, d.b_dec, self.compute_dtype)
            if d.W_skip is not None:
                y_hat = y_hat + x @ d.W_skip.t()
            code = Code(dense=dense, counts=counts)
        else:
            code = d.encode(x)
            y_hat = d.decode(code, x)
            l1 = d.l1_penalty(code) if act == "relu" else None
        err = y_hat - y
        mse = err.pow(2).sum(-1).mean() / y.shape[-1]
        loss = mse
        if l1 is not None:
            loss = loss + lam * l1 / y.shape[-1]
        elif act == "jumprelu":
            loss = loss + lam * d.l0_penalty(code) / y.shape[-1]
        elif self.aux_k_coef > 0 and bool(dead.any()):
            # AuxK: the top dead features must explain what the live ones missed
            n_dead = int(dead.sum())
            k_aux = min(n_dead, max(1, y.shape[-1] // 2))
            pre = x @ d.W_enc[dead].t() + d.b_enc[dead]
            vals, idx = pre.relu().topk(k_aux, dim=-1)
            resid = (y - y_hat).detach()
            recon = torch.nn.functional.embedding_bag(idx, d.W_dec[dead], per_sample_weights=vals, mode="sum")
            denom = (resid - resid.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
            aux = (recon - resid).pow(2).sum(-1).mean() / denom
            loss = loss + self.aux_k_coef * torch.nan_to_num(aux, nan=0.0)
        return loss, mse, code, err


@dataclass
class StepStats:
    loss: float
    mse: float
    fvu: float
    l0: float
    lam: float
    dead_frac: float
