"""Feature-level interventions inside the real model, in one forward pass.

For a dictionary at layer L (input hookpoint ``h_in``, output hookpoint ``h_out``) an intervention
computes the feature activations ``a = features(x_in)`` from the *current* input (so upstream edits
propagate), picks new activations ``a'`` for the chosen (row, position, feature) entries, and adds

    out = real_out + (a' - a) @ W_dec        (+ an optional extra vector, e.g. for steering)

to the dictionary's output hookpoint. Everything not intervened on (other features, the dictionary's
reconstruction error, the skip connection, the bias) stays exactly as the model computes it.

All dictionaries are hooked into a single forward pass in layer order, so a dictionary downstream of an
edited one sees the edited stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dictionary.model import SparseDictionary
from ..errors import DataError
from ..model.hookpoints import Hookpoint

Dictionaries = Mapping[int, SparseDictionary] | Iterable[SparseDictionary] | SparseDictionary


def as_layer_map(dictionaries: Dictionaries) -> dict[int, SparseDictionary]:
    """``{layer: dictionary}`` from a mapping, a list, or one dictionary (one dictionary per layer)."""
    if isinstance(dictionaries, SparseDictionary):
        return {int(dictionaries.cfg.layer): dictionaries}
    if isinstance(dictionaries, Mapping):
        out = {}
        for layer, d in dictionaries.items():
            if int(layer) != int(d.cfg.layer):
                raise DataError(f"dictionary given for layer {layer} was trained on layer {d.cfg.layer}")
            out[int(layer)] = d
        return dict(sorted(out.items()))
    out: dict[int, SparseDictionary] = {}
    for d in dictionaries:
        if not isinstance(d, SparseDictionary):
            raise DataError(f"{type(d).__name__} is not a SparseDictionary")
        layer = int(d.cfg.layer)
        if layer in out:
            raise DataError(f"two dictionaries for layer {layer}; node ids need one dictionary per layer")
        out[layer] = d
    return dict(sorted(out.items()))


def hookpoints_of(d: SparseDictionary) -> tuple[Hookpoint, Hookpoint]:
    return Hookpoint(d.cfg.hookpoint_in, int(d.cfg.layer)), Hookpoint(d.cfg.hookpoint_out, int(d.cfg.layer))


@dataclass
class LayerIntervention:
    """What to do at one dictionary.

    ``mask``: bool, broadcastable to [batch, seq, n_features]; the entries to replace.
    ``values``: the replacement activations, broadcastable to [batch, seq, n_features] (a float, a
    [n_features] mean vector, [seq, n_features], or full [batch, seq, n_features] patched activations).
    ``add``: a vector added to the output hookpoint, broadcastable to [batch, seq, d_out] (steering).
    ``add_mask``: optional bool [batch, seq] (or [seq]) restricting where ``add`` is applied.
    """

    mask: Tensor | None = None
    values: Tensor | float | None = None
    add: Tensor | None = None
    add_mask: Tensor | None = None


@dataclass
class InterventionOutput:
    logits: Tensor | None
    acts: dict[int, Tensor]  # recorded feature activations [batch, seq, n_features] before the intervention
    new_acts: dict[int, Tensor]  # after the intervention (only for intervened layers that were recorded)


def _apply(
    d: SparseDictionary,
    x_in: Tensor,
    y: Tensor,
    iv: LayerIntervention | None,
    layer: int,
    record: set[int],
    acts_out: dict[int, Tensor],
    new_out: dict[int, Tensor],
) -> Tensor:
    b, s = x_in.shape[0], x_in.shape[1]
    need_acts = layer in record or (iv is not None and iv.mask is not None)
    delta = None
    if need_acts:
        w = d.W_dec
        acts = d.features(x_in.reshape(-1, x_in.shape[-1]).to(w.dtype)).reshape(b, s, -1)
        if layer in record:
            acts_out[layer] = acts.detach()
        if iv is not None and iv.mask is not None:
            mask = iv.mask.to(acts.device)
            values = iv.values if iv.values is not None else 0.0
            values = torch.as_tensor(values, dtype=acts.dtype, device=acts.device)
            try:
                new = torch.where(mask, values, acts)
            except RuntimeError as e:
                raise DataError(
                    f"layer {layer}: intervention of mask {tuple(mask.shape)} / values {tuple(values.shape)} does "
                    f"not fit activations {tuple(acts.shape)}"
                ) from e
            if layer in record:
                new_out[layer] = new.detach()
            diff = (new - acts).reshape(b * s, -1)
            rows = diff.abs().sum(-1) > 0
            if bool(rows.any()):
                delta = torch.zeros(b * s, w.shape[1], dtype=w.dtype, device=w.device)
                delta[rows] = diff[rows] @ w
                delta = delta.reshape(b, s, -1)
    if iv is not None and iv.add is not None:
        add = iv.add.to(device=y.device, dtype=y.dtype)
        if iv.add_mask is not None:
            add = add * iv.add_mask.to(device=y.device, dtype=y.dtype)[..., None]  # [b, s, 1] or [s, 1]
        delta = add if delta is None else delta + add
    if delta is None:
        return y
    return y + delta.to(y.dtype)


def build_edits(
    dictionaries: Dictionaries,
    interventions: Mapping[int, LayerIntervention],
    *,
    record: Iterable[int] = (),
    acts_out: dict[int, Tensor] | None = None,
    new_out: dict[int, Tensor] | None = None,
) -> dict[Hookpoint, Callable[[Tensor], Tensor]]:
    """Edit functions for :meth:`LanguageModel.hooks` / :meth:`LanguageModel.run` implementing the
    interventions (and recording feature activations of the ``record`` layers into ``acts_out``)."""
    dmap = as_layer_map(dictionaries)
    record = set(record)
    acts_out = acts_out if acts_out is not None else {}
    new_out = new_out if new_out is not None else {}
    for layer in [*interventions, *record]:
        if layer not in dmap:
            raise DataError(f"no dictionary for layer {layer}; dictionaries are for layers {sorted(dmap)}")
    chains: dict[Hookpoint, list[Callable[[Tensor], Tensor]]] = {}
    for layer, d in dmap.items():
        iv = interventions.get(layer)
        if iv is None and layer not in record:
            continue
        hp_in, hp_out = hookpoints_of(d)
        if hp_in == hp_out:

            def same(x, d=d, iv=iv, layer=layer):
                return _apply(d, x, x, iv, layer, record, acts_out, new_out)

            chains.setdefault(hp_out, []).append(same)
        else:
            stash: dict[str, Tensor] = {}

            def take(x, stash=stash):
                stash["x"] = x
                return x

            def give(y, d=d, iv=iv, layer=layer, stash=stash):
                x = stash.pop("x", None)
                if x is None:
                    raise DataError(
                        f"layer {layer}: the dictionary's input hookpoint {d.cfg.hookpoint_in} did not run "
                        f"before its output hookpoint {d.cfg.hookpoint_out}"
                    )
                return _apply(d, x, y, iv, layer, record, acts_out, new_out)

            chains.setdefault(hp_in, []).append(take)
            chains.setdefault(hp_out, []).append(give)
    edits: dict[Hookpoint, Callable[[Tensor], Tensor]] = {}
    for hp, fns in chains.items():
        if len(fns) == 1:
            edits[hp] = fns[0]
        else:

            def chained(x, fns=tuple(fns)):
                for f in fns:
                    x = f(x)
                return x

            edits[hp] = chained
    return edits


def run_with_interventions(
    lm,
    dictionaries: Dictionaries,
    input_ids: Tensor,
    interventions: Mapping[int, LayerIntervention] | None = None,
    *,
    record: Iterable[int] = (),
    stop_after: int | None = None,
) -> InterventionOutput:
    """One forward pass with the interventions; returns logits and the recorded feature activations."""
    acts: dict[int, Tensor] = {}
    new: dict[int, Tensor] = {}
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    edits = build_edits(dictionaries, interventions or {}, record=record, acts_out=acts, new_out=new)
    with torch.no_grad():
        out = lm.run(input_ids.to(lm.device), edit=edits, stop_after=stop_after)
    return InterventionOutput(logits=out.logits, acts=acts, new_acts=new)


def feature_acts(
    lm, dictionaries: Dictionaries, input_ids: Tensor, layers: Iterable[int] | None = None
) -> dict[int, Tensor]:
    """Feature activations [batch, seq, n_features] of each dictionary on an unedited forward pass."""
    dmap = as_layer_map(dictionaries)
    layers = list(dmap) if layers is None else list(layers)
    out = run_with_interventions(lm, dmap, input_ids, {}, record=layers, stop_after=max(layers))
    return out.acts


def bos_position_mask(lm, input_ids: Tensor) -> Tensor:
    """Bool [batch, seq]: True at position 0 of rows that start with the tokenizer's BOS token."""
    m = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is not None:
        m[:, 0] = input_ids[:, 0] == int(bos)
    return m


def feature_means(
    lm,
    dictionaries: Dictionaries,
    input_ids: Tensor,
    *,
    mask: Tensor | None = None,
    exclude_bos: bool = True,
    batch_size: int = 32,
) -> dict[int, Tensor]:
    """Mean activation [n_features] of every feature over the real tokens of ``input_ids``.

    ``mask`` [batch, seq] selects the tokens (e.g. :attr:`TaskBatch.mask` to drop padding); BOS positions
    are left out by default (their activations are the same for every prompt and usually outliers).
    Accepts a :class:`~sparsetrace.tasks.TaskBatch` in place of ``input_ids``.
    """
    if hasattr(input_ids, "clean") and hasattr(input_ids, "mask"):
        mask = input_ids.mask if mask is None else mask
        input_ids = input_ids.clean
    dmap = as_layer_map(dictionaries)
    sums = {layer: torch.zeros(d.n_features, dtype=torch.float64) for layer, d in dmap.items()}
    count = 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(lm.device)
        m = (
            torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            if mask is None
            else mask[start : start + batch_size].to(ids.device)
        )
        if exclude_bos:
            m = m & ~bos_position_mask(lm, ids)
        acts = feature_acts(lm, dmap, ids)
        for layer, a in acts.items():
            sums[layer] += a[m].double().sum(0).cpu()
        count += int(m.sum())
    if count == 0:
        raise DataError("no tokens to average feature activations over")
    return {
        layer: (s / count).to(dmap[layer].W_dec.dtype).to(dmap[layer].W_dec.device)
        for layer, s in sums.items()
    }
