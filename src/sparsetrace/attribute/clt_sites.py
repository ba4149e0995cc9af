"""The replacement model's MLP sites when a cross-layer transcoder (CLT) replaces every MLP.

A CLT feature ``(l, f)`` reads layer ``l``'s MLP input and writes ``W_dec[l][f, j - l]`` to the MLP output
of every layer ``j >= l``. In the local replacement model every MLP output ``j`` is still one constant
(a "leaf", the true clean output), now decomposed as

    mlp_out_j = sum_{l <= j} sum_f a_{l,f} W_dec[l][f, j - l] + b_dec[j] + error_j

so ``error_j`` (the error node of layer ``j``) is the true output minus the CLT's reconstruction at ``j``
from every source layer ``<= j``. A feature's edge to a downstream node is the sum over the layers it
writes to: ``sum_{j >= l} a_{l,f} <W_dec[l][f, j - l], d target / d leaf_j>``.

:class:`CLTLayer` is the per-layer view a :class:`~.replacement.Site` keeps as its ``dictionary`` (it has
the ``cfg`` fields and ``b_dec`` that graph metadata and bias terms read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..dictionary.clt import CrossLayerTranscoder
from ..dictionary.replacement_set import CLTReplacement, PLTSet
from ..errors import DictionaryFileError
from ..model.hookpoints import Hookpoint

if TYPE_CHECKING:  # pragma: no cover
    from .replacement import Site

__all__ = ["CLTLayer", "clt_sites", "split_replacements"]


@dataclass
class _LayerConfig:
    layer: int
    n_features: int
    d_in: int
    d_out: int
    model_id: str
    activation: str
    kind: str = "clt"
    hookpoint_in: str = "mlp_in"
    hookpoint_out: str = "mlp_out"


class CLTLayer:
    """Layer ``layer`` of a CLT, seen as one dictionary of the replacement model."""

    def __init__(self, clt: CrossLayerTranscoder, layer: int):
        self.clt = clt
        self.layer = layer
        c = clt.cfg
        self.cfg = _LayerConfig(layer, c.n_features, c.d_model, c.d_model, c.model_id, c.activation)
        self.b_dec = clt.b_dec[layer]
        self.W_skip = None

    @property
    def n_features(self) -> int:
        return self.cfg.n_features


def split_replacements(items) -> tuple[list, CrossLayerTranscoder | None]:
    """Unpack :class:`PLTSet` / :class:`CLTReplacement` / :class:`CrossLayerTranscoder` given to the
    replacement model (alone or in a list of dictionaries): (per-site dictionaries, the CLT or None)."""
    if isinstance(items, (PLTSet, CLTReplacement, CrossLayerTranscoder)):
        items = [items]
    out, clts = [], []
    for d in items:
        if isinstance(d, PLTSet):
            out.extend(d.by_layer.values())
        elif isinstance(d, CLTReplacement):
            clts.append(d.clt)
        elif isinstance(d, CrossLayerTranscoder):
            clts.append(d)
        else:
            out.append(d)
    if len(clts) > 1:
        raise DictionaryFileError(f"{len(clts)} cross-layer transcoders given; pass at most one")
    return out, (clts[0] if clts else None)


def check_clt(clt: CrossLayerTranscoder, model_id: str, d_model: int, n_layers: int) -> None:
    c = clt.cfg
    if c.d_model != d_model or c.n_layers != n_layers:
        raise DictionaryFileError(
            f"the cross-layer transcoder has {c.n_layers} layers of d_model {c.d_model}; model '{model_id}' has "
            f"{n_layers} layers of d_model {d_model}"
        )
    if (c.hookpoint_in, c.hookpoint_out) != ("mlp_in", "mlp_out"):
        raise DictionaryFileError(f"the cross-layer transcoder maps {c.hookpoint_in} -> {c.hookpoint_out}; "
                                  "attribution supports mlp_in -> mlp_out")


def clt_sites(clt: CrossLayerTranscoder, x_ins: list[Tensor], outs: list[Tensor], dtype: torch.dtype,
              make_site) -> list[Site]:
    """One MLP site per layer: ``x_ins[l]``/``outs[l]`` are layer ``l``'s clean MLP input / output
    ``[seq, d]``. ``make_site(**fields)`` builds a :class:`~.replacement.Site`."""
    L = clt.n_layers
    dev = outs[0].device
    p = clt.W_enc
    was_training = clt.training
    clt.eval()
    try:
        with torch.no_grad():
            feats = [clt.encode(j, x_ins[j].to(device=p.device, dtype=p.dtype)) for j in range(L)]
            recon = clt.decode_all(feats)
    finally:
        clt.train(was_training)
    keys = [str(Hookpoint("mlp_out", j)) for j in range(L)]
    sites = []
    for j in range(L):
        with torch.no_grad():
            acts = feats[j].to(device=dev, dtype=dtype)
            error = outs[j] - recon[j].to(device=dev, dtype=dtype)
            W_enc = clt.W_enc[j].detach().to(device=dev, dtype=dtype)
            W_dec = clt.W_dec[j].detach().to(device=dev, dtype=dtype)  # [F, L - j, d]
        nz = acts.nonzero()
        pos, feat = nz[:, 0], nz[:, 1]
        hp = Hookpoint("mlp_out", j)
        sites.append(make_site(key=keys[j], kind="mlp", layer=j, hookpoint=hp, order=(j, 2),
                               dictionary=CLTLayer(clt, j), x_in=x_ins[j], out=outs[j], leaf=outs[j], error=error,
                               pos=pos, feat=feat, act=acts[pos, feat], W_enc=W_enc, W_dec=W_dec, W_skip=None,
                               targets=tuple(keys[j:])))
    return sites
