"""Other tools' names for hookpoints: TransformerLens hook names (SAELens) and Hugging Face module paths
(sparsify), mapped to and from ours (``resid_pre``, ``mlp_in``, ...)."""

from __future__ import annotations

import re

from ..model.norms import mlp_norm_child_names

__all__ = ["parse_hf_module", "parse_tl_hook", "tl_hook_name"]

# TransformerLens hook suffix (after ``blocks.{L}.``) <-> our hookpoint name
_TL_TO_OURS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "ln2.hook_normalized": "mlp_in",
}
_OURS_TO_TL = {v: k for k, v in _TL_TO_OURS.items()}
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# sparsify hooks Hugging Face modules by path: ``[prefix.]layers.{L}[.child]``
_HF_MODULE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.(.+))?$")
_HF_MLP = ("mlp", "feed_forward", "ffn")
_HF_ATTN = ("self_attn", "attn", "attention")


def parse_tl_hook(name: str | None) -> tuple[int | None, str | None]:
    """``blocks.6.hook_resid_pre`` -> (6, "resid_pre"). A hook with no sparsetrace equivalent keeps
    its TransformerLens name (so a later hookpoint lookup names it); ``None`` -> (None, None)."""
    if not name:
        return None, None
    m = _TL_HOOK.match(name)
    if not m:
        return None, name
    layer, suffix = int(m.group(1)), m.group(2)
    return layer, _TL_TO_OURS.get(suffix, name)


def tl_hook_name(hookpoint: str, layer: int) -> str:
    """Our hookpoint -> TransformerLens hook name (``resid_pre``, 6 -> ``blocks.6.hook_resid_pre``)."""
    if hookpoint in _OURS_TO_TL:
        return f"blocks.{layer}.{_OURS_TO_TL[hookpoint]}"
    return hookpoint  # already a foreign name (kept verbatim on import)


def parse_hf_module(path: str, model_type: str | None = None) -> tuple[int | None, str, str]:
    """A sparsify hookpoint (module path) -> (layer, hookpoint of the module's input, of its output).

    The MLP's norm comes from :mod:`sparsetrace.model.norms`; ``model_type`` (e.g. ``gemma2``, where
    ``post_attention_layernorm`` is the attention-output norm) picks that family's name."""
    m = _HF_MODULE.search(path)
    if not m:
        return None, path, path
    layer, child = int(m.group(1)), m.group(2)
    if child is None:
        return layer, "resid_pre", "resid_post"
    if child in _HF_MLP:
        return layer, "mlp_in", "mlp_out"
    if child in _HF_ATTN:
        return layer, path, "attn_out"
    if child in mlp_norm_child_names(model_type):
        return layer, path, "mlp_in"
    return layer, path, path
