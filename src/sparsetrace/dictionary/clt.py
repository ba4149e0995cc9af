"""Cross-layer transcoders (CLT): one encoder per layer, decoders that write to that layer and every later one.

    features_l = act(W_enc[l] @ mlp_in_l + b_enc[l])                       # [n_features] per layer
    mlp_out_j  = sum_{l <= j} W_dec[l][:, j - l].T @ features_l + b_dec[j]  # every source at or below j

Shapes (``L`` layers, ``F`` features per layer, ``d`` = d_model):
``W_enc [L, F, d]``, ``b_enc [L, F]``, ``W_dec[l] [F, L - l, d]`` (row ``f`` holds feature ``(l, f)``'s
write to layers ``l, l+1, ..., L-1``), ``b_dec [L, d]``, ``threshold [L, F]`` (JumpReLU only).

A CLT always covers every layer of its model (``layers = 0..L-1``): a feature of layer ``l`` can only
write to layers it comes before, so a CLT over a subset is a per-layer transcoder set in disguise.

On disk a CLT is a folder (by convention ``clt/`` inside a run) with ``clt.safetensors`` (keys
``W_enc``, ``b_enc``, ``b_dec``, ``threshold`` and ``W_dec_0`` .. ``W_dec_{L-1}``), ``config.json``
(:class:`CLTConfig`, ``format = "sparsetrace-clt/1"``) and ``manifest.json`` (sha256 of both). The
weights always act on raw model activations: training scales are folded in at save time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DictionaryFileError
from .activations import jumprelu

CLT_FORMAT = "sparsetrace-clt/1"
CLT_WEIGHTS = "clt.safetensors"
CLT_CONFIG = "config.json"
CLT_DIRNAME = "clt"
CLT_ACTIVATIONS = ("relu", "jumprelu", "topk")


@dataclass
class CLTConfig:
    n_layers: int
    d_model: int
    n_features: int  # per layer
    activation: str = "jumprelu"  # relu | jumprelu | topk
    k: int | None = None  # TopK: active features per layer and token
    model_id: str = ""
    hookpoint_in: str = "mlp_in"
    hookpoint_out: str = "mlp_out"
    jumprelu_bandwidth: float = 0.05
    input_scales: list[float] | None = None  # per layer, folded into the weights (informational)
    output_scales: list[float] | None = None
    kind: str = "clt"
    format: str = CLT_FORMAT

    def validate(self) -> CLTConfig:
        for name in ("n_layers", "d_model", "n_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid; expected an integer >= 1")
        if self.activation not in CLT_ACTIVATIONS:
            raise ConfigError(f"activation '{self.activation}' is invalid for a CLT; expected one of {CLT_ACTIVATIONS}")
        if self.activation == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.n_features:
                raise ConfigError(f"k={self.k!r} is invalid; expected an integer in 1..{self.n_features} for a TopK CLT")
        if self.kind != "clt":
            raise ConfigError(f"kind '{self.kind}' is invalid; expected 'clt'")
        for name in ("input_scales", "output_scales"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, list) or len(v) != self.n_layers):
                raise ConfigError(f"{name} must list one scale per layer ({self.n_layers}), got {v!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a CLT config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown CLT config field(s) {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**d).validate()
        except TypeError as e:
            raise ConfigError(f"CLT config is incomplete ({e})") from None


class CrossLayerTranscoder(nn.Module):
    """The CLT itself. Features are dense ``[N, F]`` tensors per layer (mostly zeros)."""

    def __init__(self, cfg: CLTConfig, *, seed: int | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        L, n, d = cfg.n_layers, cfg.n_features, cfg.d_model
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w_enc = torch.randn(L, n, d, generator=g)
        self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=-1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(L, n))
        # each feature's total write starts at unit norm, spread over the layers it reaches
        decs = []
        for layer in range(L):
            w = torch.randn(n, L - layer, d, generator=g)
            decs.append(nn.Parameter(w / w.flatten(1).norm(dim=-1)[:, None, None]))
        self.W_dec = nn.ParameterList(decs)
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((L, n), math.log(0.1)))
        else:
            self.log_threshold = None

    # ------------------------------------------------------------------ properties
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def layers(self) -> list[int]:
        return list(range(self.cfg.n_layers))

    def threshold(self, layer: int) -> Tensor | None:
        return None if self.log_threshold is None else self.log_threshold[layer].exp()

    # ------------------------------------------------------------------ forward
    def pre_activations(self, layer: int, x: Tensor) -> Tensor:
        """x: [N, d] the MLP input at ``layer`` -> [N, F]."""
        return torch.addmm(self.b_enc[layer], x, self.W_enc[layer].t())

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        a = self.cfg.activation
        if a == "relu":
            return F.relu(pre)
        if a == "jumprelu":
            return jumprelu(pre, self.threshold(layer), self.cfg.jumprelu_bandwidth)
        values, indices = pre.topk(int(self.cfg.k), dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Dense features ``[N, F]`` of layer ``layer`` for MLP inputs ``x [N, d]``."""
        return self.activate(layer, self.pre_activations(layer, x))

    def decode(self, target: int, features: dict[int, Tensor] | list[Tensor]) -> Tensor:
        """MLP output at ``target`` from the features of every source layer ``<= target``.

        ``features`` maps source layer -> ``[N, F]`` (a list indexed by layer also works); layers
        missing from a dict contribute nothing."""
        items = features.items() if isinstance(features, dict) else enumerate(features)
        out = None
        for src, f in items:
            if src > target:
                continue
            w = self.W_dec[src][:, target - src, :]
            out = f @ w if out is None else out.addmm(f, w)
        if out is None:
            raise ValueError(f"no features from layers <= {target} were given")
        return out + self.b_dec[target]

    def decode_all(self, features: list[Tensor]) -> list[Tensor]:
        """Every layer's MLP output ``[N, d]`` from all layers' features (one matmul per source layer)."""
        L, d = self.n_layers, self.cfg.d_model
        outs = [self.b_dec[j].expand(features[0].shape[0], d) for j in range(L)]
        for src, f in enumerate(features):
            writes = (f @ self.W_dec[src].flatten(1)).view(-1, L - src, d)
            for j in range(src, L):
                outs[j] = outs[j] + writes[:, j - src]
        return outs

    def forward(self, mlp_ins: list[Tensor]) -> list[Tensor]:
        """Every layer's reconstructed MLP output from every layer's MLP input (each ``[N, d]``)."""
        return self.decode_all([self.encode(layer, x) for layer, x in enumerate(mlp_ins)])

    def decoder_norms(self) -> Tensor:
        """``[L, F]``: each feature's decoder norm over all the layers it writes to."""
        return torch.stack([w.flatten(1).norm(dim=-1) for w in self.W_dec])

    # ------------------------------------------------------------------ maintenance
    @torch.no_grad()
    def fold_normalisation(self, input_scales: list[float], output_scales: list[float]) -> None:
        """After training on ``x_l / input_scales[l]`` and ``y_j / output_scales[j]``, act on raw activations."""
        L = self.n_layers
        if len(input_scales) != L or len(output_scales) != L:
            raise ValueError(f"expected {L} input and output scales")
        s_in = torch.tensor(input_scales, dtype=self.W_enc.dtype)
        s_out = torch.tensor(output_scales, dtype=self.W_enc.dtype)
        self.W_enc.div_(s_in[:, None, None])
        for src in range(L):
            self.W_dec[src].mul_(s_out[src:][None, :, None])
        self.b_dec.mul_(s_out[:, None])
        self.cfg.input_scales = [float(s) for s in input_scales]
        self.cfg.output_scales = [float(s) for s in output_scales]

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc.data, "b_enc": self.b_enc.data, "b_dec": self.b_dec.data}
        for src, w in enumerate(self.W_dec):
            out[f"W_dec_{src}"] = w.data
        if self.log_threshold is not None:
            out["threshold"] = self.log_threshold.data.exp()
        return out

    @classmethod
    def from_tensors(cls, cfg: CLTConfig, tensors: dict[str, Tensor], *, source: str) -> CrossLayerTranscoder:
        L, n, d = cfg.n_layers, cfg.n_features, cfg.d_model
        expected = {"W_enc": (L, n, d), "b_enc": (L, n), "b_dec": (L, d)}
        expected.update({f"W_dec_{src}": (n, L - src, d) for src in range(L)})
        if cfg.activation == "jumprelu":
            expected["threshold"] = (L, n)
        for name, shape in expected.items():
            t = tensors.get(name)
            if t is None:
                raise DictionaryFileError(f"{source}: tensor '{name}' is missing; expected shape {list(shape)}")
            if tuple(t.shape) != shape:
                raise DictionaryFileError(
                    f"{source}: tensor '{name}' has shape {list(t.shape)}; expected {list(shape)} from the config"
                )
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise DictionaryFileError(f"{source}: tensor '{name}' is not finite floating-point data")
        clt = cls(cfg)
        with torch.no_grad():
            clt.W_enc.copy_(tensors["W_enc"])
            clt.b_enc.copy_(tensors["b_enc"])
            clt.b_dec.copy_(tensors["b_dec"])
            for src in range(L):
                clt.W_dec[src].copy_(tensors[f"W_dec_{src}"])
            if clt.log_threshold is not None:
                clt.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
        return clt.eval()


def save_clt(clt: CrossLayerTranscoder, folder: str | Path) -> Path:
    from .io import write_folder_atomically

    folder = Path(folder)
    write_folder_atomically(
        folder, {CLT_WEIGHTS: clt.state_tensors(), CLT_CONFIG: json.dumps(clt.cfg.to_dict(), indent=2)}
    )
    return folder


def is_clt_folder(path: str | Path) -> bool:
    return (Path(path) / CLT_WEIGHTS).is_file()


def find_clt(run_dir: str | Path) -> Path | None:
    """The CLT folder of a run (or the folder itself), if there is one."""
    run_dir = Path(run_dir)
    if is_clt_folder(run_dir):
        return run_dir
    if is_clt_folder(run_dir / CLT_DIRNAME):
        return run_dir / CLT_DIRNAME
    return None


def load_clt(path: str | Path, *, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .io import verify_manifest

    path = Path(path)
    folder = find_clt(path)
    if folder is None:
        raise DictionaryFileError(f"'{path}' holds no cross-layer transcoder (no {CLT_WEIGHTS})")
    verify_manifest(folder)
    try:
        raw = json.loads((folder / CLT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DictionaryFileError(f"{folder / CLT_CONFIG} is missing or not JSON ({e})") from None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt != CLT_FORMAT:
        raise DictionaryFileError(f"{folder / CLT_CONFIG} has format={fmt!r}; expected '{CLT_FORMAT}'")
    try:
        cfg = CLTConfig.from_dict(raw)
    except ConfigError as e:
        raise DictionaryFileError(f"{folder / CLT_CONFIG} has invalid fields ({e})") from None
    try:
        tensors = load_file(str(folder / CLT_WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DictionaryFileError(f"{folder / CLT_WEIGHTS} is corrupt or truncated ({e})") from None
    return CrossLayerTranscoder.from_tensors(cfg, tensors, source=str(folder)).to(device)
