"""Ablation, patching, clamping and steering of dictionary features inside the real model.

``ids`` arguments accept token ids [batch, seq] (or [seq]) or a :class:`~sparsetrace.tasks.TaskBatch`
(its clean prompts; its ``last_pos`` then resolves negative node positions such as ``@-1``).
``features`` accepts anything :meth:`FeatureSet.parse` does (``"L6/F1234@5"``, ``["6:12", "3:7"]``, ...).

Mean-ablation leaves the BOS position alone: position 0 holds the same BOS token in every prompt, so its
activations are identical across the data and their (position-wise) mean is themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..dictionary.model import SparseDictionary
from ..errors import DataError
from .core import (
    Dictionaries,
    LayerIntervention,
    as_layer_map,
    bos_position_mask,
    feature_acts,
    feature_means,
    hookpoints_of,
    run_with_interventions,
)
from .features import FeatureNode, FeatureSet, parse_node_id

MODES = ("zero", "mean", "patch")


def _unpack(ids, last_pos: Tensor | None = None, corrupted: Tensor | None = None):
    """(clean ids, corrupted ids or None, last_pos or None, real-token mask or None)."""
    mask = None
    if hasattr(ids, "clean") and hasattr(ids, "last_pos"):
        batch = ids
        ids = batch.clean
        last_pos = batch.last_pos if last_pos is None else last_pos
        corrupted = batch.corrupted if corrupted is None else corrupted
        mask = batch.mask
    if not isinstance(ids, Tensor):
        raise DataError(f"expected token ids (a tensor) or a TaskBatch, got {type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if corrupted is not None:
        if hasattr(corrupted, "clean"):
            corrupted = corrupted.clean
        if corrupted.dim() == 1:
            corrupted = corrupted[None]
        if corrupted.shape != ids.shape:
            raise DataError(
                f"clean ids {tuple(ids.shape)} and corrupted ids {tuple(corrupted.shape)} differ in shape; "
                "patching needs prompts of the same length"
            )
    if mask is None and last_pos is not None:
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= last_pos.to(ids.device)[:, None]
    return ids, corrupted, last_pos, mask


def _means_for(means, layer: int, d: SparseDictionary) -> Tensor:
    if isinstance(means, Mapping):
        if layer not in means:
            raise DataError(
                f"no mean activations given for layer {layer}; means cover layers {sorted(means)}"
            )
        m = means[layer]
    else:
        m = means
    m = torch.as_tensor(m, dtype=d.W_dec.dtype, device=d.W_dec.device)
    if m.shape[-1] != d.n_features:
        raise DataError(
            f"mean activations for layer {layer} have {m.shape[-1]} features; the dictionary has {d.n_features}"
        )
    return m


def ablation_interventions(
    lm,
    dictionaries: Dictionaries,
    ids: Tensor,
    features,
    mode: str = "mean",
    *,
    means: Mapping[int, Tensor] | Tensor | None = None,
    invert: bool = False,
    last_pos: Tensor | None = None,
    corrupted: Tensor | None = None,
    corrupted_acts: Mapping[int, Tensor] | None = None,
    token_mask: Tensor | None = None,
    roles: Mapping[str, Tensor] | None = None,
) -> dict[int, LayerIntervention]:
    """The :class:`LayerIntervention` per layer that ablates ``features`` (or, with ``invert``, every
    feature of every dictionary *except* ``features``).

    mode ``"zero"``: set to 0; ``"mean"``: set to ``means`` (per layer [n_features] or [seq, n_features];
    computed over ``ids``' real tokens when not given); ``"patch"``: set to the activations on the
    ``corrupted`` prompts (or the given ``corrupted_acts``). ``roles`` ({role: [batch] positions}, e.g.
    ``TaskBatch.roles``) places role-keyed nodes such as ``L6/F12@S2``.
    """
    if mode not in MODES:
        raise DataError(f"ablation mode '{mode}' is unknown; expected one of {', '.join(MODES)}")
    dmap = as_layer_map(dictionaries)
    fs = FeatureSet.parse(features)
    for layer in fs.layers:
        if layer not in dmap:
            raise DataError(
                f"node(s) on layer {layer} ({', '.join(n.node_id for n in fs.on_layer(layer)[:3])}) but the "
                f"dictionaries are for layers {sorted(dmap)}"
            )
    b, s = ids.shape
    layers = list(dmap) if invert else fs.layers
    if mode == "mean" and means is None:
        means = (
            feature_means(lm, {layer: dmap[layer] for layer in layers}, ids, mask=token_mask)
            if layers
            else {}
        )
    if mode == "patch" and corrupted_acts is None:
        if corrupted is None:
            raise DataError("patching needs corrupted prompts (or recorded corrupted activations)")
        corrupted_acts = (
            feature_acts(lm, {layer: dmap[layer] for layer in layers}, corrupted, layers) if layers else {}
        )
    bos = bos_position_mask(lm, ids) if mode == "mean" else None
    out: dict[int, LayerIntervention] = {}
    for layer in layers:
        d = dmap[layer]
        mask = fs.mask(layer, b, s, d.n_features, last_pos=last_pos, device=d.W_dec.device, roles=roles)
        if invert:
            mask = ~mask
        if bos is not None:
            mask &= ~bos.to(mask.device)[:, :, None]
        if mode == "zero":
            values: Tensor | float = 0.0
        elif mode == "mean":
            values = _means_for(means, layer, d)
            if values.dim() == 2 and values.shape[0] != s:
                raise DataError(
                    f"position-wise means for layer {layer} cover {values.shape[0]} positions; prompts have {s}"
                )
        else:
            values = corrupted_acts[layer]
        out[layer] = LayerIntervention(mask=mask, values=values)
    return out


def ablate(
    lm,
    dictionaries: Dictionaries,
    ids,
    features,
    mode: str = "mean",
    means: Mapping[int, Tensor] | Tensor | None = None,
    *,
    invert: bool = False,
    last_pos: Tensor | None = None,
    corrupted: Tensor | None = None,
) -> Tensor:
    """Logits [batch, seq, vocab] with ``features`` ablated (``invert``: everything but them)."""
    roles = getattr(ids, "roles", None)  # a TaskBatch places role-keyed nodes (L6/F12@S2)
    ids, corr, last_pos, tmask = _unpack(ids, last_pos, corrupted)
    dmap = as_layer_map(dictionaries)
    ivs = ablation_interventions(
        lm,
        dmap,
        ids,
        features,
        mode,
        means=means,
        invert=invert,
        last_pos=last_pos,
        corrupted=corr,
        token_mask=tmask,
        roles=roles,
    )
    return run_with_interventions(lm, dmap, ids, ivs).logits


def patch(
    lm,
    dictionaries: Dictionaries,
    clean_ids,
    corrupted_ids: Tensor | None = None,
    features=(),
    *,
    invert: bool = False,
    last_pos: Tensor | None = None,
) -> Tensor:
    """Logits of the clean prompts with ``features`` set to their activations on the corrupted prompts.

    Feature activations are recorded on an unedited corrupted run; in the patched clean run, downstream
    dictionaries still recompute their (unpatched) features from the edited stream.
    """
    ids, corr, last_pos, _ = _unpack(clean_ids, last_pos, corrupted_ids)
    if corr is None:
        raise DataError("patch() needs corrupted ids (or a TaskBatch)")
    return ablate(lm, dictionaries, ids, features, "patch", invert=invert, last_pos=last_pos, corrupted=corr)


def clamp(
    lm, dictionaries: Dictionaries, ids, features, value: float | Tensor, *, last_pos: Tensor | None = None
) -> Tensor:
    """Logits with ``features`` clamped to ``value`` (a float, or a tensor broadcastable to
    [batch, seq, n_features]) at their positions."""
    ids, _, last_pos, _ = _unpack(ids, last_pos)
    dmap = as_layer_map(dictionaries)
    fs = FeatureSet.parse(features)
    b, s = ids.shape
    ivs = {}
    for layer in fs.layers:
        if layer not in dmap:
            raise DataError(f"no dictionary for layer {layer}; dictionaries are for layers {sorted(dmap)}")
        d = dmap[layer]
        ivs[layer] = LayerIntervention(
            mask=fs.mask(layer, b, s, d.n_features, last_pos=last_pos, device=d.W_dec.device), values=value
        )
    return run_with_interventions(lm, dmap, ids, ivs).logits


# ---------------------------------------------------------------------------------------------- steering


def _resolve_feature(dictionary, feature) -> tuple[SparseDictionary, int]:
    """(dictionary, feature index) from an int / node id and one dictionary or a layer mapping."""
    node: FeatureNode | None = None
    if isinstance(feature, str):
        node = parse_node_id(feature)
    elif isinstance(feature, FeatureNode):
        node = feature
    if isinstance(dictionary, SparseDictionary):
        d = dictionary
        if node is not None and node.layer != int(d.cfg.layer):
            raise DataError(
                f"node '{node}' is on layer {node.layer}; the dictionary is for layer {d.cfg.layer}"
            )
    else:
        dmap = as_layer_map(dictionary)
        if node is None:
            if len(dmap) != 1:
                raise DataError(
                    "give the feature as a node id like 'L6/F12' to pick one of several dictionaries"
                )
            d = next(iter(dmap.values()))
        elif node.layer not in dmap:
            raise DataError(
                f"no dictionary for layer {node.layer}; dictionaries are for layers {sorted(dmap)}"
            )
        else:
            d = dmap[node.layer]
    f = node.feature if node is not None else int(feature)
    if not (0 <= f < d.n_features):
        raise DataError(
            f"feature {f} is out of range; the layer-{d.cfg.layer} dictionary has {d.n_features} features"
        )
    return d, f


def typical_norm(lm, dictionary: SparseDictionary, ids: Tensor) -> float:
    """Median L2 norm of the dictionary's output hookpoint over the non-BOS tokens of ``ids``."""
    _, hp_out = hookpoints_of(dictionary)
    if ids.dim() == 1:
        ids = ids[None]
    out = lm.run(ids.to(lm.device), read=[hp_out], stop_after=hp_out.layer)
    x = out.acts[hp_out]
    keep = ~bos_position_mask(lm, ids.to(x.device))
    norms = x[keep].norm(dim=-1) if bool(keep.any()) else x.reshape(-1, x.shape[-1]).norm(dim=-1)
    return float(norms.median().item())


def steering_vector(
    lm,
    dictionary,
    feature,
    scale: float,
    *,
    typical_act: float | None = None,
    ids: Tensor | None = None,
) -> Tensor:
    """``scale x typical x W_dec[f] / |W_dec[f]|`` [d_out].

    ``typical``: ``typical_act x |W_dec[f]|`` when ``typical_act`` (a typical activation of the feature,
    e.g. its max activation from the dashboard) is given; otherwise the median norm of the dictionary's
    output hookpoint on ``ids`` (so ``scale=1`` adds a vector as long as a typical activation there).
    """
    d, f = _resolve_feature(dictionary, feature)
    row = d.W_dec[f].detach()
    norm = row.norm().clamp_min(1e-12)
    if typical_act is not None:
        typical = float(typical_act) * float(norm)
    else:
        if ids is None:
            raise DataError("steering without typical_act needs prompt ids to measure a typical norm")
        typical = typical_norm(lm, d, ids)
    return float(scale) * typical * row / norm


def steer(
    lm,
    dictionary,
    feature,
    scale: float,
    ids,
    *,
    typical_act: float | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Logits [batch, seq, vocab] with the feature's steering vector added at every position (or the
    bool [seq] / [batch, seq] ``positions``)."""
    ids, _, _, _ = _unpack(ids)
    d, f = _resolve_feature(dictionary, feature)
    vec = steering_vector(lm, d, f, scale, typical_act=typical_act, ids=ids)
    iv = LayerIntervention(add=vec, add_mask=positions)
    return run_with_interventions(lm, {int(d.cfg.layer): d}, ids, {int(d.cfg.layer): iv}).logits


def steer_generate(
    lm,
    dictionary,
    feature,
    scale: float,
    prompt: str | Tensor,
    max_new_tokens: int = 20,
    *,
    typical_act: float | None = None,
    stop_at_eos: bool = True,
) -> str:
    """Greedy continuation of ``prompt`` with the feature's steering vector added at every position
    (prompt and generated tokens). Returns the generated text (without the prompt)."""
    ids = lm.tokenize(prompt) if isinstance(prompt, str) else (prompt if prompt.dim() == 2 else prompt[None])
    if ids.shape[0] != 1:
        raise DataError("steer_generate takes one prompt")
    d, f = _resolve_feature(dictionary, feature)
    vec = steering_vector(lm, d, f, scale, typical_act=typical_act, ids=ids)
    layer = int(d.cfg.layer)
    iv = {layer: LayerIntervention(add=vec)}
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    new: list[int] = []
    cur = ids.to(lm.device)
    for _ in range(int(max_new_tokens)):
        if cur.shape[1] >= lm.max_length:
            break
        logits = run_with_interventions(lm, {layer: d}, cur, iv).logits
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        cur = torch.cat([cur, torch.tensor([[nxt]], device=cur.device)], dim=1)
        if stop_at_eos and eos is not None and nxt == int(eos):
            break
    return lm.tokenizer.decode(new)
