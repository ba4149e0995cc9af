"""One sparse dictionary class covers SAEs, transcoders and skip transcoders.

    features = act(W_enc @ x_in + b_enc)              # [n_features], sparse
    x_out_hat = W_dec.T @ features + b_dec (+ W_skip @ x_in for skip transcoders)

- SAE:             x_in and x_out are the same hookpoint (e.g. ``resid_pre.6`` or ``attn_out.6``).
- Transcoder:      x_in = ``mlp_in.L`` (after the MLP's norm), x_out = ``mlp_out.L``.
- Skip transcoder: a transcoder with an extra linear term ``W_skip @ x_in``.

Shapes: ``W_enc [n_features, d_in]``, ``W_dec [n_features, d_out]`` (row i is feature i's write
direction), ``b_enc [n_features]``, ``b_dec [d_out]``, ``W_skip [d_out, d_in]``.

Training happens on normalised activations (``x / input_scale``); ``fold_normalisation`` folds the
scales into the weights so a saved dictionary works on raw model activations.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .activations import ACTIVATIONS, batch_topk, jumprelu, step_l0, topk_encode

KINDS = ("sae", "transcoder", "skip_transcoder")
DEFAULT_HOOKPOINTS = {
    "sae": ("resid_pre", "resid_pre"),
    "transcoder": ("mlp_in", "mlp_out"),
    "skip_transcoder": ("mlp_in", "mlp_out"),
}


@dataclass
class DictionaryConfig:
    kind: str  # sae | transcoder | skip_transcoder
    d_in: int
    d_out: int
    n_features: int
    activation: str = "relu"  # relu | topk | batchtopk | jumprelu
    k: int | None = None  # TopK / BatchTopK
    layer: int = 0
    hookpoint_in: str = "mlp_in"
    hookpoint_out: str = "mlp_out"
    model_id: str = ""
    jumprelu_bandwidth: float = 0.05
    normalisation: str = "folded"  # activations were scaled by input_scale/output_scale, folded into weights
    input_scale: float = 1.0
    output_scale: float = 1.0
    format: str = "sparsetrace-dictionary/1"

    def validate(self) -> DictionaryConfig:
        for name in ("kind", "activation", "hookpoint_in", "hookpoint_out", "model_id", "normalisation", "format"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ConfigError(f"{name}={v!r} is invalid; expected a string")
        if self.kind not in KINDS:
            raise ConfigError(f"kind '{self.kind}' is unknown; expected one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation '{self.activation}' is unknown; expected one of {', '.join(ACTIVATIONS)}")
        for name in ("d_in", "d_out", "n_features"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"{name}={v!r} is invalid; expected a positive integer")
        if not _is_int(self.layer) or self.layer < 0:
            raise ConfigError(f"layer={self.layer!r} is invalid; expected an integer >= 0")
        if self.k is not None and not _is_int(self.k):
            raise ConfigError(f"k={self.k!r} is invalid; expected an integer or null")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None or not (0 < self.k <= self.n_features):
                raise ConfigError(
                    f"k={self.k} is invalid for {self.activation}; expected 0 < k <= n_features={self.n_features}"
                )
        for name in ("jumprelu_bandwidth", "input_scale", "output_scale"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 < v < math.inf:
                raise ConfigError(f"{name}={v!r} is invalid; expected a finite number > 0")
        if self.kind == "sae" and self.d_in != self.d_out:
            raise ConfigError(f"an SAE needs d_in == d_out, got {self.d_in} and {self.d_out}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DictionaryConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"dictionary config is a {type(d).__name__}; expected a JSON object")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ConfigError(f"dictionary config lacks {', '.join(missing)}; expected fields {', '.join(required)}")
        return cls(**{k: v for k, v in d.items() if k in known}).validate()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Code:
    """A sparse code: dense ([batch, n_features]), sparse (values/indices [batch, k]), or ragged
    (values/indices/rows [nnz] with n_rows, the active entries in row-major order)."""

    dense: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    pre: Tensor | None = None  # pre-activations, when computed (dense)
    rows: Tensor | None = None  # ragged codes only
    n_rows: int = 0
    counts: Tensor | None = None  # per-feature firing counts over the rows, when the step computed them

    def to_dense(self, n_features: int) -> Tensor:
        if self.dense is not None:
            return self.dense
        assert self.values is not None and self.indices is not None
        if self.rows is not None:
            out = self.values.new_zeros(self.n_rows, n_features)
            out[self.rows, self.indices] = self.values
            return out
        out = self.values.new_zeros(self.values.shape[0], n_features)
        return out.scatter_(1, self.indices, self.values)

    def l0(self) -> Tensor:
        """Mean number of non-zero features per row."""
        if self.counts is not None:
            rows = self.dense.shape[0] if self.dense is not None else max(1, self.n_rows)
            return self.counts.sum().to(torch.float32) / rows
        if self.dense is not None:
            return (self.dense != 0).float().sum(-1).mean()
        assert self.values is not None
        if self.rows is not None:
            return (self.values != 0).float().sum() / max(1, self.n_rows)
        return (self.values != 0).float().sum(-1).mean()


class SparseDictionary(nn.Module):
    def __init__(self, cfg: DictionaryConfig, *, seed: int | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        n, d_in, d_out = cfg.n_features, cfg.d_in, cfg.d_out
        # decoder rows of unit norm in random directions; encoder initialised as the (scaled) transpose
        w_dec = torch.randn(n, d_out, generator=g)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if cfg.kind == "sae":
            w_enc = w_dec.clone()
        else:
            w_enc = torch.randn(n, d_in, generator=g)
            w_enc = w_enc / w_enc.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(w_enc * (d_out / n) ** 0.5 if cfg.activation == "relu" else w_enc)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if cfg.kind == "skip_transcoder" else None
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(0.1)))
        else:
            self.log_threshold = None
        if cfg.activation == "batchtopk":
            # inference threshold, estimated during training (mean of the smallest kept activation)
            self.register_buffer("batch_threshold", torch.zeros(()))
        else:
            self.batch_threshold = None

    # ------------------------------------------------------------------ properties
    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def threshold(self) -> Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.exp()

    # ------------------------------------------------------------------ forward
    def pre_activations(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x, self.W_enc.t())

    def encode(self, x: Tensor) -> Code:
        """x: [batch, d_in] -> sparse code."""
        a = self.cfg.activation
        if a == "topk":
            values, indices = topk_encode(x, self.W_enc, self.b_enc, int(self.cfg.k))
            return Code(values=values, indices=indices)
        pre = self.pre_activations(x)
        if a == "relu":
            return Code(dense=F.relu(pre), pre=pre)
        if a == "jumprelu":
            return Code(dense=jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth), pre=pre)
        # batchtopk
        if self.training:
            return Code(dense=batch_topk(pre, int(self.cfg.k)), pre=pre)
        return Code(dense=pre * (pre > self.batch_threshold), pre=pre)

    def features(self, x: Tensor) -> Tensor:
        """Dense feature activations [batch, n_features]."""
        return self.encode(x).to_dense(self.n_features)

    def decode(self, code: Code | Tensor, x_in: Tensor | None = None) -> Tensor:
        if isinstance(code, Tensor):
            out = torch.addmm(self.b_dec, code, self.W_dec)
        elif code.dense is not None:
            out = torch.addmm(self.b_dec, code.dense, self.W_dec)
        else:
            # under autocast the code's values can be bf16 while W_dec stays float32
            w = code.values.to(self.W_dec.dtype)
            out = F.embedding_bag(code.indices, self.W_dec, per_sample_weights=w, mode="sum") + self.b_dec
        if self.W_skip is not None:
            if x_in is None:
                raise ValueError("a skip transcoder needs x_in to decode")
            out = out + x_in @ self.W_skip.t()
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction / prediction for x [..., d_in] -> [..., d_out]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = self.decode(self.encode(flat), flat)
        return out.reshape(*shape[:-1], self.cfg.d_out)

    def l0_penalty(self, code: Code) -> Tensor:
        """Differentiable surrogate of L0 (JumpReLU)."""
        assert code.pre is not None and self.threshold is not None
        return step_l0(code.pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()

    def l1_penalty(self, code: Code) -> Tensor:
        """Sum of feature activations weighted by decoder norms (scale-invariant L1)."""
        dense = code.to_dense(self.n_features)
        return (dense * self.W_dec.norm(dim=-1)).sum(-1).mean()

    # ------------------------------------------------------------------ maintenance
    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Scale decoder rows to unit norm, compensating the encoder so the function is unchanged
        (only for activations where the scale is not part of the sparsity penalty)."""
        norms = self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.div_(norms)
        if self.cfg.activation in ("topk", "batchtopk"):
            # TopK selection is not scale-invariant per feature; keep encoder as is
            return
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms.squeeze(-1))
        if self.log_threshold is not None:
            self.log_threshold.add_(norms.squeeze(-1).log())

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def fold_normalisation(self, input_scale: float, output_scale: float) -> None:
        """Make the dictionary act on raw activations after training on x/input_scale, y/output_scale."""
        self.W_enc.div_(input_scale)
        self.W_dec.mul_(output_scale)
        self.b_dec.mul_(output_scale)
        if self.W_skip is not None:
            self.W_skip.mul_(output_scale / input_scale)
        self.cfg.input_scale = float(input_scale)
        self.cfg.output_scale = float(output_scale)
