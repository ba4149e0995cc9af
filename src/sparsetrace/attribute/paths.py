"""Greedy path search in an attribution graph, and top-influence circuits.

A path runs from a source node to a target (usually a logit): ``nodes[0] -> nodes[1] -> ... ->
nodes[-1]``. Its ``score`` is the product, along the path, of the *normalised* absolute edge weights
(``|w(s -> t)| / sum_s' |w(s' -> t)|``: the fraction of each node's incoming attribution the path
uses), which makes paths of different targets and lengths comparable; ``product`` is the product of
the raw edge weights, and ``effect`` the linearised effect of the source on the target along the path
(``w_1 * prod_{k>1} w_k / a_k``, with ``a_k`` the activation of the k-th intermediate feature: an edge
weight is a change of the target's pre-activation per activation of the source, so passing through a
feature divides by its activation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import DataError
from .graph_types import Graph
from .prune import node_influence

__all__ = ["Path", "find_paths", "resolve_target", "select_circuit"]


@dataclass
class Path:
    nodes: list[str]  # source first, target last
    weights: list[float]  # raw edge weights along the path (len(nodes) - 1)
    score: float  # product of normalised |weights|
    effect: float  # linearised source -> target effect along the path
    complete: bool  # True when the source has no incoming edges (an embedding, error or leaf feature)

    @property
    def product(self) -> float:
        return float(math.prod(self.weights)) if self.weights else 1.0

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "weights": self.weights, "score": self.score, "effect": self.effect,
                "product": self.product, "complete": self.complete}


def resolve_target(graph: Graph, target: str | int | None) -> int:
    """A node index from a node id, a logit's token text or token id, or None (the likeliest logit)."""
    logits = [i for i, n in enumerate(graph.nodes) if n.kind == "logit"]
    if target is None:
        if not logits:
            raise DataError("graph has no logit nodes; pass a target node id")
        return max(logits, key=lambda i: graph.nodes[i].prob if graph.nodes[i].prob is not None else -1.0)
    if isinstance(target, str) and target in graph.index:
        return graph.index[target]
    for i in logits:
        n = graph.nodes[i]
        if (isinstance(target, int) and n.token_id == target) or (isinstance(target, str) and n.token == target):
            return i
    raise DataError(f"target {target!r} is neither a node id nor a target logit of this graph "
                    f"(logits: {[graph.nodes[i].token for i in logits]})")


def find_paths(graph: Graph, target: str | int | None = None, num_iters: int = 10,
               num_branches: int = 5) -> list[Path]:
    """Beam search backwards from ``target`` along the strongest incoming edges.

    Each iteration extends every path in the beam by the ``num_branches`` strongest (largest
    ``|weight|``) incoming edges of its first node and keeps the ``num_branches`` best extensions by
    score; a path whose first node has no incoming edges is finished. Stops after ``num_iters``
    expansions or when nothing can be extended. Returns finished and still-open paths, best score first.
    """
    if num_iters < 1 or num_branches < 1:
        raise DataError("num_iters and num_branches must be >= 1")
    t = resolve_target(graph, target)
    n = len(graph.nodes)
    src, dst, w = graph.edges.numpy()
    A = sp.csr_matrix((w.astype(np.float64), (dst.astype(np.int64), src.astype(np.int64))), shape=(n, n))
    A.sum_duplicates()
    row_abs = np.asarray(abs(A).sum(axis=1)).ravel()
    acts = [nd.activation for nd in graph.nodes]
    ids = [nd.node_id for nd in graph.nodes]

    # a beam entry: (score, node indices from source to target, raw weights along it)
    beam: list[tuple[float, list[int], list[float]]] = [(1.0, [t], [])]
    done: list[tuple[float, list[int], list[float], bool]] = []
    for _ in range(num_iters):
        cand = []
        for score, path, ws in beam:
            head = path[0]
            lo, hi = A.indptr[head], A.indptr[head + 1]
            if hi == lo:
                done.append((score, path, ws, True))
                continue
            cols, vals = A.indices[lo:hi], A.data[lo:hi]
            for j in np.argsort(-np.abs(vals), kind="stable")[:num_branches]:
                s = int(cols[j])
                if s in path:
                    continue
                cand.append((score * abs(vals[j]) / row_abs[head], [s, *path], [float(vals[j]), *ws]))
        if not cand:
            beam = []
            break
        cand.sort(key=lambda c: -c[0])
        beam = cand[:num_branches]
    for score, path, ws in beam:
        head = path[0]
        done.append((score, path, ws, A.indptr[head + 1] == A.indptr[head]))
    out = []
    seen = set()
    for score, path, ws, complete in sorted(done, key=lambda d: -d[0]):
        key = tuple(path)
        if key in seen or len(path) < 2:
            continue
        seen.add(key)
        effect = ws[0]
        for k in range(1, len(ws)):
            a = acts[path[k]]
            effect = effect * ws[k] / a if a else float("nan")
        out.append(Path([ids[i] for i in path], ws, float(score), float(effect), bool(complete)))
    return out


def select_circuit(graph: Graph, max_features: int = 20) -> list[str]:
    """The ``max_features`` feature nodes with the largest influence on the target logits (node ids),
    for causal verification. Uses the nodes' stored ``influence`` (computed on the full graph), and the
    full graph itself when ``graph`` is a pruned graph built in this process (``graph.unpruned``)."""
    if graph.unpruned is not None:
        graph = graph.unpruned
    feats = [n for n in graph.nodes if n.kind == "feature"]
    if any(n.influence is None for n in feats):
        infl = node_influence(graph)
        vals = {n.node_id: float(infl[graph.index[n.node_id]]) for n in feats}
    else:
        vals = {n.node_id: float(n.influence) for n in feats}
    return sorted(vals, key=lambda k: -vals[k])[:max_features]
