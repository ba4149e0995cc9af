"""Named hookpoints and how to find them inside a Hugging Face causal LM.

A hookpoint is a (name, layer) pair. The names are the same for every architecture:

- ``resid_pre``  : the residual stream entering decoder layer ``layer``
- ``attn_out``   : what the attention block of ``layer`` writes (before it is added to the residual)
- ``mlp_in``     : the MLP's actual input, i.e. after its LayerNorm/RMSNorm
- ``mlp_out``    : what the MLP of ``layer`` writes
- ``resid_post`` : the residual stream leaving decoder layer ``layer``

Architectures are discovered structurally (the decoder ``ModuleList`` and the ``mlp`` / attention
children of each layer), so GPT-2, GPT-Neo, GPT-NeoX/Pythia, Llama, Mistral, Qwen and Gemma all work
without a per-model table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import HookpointError, ModelError

HOOKPOINTS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")

_LAYER_LIST_NAMES = ("layers", "h", "blocks")
_ATTN_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass(frozen=True)
class Hookpoint:
    name: str
    layer: int

    def __str__(self) -> str:
        return f"{self.name}.{self.layer}"

    @staticmethod
    def parse(text: str) -> Hookpoint:
        """Parse ``"mlp_out.6"`` or ``"6.mlp_out"``."""
        parts = text.strip().split(".")
        if len(parts) == 2:
            a, b = parts
            if a.isdigit():
                a, b = b, a
            if b.lstrip("-").isdigit():
                return Hookpoint(a, int(b))
        raise HookpointError(f"hookpoint '{text}' is not of the form NAME.LAYER, e.g. 'mlp_out.6'")


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        sub = getattr(module, n, None)
        if isinstance(sub, nn.Module):
            return n, sub
    return None


@dataclass
class Architecture:
    """Where things live inside one loaded model."""

    layers: nn.ModuleList
    attn_name: str
    mlp_name: str
    final_norm: nn.Module | None
    embed: nn.Module
    unembed: nn.Module
    parallel_residual: bool

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.mlp_name)

    def attn(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.attn_name)

    def check(self, hookpoint: str, layer: int) -> None:
        if hookpoint not in HOOKPOINTS:
            raise HookpointError(f"unknown hookpoint '{hookpoint}'; expected one of {', '.join(HOOKPOINTS)}")
        if not (0 <= layer < self.n_layers):
            raise HookpointError(
                f"layer {layer} is out of range for this model; expected 0..{self.n_layers - 1}"
            )


def discover(model: nn.Module) -> Architecture:
    """Find the decoder layers, their MLP/attention children and the final norm."""
    base = getattr(model, "base_model", model)
    found = None
    for name in _LAYER_LIST_NAMES:
        sub = getattr(base, name, None)
        if isinstance(sub, nn.ModuleList) and len(sub) > 0:
            found = sub
            break
    if found is None:  # fall back to the longest ModuleList
        lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
        if lists:
            found = max(lists, key=len)
    if found is None:
        raise ModelError(f"could not find decoder layers in model of type {type(model).__name__}")
    first = found[0]
    attn = _child(first, _ATTN_NAMES)
    mlp = _child(first, _MLP_NAMES)
    if attn is None or mlp is None:
        raise ModelError(
            f"decoder layer {type(first).__name__} has no recognisable attention ({'/'.join(_ATTN_NAMES)}) "
            f"or MLP ({'/'.join(_MLP_NAMES)}) child"
        )
    norm = _child(base, _FINAL_NORM_NAMES)
    cfg = getattr(model, "config", None)
    parallel = bool(getattr(cfg, "use_parallel_residual", False))
    return Architecture(
        layers=found,
        attn_name=attn[0],
        mlp_name=mlp[0],
        final_norm=norm[1] if norm else None,
        embed=model.get_input_embeddings(),
        unembed=model.get_output_embeddings(),
        parallel_residual=parallel,
    )
