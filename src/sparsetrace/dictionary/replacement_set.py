"""What replaces a model's MLPs: a set of per-layer transcoders (PLT) or one cross-layer transcoder (CLT).

Both answer the same two questions, so evaluation and attribution need not know which they hold:

- ``encode(layer, mlp_in)``: dense features ``[N, F]`` of ``layer`` from that layer's MLP input;
- ``decode(layer, features, mlp_in)``: the MLP output at ``layer`` from the features of every source
  layer that writes there (a PLT: only ``layer`` itself, plus a skip term on ``mlp_in``; a CLT: every
  source ``<= layer``).

``load_replacement(run_dir)`` picks the CLT of a run if it has one, else its transcoders.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..errors import DictionaryFileError
from .clt import CrossLayerTranscoder, find_clt, load_clt
from .model import SparseDictionary


class MLPReplacement:
    kind = "base"
    model_id: str = ""
    n_features: dict[int, int]

    @property
    def layers(self) -> list[int]:  # layers whose MLP is replaced
        raise NotImplementedError

    def encode(self, layer: int, mlp_in: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, layer: int, features: dict[int, Tensor], mlp_in: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class PLTSet(MLPReplacement):
    """Per-layer transcoders (plain or skip), one per replaced layer."""

    kind = "plt"

    def __init__(self, dictionaries: list[SparseDictionary] | dict[int, SparseDictionary]):
        ds = list(dictionaries.values()) if isinstance(dictionaries, dict) else list(dictionaries)
        by_layer: dict[int, SparseDictionary] = {}
        for d in ds:
            if d.cfg.kind not in ("transcoder", "skip_transcoder"):
                continue
            if d.cfg.layer in by_layer:
                raise DictionaryFileError(f"two transcoders for layer {d.cfg.layer}; expected one per layer")
            by_layer[d.cfg.layer] = d
        if not by_layer:
            raise DictionaryFileError("no transcoders (mlp_in -> mlp_out) among the dictionaries")
        self.by_layer = dict(sorted(by_layer.items()))
        ids = {d.cfg.model_id for d in ds if d.cfg.model_id}
        self.model_id = ids.pop() if len(ids) == 1 else ""
        self.n_features = {layer: d.n_features for layer, d in self.by_layer.items()}

    @property
    def layers(self) -> list[int]:
        return list(self.by_layer)

    def encode(self, layer: int, mlp_in: Tensor) -> Tensor:
        return self.by_layer[layer].features(mlp_in)

    def decode(self, layer: int, features: dict[int, Tensor], mlp_in: Tensor | None = None) -> Tensor:
        return self.by_layer[layer].decode(features[layer], mlp_in)


class CLTReplacement(MLPReplacement):
    kind = "clt"

    def __init__(self, clt: CrossLayerTranscoder):
        self.clt = clt
        self.model_id = clt.cfg.model_id
        self.n_features = {layer: clt.n_features for layer in clt.layers}

    @property
    def layers(self) -> list[int]:
        return self.clt.layers

    def encode(self, layer: int, mlp_in: Tensor) -> Tensor:
        return self.clt.encode(layer, mlp_in)

    def decode(self, layer: int, features: dict[int, Tensor], mlp_in: Tensor | None = None) -> Tensor:
        return self.clt.decode(layer, features)


def load_replacement(run_dir: str | Path, *, device: str = "cpu") -> MLPReplacement:
    """The run's CLT if it has one, else its per-layer transcoders."""
    folder = find_clt(run_dir)
    if folder is not None:
        return CLTReplacement(load_clt(folder, device=device))
    from .io import find_dictionaries
    from .load import load_dictionary

    return PLTSet([load_dictionary(p, device=device) for p in find_dictionaries(run_dir)])
