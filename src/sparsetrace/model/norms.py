"""The norms in front of each decoder layer's MLP and attention, per architecture: one table for the package.

A transcoder reads ``mlp_in``, the MLP's input *after* its norm; weight-based attribution, de-embeddings
and the import of other tools' dictionaries need to know which module that norm is and how it scales:

=================================  ==============================  =====================  ===========
``config.model_type``              norm before the MLP             before attention       RMS scale
=================================  ==============================  =====================  ===========
gpt2, gpt_neo                      ``ln_2``                        ``ln_1``               (LayerNorm)
gptj                               ``ln_1`` (shared, parallel)     ``ln_1``               (LayerNorm)
phi                                ``input_layernorm`` (shared)    ``input_layernorm``    (LayerNorm)
gpt_neox                           ``post_attention_layernorm``    ``input_layernorm``    (LayerNorm)
llama, mistral, qwen2, qwen3, phi3 ``post_attention_layernorm``    ``input_layernorm``    ``w``
gemma                              ``post_attention_layernorm``    ``input_layernorm``    ``1 + w``
gemma2, gemma3, gemma3_text        ``pre_feedforward_layernorm``   ``input_layernorm``    ``1 + w``
olmo2                              none (post-norms only)          none                   ``w``
=================================  ==============================  =====================  ===========

On Gemma-2/3 ``post_attention_layernorm`` is the norm applied to the attention *output* before it is
added to the residual stream; the MLP's own norm is ``pre_feedforward_layernorm``. Gemma's RMSNorm
multiplies by ``1 + weight`` (its weight is stored as an offset from 1). Architectures missing from the
table fall back to the first child found among :data:`FALLBACK_MLP_NAMES` / :data:`FALLBACK_ATTN_NAMES`,
with a ``1 + w`` scale when the norm's class name says Gemma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ModelError

__all__ = [
    "FALLBACK_MLP_NAMES",
    "NORMS",
    "NormInfo",
    "NormSpec",
    "apply_norm",
    "mlp_norm_child_names",
    "model_type_from_name",
    "norm_info",
    "norm_spec",
]


@dataclass(frozen=True)
class NormSpec:
    """Names (attributes of a decoder layer) of the norms in front of the MLP and the attention."""

    mlp: str | None
    attn: str | None
    one_plus: bool = False  # RMSNorm scale is (1 + weight), as in Gemma


_LLAMA_LIKE = NormSpec("post_attention_layernorm", "input_layernorm")
_GEMMA2_LIKE = NormSpec("pre_feedforward_layernorm", "input_layernorm", one_plus=True)

NORMS: dict[str, NormSpec] = {
    "gpt2": NormSpec("ln_2", "ln_1"),
    "gpt_neo": NormSpec("ln_2", "ln_1"),
    "gptj": NormSpec("ln_1", "ln_1"),
    "phi": NormSpec("input_layernorm", "input_layernorm"),
    "gpt_neox": _LLAMA_LIKE,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": NormSpec("post_attention_layernorm", "input_layernorm", one_plus=True),
    "gemma2": _GEMMA2_LIKE,
    "gemma3": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "olmo2": NormSpec(None, None),
}

FALLBACK_MLP_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ln2", "ffn_norm")
FALLBACK_ATTN_NAMES = ("input_layernorm", "ln_1", "ln1", "attention_norm")


def _first_child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    for n in names:
        if isinstance(getattr(block, n, None), nn.Module):
            return n
    return None


def norm_spec(lm) -> NormSpec:
    """The table's entry for ``lm`` (a :class:`~sparsetrace.model.adapter.LanguageModel`), or one found
    structurally in its first decoder layer when its ``model_type`` is not in the table."""
    model_type = getattr(getattr(lm.model, "config", None), "model_type", None)
    if model_type in NORMS:
        return NORMS[model_type]
    block = lm.arch.layer(0)
    mlp = _first_child(block, FALLBACK_MLP_NAMES)
    attn = _first_child(block, FALLBACK_ATTN_NAMES)
    one_plus = any("Gemma" in type(getattr(block, n)).__name__ for n in (mlp, attn) if n is not None)
    return NormSpec(mlp, attn, one_plus)


@dataclass
class NormInfo:
    """What a norm computes: ``gamma * (x - mean?) / sqrt(mean((x - mean?)^2) + eps) + bias``."""

    module: nn.Module | None
    gamma: Tensor  # [d], float32, the effective scale ((1 + w) for Gemma)
    bias: Tensor | None
    centred: bool  # LayerNorm (subtracts the mean) rather than RMSNorm
    eps: float


def _centred(m: nn.Module) -> bool:
    cls = type(m).__name__
    return isinstance(m, nn.LayerNorm) or ("LayerNorm" in cls and "RMS" not in cls)


def norm_info(lm, layer: int | None, which: str) -> NormInfo:
    """The norm in front of layer ``layer``'s MLP (``which="mlp"``), its attention (``"attn"``), or the
    unembedding (``"final"``, layer ignored). A missing norm is the identity (gamma 1, no centring)."""
    if which not in ("mlp", "attn", "final"):
        raise ValueError(f"which={which!r}; expected 'mlp', 'attn' or 'final'")
    spec = norm_spec(lm)
    if which == "final":
        m = lm.arch.final_norm
    else:
        name = spec.mlp if which == "mlp" else spec.attn
        block = lm.arch.layer(layer)
        m = getattr(block, name, None) if name is not None else None
        if name is not None and not isinstance(m, nn.Module):
            raise ModelError(
                f"cannot find the {which} norm '{name}' of layer {layer} in {type(block).__name__}"
            )
    d = lm.d_model
    if m is None:
        return NormInfo(None, torch.ones(d), None, False, 0.0)
    w = getattr(m, "weight", None)
    gamma = torch.ones(d) if not isinstance(w, Tensor) else w.detach().float().cpu().clone()
    centred = _centred(m)
    if spec.one_plus and not centred:
        gamma = gamma + 1.0
    b = getattr(m, "bias", None)
    bias = b.detach().float().cpu().clone() if isinstance(b, Tensor) else None
    eps = getattr(m, "eps", None)
    if eps is None:
        eps = getattr(m, "variance_epsilon", 1e-5)
    return NormInfo(m, gamma, bias, centred, float(eps))


def apply_norm(lm, layer: int | None, which: str, x: Tensor) -> Tensor:
    """Apply the norm in front of layer ``layer``'s MLP / attention (or the final norm) to ``x`` [..., d],
    from the table's description alone (not by calling the module)."""
    info = norm_info(lm, layer, which)
    if info.module is None:
        return x
    h = x.float()
    if info.centred:
        h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + info.eps)
    h = h * info.gamma.to(h.device)
    if info.bias is not None:
        h = h + info.bias.to(h.device)
    return h.to(x.dtype)


def model_type_from_name(name: str | None) -> str | None:
    """A best guess of ``config.model_type`` from a model name, for the families whose MLP norm differs
    from the Llama convention (``google/gemma-2-2b`` -> ``gemma2``); None when nothing is known."""
    low = (name or "").lower().replace("_", "-")
    for key, mt in (("gemma-3", "gemma3"), ("gemma3", "gemma3"), ("gemma-2", "gemma2"), ("gemma2", "gemma2")):
        if key in low:
            return mt
    return "gemma" if "gemma" in low else None


def mlp_norm_child_names(model_type: str | None = None) -> tuple[str, ...]:
    """Decoder-layer children whose *output* is the MLP's input: the table's entry for ``model_type``;
    for an unknown type, :data:`FALLBACK_MLP_NAMES` (``post_attention_layernorm`` included, which is
    right for every family but Gemma-2/3; names shared with attention, such as GPT-J's ``ln_1``, are
    left out)."""
    if model_type in NORMS:
        name = NORMS[model_type].mlp
        return (name,) if name else ()
    return FALLBACK_MLP_NAMES
