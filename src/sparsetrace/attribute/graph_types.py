"""The attribution graph's data types (:class:`Node`, :class:`Edges`, :class:`Graph`) and their
``sparsetrace-graph/1`` JSON. Built by :mod:`.build`, checked by :mod:`.checks`, pruned by :mod:`.prune`.

Nodes (``graph.nodes``):

- ``embedding`` ``E@{pos}``: the residual stream entering layer 0 at ``pos`` (token + position
  embeddings as the model builds them);
- ``feature`` ``L{layer}/F{feature}@{pos}``: an active transcoder feature (a residual SAE's features
  are ``{hookpoint}/F{feature}@{pos}``, e.g. ``resid_pre.4/F17@3``);
- ``error`` ``L{layer}/ERR@{pos}``: layer ``layer``'s MLP error at ``pos`` (the transcoder's residual
  error, or the whole MLP output where the layer has no transcoder; SAE errors are
  ``{hookpoint}/ERR@{pos}``);
- ``logit`` ``LOGIT/{token_id}@{pos}``: a target logit at the last position.

Edges (``graph.edges``, sparse COO: ``src``, ``dst``, ``weight``): the direct effect of source s on
target t through the frozen linear replacement model, ``w = a_s * d pre_t / d a_s``, where ``a_s`` is
the feature activation (1 for error and embedding nodes, whose "decoder" is the error / embedding
vector itself) and ``pre_t`` is the target feature's encoder pre-activation ``W_enc[f] . x_in`` at its
position (without ``b_enc``), or for a logit ``logit_t - mean_v logit_v`` (the mean over the whole
vocabulary, as circuit-tracer does; it removes the direction that shifts all logits alike).
Direct effects are taken with every other MLP output, every feature activation and every error held
fixed, attention patterns and normalisation scales frozen (a skip transcoder's linear ``W_skip`` term
stays live, so effects pass through it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ..errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from .replacement import ReplacementModel

__all__ = ["GRAPH_FORMAT", "KINDS", "Edges", "Graph", "Node", "read_supernodes"]

GRAPH_FORMAT = "sparsetrace-graph/1"
KINDS = ("embedding", "feature", "error", "logit")
_NODE_KEYS = ("node_id", "kind", "layer", "position", "feature", "hookpoint", "activation", "influence", "label", "token")


# ============================================================================================ data
@dataclass
class Node:
    node_id: str
    kind: str  # embedding | feature | error | logit
    layer: int  # -1 embeddings, n_layers logits
    position: int
    feature: int | None = None
    hookpoint: str | None = None  # the site written: mlp_out.L (transcoder features, MLP errors), resid_pre.L (SAEs)
    activation: float | None = None  # feature activation; logit value for logits
    influence: float | None = None
    label: str | None = None
    token: str = ""
    token_id: int | None = None  # embeddings and logits
    prob: float | None = None  # logits
    extra: dict = field(default_factory=dict)  # unknown JSON fields, kept for round trips

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _NODE_KEYS}
        if self.token_id is not None:
            d["token_id"] = self.token_id
        if self.prob is not None:
            d["prob"] = self.prob
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Node:
        if not isinstance(d, dict):
            raise DataError(f"{where}: a node is not an object")
        try:
            kind = d["kind"]
            if kind not in KINDS:
                raise DataError(f"{where}: node {d.get('node_id')!r} has kind {kind!r}; expected one of {', '.join(KINDS)}")
            node_id = d["node_id"]
            if not isinstance(node_id, str):
                raise DataError(f"{where}: node_id {node_id!r} is not a string")

            def opt(name, typ):
                v = d.get(name)
                return None if v is None else typ(v)

            known = set(_NODE_KEYS) | {"token_id", "prob"}
            return cls(node_id=node_id, kind=kind, layer=int(d["layer"]), position=int(d["position"]),
                       feature=opt("feature", int), hookpoint=opt("hookpoint", str),
                       activation=opt("activation", float), influence=opt("influence", float),
                       label=opt("label", str), token=str(d.get("token") or ""), token_id=opt("token_id", int),
                       prob=opt("prob", float), extra={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: node {d.get('node_id')!r} is malformed ({type(e).__name__}: {e})") from None


class Edges:
    """Sparse COO edges: ``src[i] -> dst[i]`` with ``weight[i]`` (int32, int32, float32 tensors)."""

    def __init__(self, src: Tensor, dst: Tensor, weight: Tensor):
        self.src = src.to(torch.int32)
        self.dst = dst.to(torch.int32)
        self.weight = weight.to(torch.float32)
        if not (self.src.shape == self.dst.shape == self.weight.shape and self.src.dim() == 1):
            raise DataError("edge arrays must be 1-d and of equal length")

    @classmethod
    def from_numpy(cls, src, dst, weight) -> Edges:
        return cls(torch.as_tensor(np.asarray(src)), torch.as_tensor(np.asarray(dst)),
                   torch.as_tensor(np.asarray(weight, dtype=np.float32)))

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.src.numpy(), self.dst.numpy(), self.weight.numpy()

    def __len__(self) -> int:
        return int(self.src.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.src, self.dst, self.weight))


class Graph:
    """An attribution graph: ``nodes`` (list of :class:`Node`), ``edges`` (:class:`Edges`, indices into
    ``nodes``), ``metadata`` (the JSON metadata; ``scores`` lives there), ``supernodes`` (named groups of
    nodes a person made, ``[{"name": str, "members": [node_id, ...]}]``; optional in the JSON).

    Not serialised: ``replacement`` (the :class:`ReplacementModel` it was computed on, when built in
    this process) and ``unpruned`` (the full graph, for a pruned one).
    """

    def __init__(self, nodes: list[Node], edges: Edges, metadata: dict | None = None,
                 supernodes: list[dict] | None = None):
        self.nodes = nodes
        self.edges = edges
        self.metadata = dict(metadata or {})
        self.supernodes = [{"name": g["name"], "members": list(g["members"])} for g in supernodes or []]
        self.replacement: ReplacementModel | None = None
        self.unpruned: Graph | None = None
        self.qk: list[dict] | None = None  # QK terms of attention-mediated edges (attribute.heads.add_qk)
        self._index: dict[str, int] | None = None

    # ------------------------------------------------------------------ access
    @property
    def scores(self) -> dict:
        return self.metadata.get("scores", {})

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {n.node_id: i for i, n in enumerate(self.nodes)}
        return self._index

    def node(self, node_id: str) -> Node:
        try:
            return self.nodes[self.index[node_id]]
        except KeyError:
            raise DataError(f"graph has no node {node_id!r}") from None

    def logit_weights(self) -> np.ndarray:
        """Target probabilities renormalised to sum to 1, on the logit nodes (0 elsewhere)."""
        w = np.zeros(len(self.nodes))
        idx = [i for i, n in enumerate(self.nodes) if n.kind == "logit"]
        if not idx:
            return w
        p = np.array([self.nodes[i].prob if self.nodes[i].prob is not None else 1.0 for i in idx], dtype=np.float64)
        if p.sum() <= 0:
            p = np.ones_like(p)
        w[idx] = p / p.sum()
        return w

    def adjacency(self) -> sp.csr_matrix:
        """Sparse ``A[target, source] = weight`` (scipy CSR, [n_nodes, n_nodes])."""
        src, dst, w = self.edges.numpy()
        n = len(self.nodes)
        return sp.csr_matrix((w.astype(np.float64), (dst.astype(np.int64), src.astype(np.int64))), shape=(n, n))

    def incoming(self, node_id: str) -> list[tuple[str, float]]:
        i = self.index[node_id]
        src, dst, w = self.edges.numpy()
        m = np.flatnonzero(dst == i)
        return sorted(((self.nodes[src[j]].node_id, float(w[j])) for j in m), key=lambda t: -abs(t[1]))

    def __repr__(self) -> str:
        return f"Graph({len(self.nodes)} nodes, {len(self.edges)} edges, scores={self.scores})"

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        """The ``sparsetrace-graph/1`` document as a JSON-serialisable dict."""
        nodes = [n.to_dict() for n in self.nodes]
        src, dst, w = self.edges.numpy()
        ids = [n.node_id for n in self.nodes]
        links = [{"source": ids[s], "target": ids[t], "weight": float(x)} for s, t, x in zip(src.tolist(), dst.tolist(), w, strict=True)]
        doc = {"format": GRAPH_FORMAT, "metadata": _jsonable(self.metadata), "nodes": nodes, "links": links}
        if self.qk is not None:
            doc["qk"] = _jsonable(self.qk)
        if self.supernodes:
            doc["supernodes"] = [{"name": g["name"], "members": list(g["members"])} for g in self.supernodes]
        return doc

    def save(self, path: str | Path) -> Path:
        from ..dictionary.io import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False, allow_nan=True))
        return path

    @classmethod
    def from_json(cls, doc: Any, where: str = "graph") -> Graph:
        if not isinstance(doc, dict):
            raise DataError(f"{where} is not a sparsetrace graph: expected a JSON object")
        fmt = doc.get("format")
        if fmt != GRAPH_FORMAT:
            hint = " (a Neuronpedia/circuit-tracer graph? convert it with attribute.export.from_neuronpedia)" if (
                "qParams" in doc or fmt is None and isinstance(doc.get("metadata"), dict) and "scan" in doc["metadata"]) else ""
            raise DataError(f"{where} has format {fmt!r}; expected {GRAPH_FORMAT!r}{hint}")
        nodes_in, links_in, meta = doc.get("nodes"), doc.get("links"), doc.get("metadata", {})
        if not isinstance(nodes_in, list) or not isinstance(links_in, list) or not isinstance(meta, dict):
            raise DataError(f"{where}: expected 'nodes' and 'links' lists and a 'metadata' object")
        nodes = [Node.from_dict(d, where) for d in nodes_in]
        index: dict[str, int] = {}
        for i, n in enumerate(nodes):
            if n.node_id in index:
                raise DataError(f"{where}: node id {n.node_id!r} appears twice")
            index[n.node_id] = i
        src, dst, w = [], [], []
        for e in links_in:
            try:
                s, t, x = index[e["source"]], index[e["target"]], float(e["weight"])
            except KeyError as k:
                raise DataError(f"{where}: link {e.get('source') if isinstance(e, dict) else e!r} -> "
                                f"{e.get('target') if isinstance(e, dict) else ''!r} names unknown node or misses {k}") from None
            except (TypeError, ValueError, AttributeError):
                raise DataError(f"{where}: link {e!r} is malformed; expected source, target and a numeric weight") from None
            if not math.isfinite(x):
                raise DataError(f"{where}: link {e['source']} -> {e['target']} has a non-finite weight")
            src.append(s)
            dst.append(t)
            w.append(x)
        supernodes = read_supernodes(doc.get("supernodes"), index, where)
        g = cls(nodes, Edges.from_numpy(np.array(src, dtype=np.int32), np.array(dst, dtype=np.int32), np.array(w)), meta,
                supernodes)
        g._index = index
        qk = doc.get("qk")
        if qk is not None and not (isinstance(qk, list) and all(isinstance(e, dict) for e in qk)):
            raise DataError(f"{where}: 'qk' is not a list of objects")
        g.qk = qk
        return g

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"graph file {path} does not exist") from None
        except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
            raise DataError(f"graph file {path} cannot be read as UTF-8 JSON ({e})") from None
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise DataError(f"graph file {path} is not valid JSON (corrupt or truncated: {e})") from None
        except RecursionError:
            raise DataError(f"graph file {path} is nested too deeply to be a sparsetrace graph") from None
        return cls.from_json(doc, str(path))


def read_supernodes(value: Any, node_ids: dict[str, int] | set[str], where: str = "graph") -> list[dict]:
    """Check a graph JSON's optional ``supernodes``: a list of ``{"name": str, "members": [node_id, ...]}``
    whose members are nodes of the graph, each in at most one supernode. Returns a clean copy."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{where}: 'supernodes' is {type(value).__name__}; expected a list of "
                        "{\"name\": ..., \"members\": [node_id, ...]}")
    out, seen = [], {}
    for i, g in enumerate(value):
        name = g.get("name") if isinstance(g, dict) else None
        members = g.get("members") if isinstance(g, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(members, list) or not members:
            raise DataError(f"{where}: supernodes[{i}] is {str(g)[:80]!r}; expected "
                            "{\"name\": a non-empty string, \"members\": a non-empty list of node ids}")
        for m in members:
            if not isinstance(m, str) or m not in node_ids:
                raise DataError(f"{where}: supernode {name!r} names member {m!r}, which is not a node of the graph")
            if m in seen:
                raise DataError(f"{where}: node {m!r} is in two supernodes ({seen[m]!r} and {name!r}); "
                                "expected each node in at most one")
            seen[m] = name
        out.append({"name": name.strip(), "members": list(members)})
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, (np.generic,)):
        return x.item()
    return x

