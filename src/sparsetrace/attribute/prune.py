"""Influence on the target logits, graph scores and influence-based pruning (all sparse).

Conventions (as in circuit-tracer, reimplemented on sparse COO edges):

- ``A[t, s] = |w(s -> t)|``, row-normalised: ``N[t, s] = A[t, s] / sum_s' A[t, s']`` (the fraction of
  t's incoming attribution that comes from s; rows without incoming edges stay zero).
- ``logit_weights``: the targets' probabilities renormalised to sum to 1 (zero on other nodes).
- *influence* of node s: ``sum_{k>=1} (logit_weights @ N^k)[s]``, i.e. ``logit_weights @ ((I - N)^-1 - I)``,
  computed by propagating ``x <- N^T x`` until it vanishes (the graph is a DAG, so this takes at most
  its depth in steps; sparse mat-vecs only).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import DataError
from .graph_types import Edges, Graph

__all__ = [
    "compute_influence",
    "find_threshold",
    "graph_scores",
    "node_influence",
    "normalised_adjacency",
    "prune_graph",
]


def normalised_adjacency(n: int, src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> sp.csr_matrix:
    """``N[dst, src] = |w| / (sum of |w| into dst)`` as a CSR matrix [n, n]."""
    a = np.abs(np.asarray(weight, dtype=np.float64))
    dst = np.asarray(dst, dtype=np.int64)
    src = np.asarray(src, dtype=np.int64)
    rows = np.bincount(dst, weights=a, minlength=n)
    scale = np.divide(1.0, rows, out=np.zeros_like(rows), where=rows > 1e-30)
    return sp.csr_matrix((a * scale[dst], (dst, src)), shape=(n, n))


def compute_influence(N: sp.spmatrix, seed: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """``sum_{k>=1} seed @ N^k`` (excluding the seed itself)."""
    NT = N.T.tocsr()
    x = np.asarray(seed, dtype=np.float64)
    total = np.zeros_like(x)
    limit = N.shape[0] + 1 if max_iter is None else max_iter
    for _ in range(limit):
        x = NT @ x
        if not x.any():
            return total
        total += x
    raise DataError(f"influence did not converge in {limit} steps; the graph has a cycle")


def node_influence(graph: Graph) -> np.ndarray:
    """Each node's total (direct + indirect) influence on the weighted target logits."""
    N = normalised_adjacency(len(graph.nodes), *graph.edges.numpy())
    return compute_influence(N, graph.logit_weights())


def graph_scores(graph: Graph) -> dict[str, float]:
    """Replacement and completeness scores.

    - ``replacement``: of the end-to-end influence on the logits that reaches the graph's sources,
      the fraction that starts at embeddings rather than at error nodes:
      ``I(embeddings) / (I(embeddings) + I(errors))``. 1.0 means every path from the input to the
      output runs through features only.
    - ``completeness``: for every node, the fraction of its incoming (absolute, normalised) edge
      weight that does not come from error nodes, averaged over nodes weighted by their influence
      on the logits (logit nodes count with their logit weight): ``sum_n (1 - err_frac(n)) * w_n /
      sum_n w_n`` with ``w_n = influence(n) + logit_weight(n)``. Nodes without incoming edges count
      as complete.
    """
    n = len(graph.nodes)
    src, dst, w = graph.edges.numpy()
    N = normalised_adjacency(n, src, dst, w)
    lw = graph.logit_weights()
    infl = compute_influence(N, lw)
    kinds = np.array([nd.kind for nd in graph.nodes])
    is_err, is_emb = kinds == "error", kinds == "embedding"
    tok, err = infl[is_emb].sum(), infl[is_err].sum()
    replacement = float(tok / (tok + err)) if tok + err > 0 else float("nan")
    err_frac = np.asarray(N[:, np.flatnonzero(is_err)].sum(axis=1)).ravel() if is_err.any() else np.zeros(n)
    out = infl + lw
    completeness = float(((1.0 - err_frac) * out).sum() / out.sum()) if out.sum() > 0 else float("nan")
    return {"replacement": replacement, "completeness": completeness}


def find_threshold(scores: np.ndarray, threshold: float) -> float:
    """The smallest score among the top scores that together cover ``threshold`` of the total."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        return 0.0
    total = s.sum()
    if total <= 0:
        return 0.0
    cum = np.cumsum(s) / total
    idx = min(int(np.searchsorted(cum, threshold)), s.size - 1)
    return float(s[idx])


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, *,
                keep_errors: bool = False) -> Graph:
    """Keep the nodes covering ``node_threshold`` of the total influence on the logits, then the edges
    covering ``edge_threshold`` of the edge influence among those, then drop features/errors left
    without outgoing edges and features left without incoming edges (repeated until stable).

    Embeddings and logits are always kept. ``keep_errors``: error nodes bypass the node threshold, which
    then ranks features among themselves (the features covering ``node_threshold`` of the features'
    total influence are kept). Use it when error nodes dominate, e.g. when only some MLP layers have
    transcoders (the others are whole-MLP error nodes and would otherwise crowd out every feature).
    The edge score of s -> t is ``N'[t, s] * (influence'(t) + logit_weight(t))`` on the node-pruned
    graph. Node ``influence`` values are those of the unpruned graph.
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 < v <= 1.0:
            raise DataError(f"{name}={v}; expected a fraction in (0, 1]")
    n = len(graph.nodes)
    src, dst, w = graph.edges.numpy()
    src = src.astype(np.int64)
    dst = dst.astype(np.int64)
    lw = graph.logit_weights()
    infl = compute_influence(normalised_adjacency(n, src, dst, w), lw)
    kinds = np.array([nd.kind for nd in graph.nodes])
    always = (kinds == "embedding") | (kinds == "logit")
    # the node threshold ranks all nodes together (circuit-tracer), or with keep_errors the features alone
    pool = (kinds == "feature") if keep_errors else np.ones(n, dtype=bool)
    thr = find_threshold(infl[pool], node_threshold)
    node_mask = always | (pool & (infl >= thr) & (infl > 0))
    if keep_errors:
        node_mask |= kinds == "error"

    keep_e = node_mask[src] & node_mask[dst]
    e_idx = np.flatnonzero(keep_e)
    Np = normalised_adjacency(n, src[e_idx], dst[e_idx], w[e_idx])
    pinfl = compute_influence(Np, lw) + lw
    a = np.abs(w[e_idx].astype(np.float64))
    rows = np.bincount(dst[e_idx], weights=a, minlength=n)
    scores = a / np.maximum(rows[dst[e_idx]], 1e-30) * pinfl[dst[e_idx]]
    thr = find_threshold(scores, edge_threshold)
    edge_mask = np.zeros(len(w), dtype=bool)
    edge_mask[e_idx] = (scores >= thr) & (scores > 0)

    prunable = (kinds == "feature") | (kinds == "error")
    is_feat = kinds == "feature"
    while True:
        em = edge_mask & node_mask[src] & node_mask[dst]
        has_out = np.bincount(src[em], minlength=n) > 0
        has_in = np.bincount(dst[em], minlength=n) > 0
        new = node_mask.copy()
        new[prunable] &= has_out[prunable]
        new[is_feat] &= has_in[is_feat]
        new |= always
        if (new == node_mask).all():
            edge_mask = em
            break
        node_mask = new

    keep = np.flatnonzero(node_mask)
    remap = np.full(n, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    e = np.flatnonzero(edge_mask)
    edges = Edges.from_numpy(remap[src[e]], remap[dst[e]], w[e])
    meta = dict(graph.metadata)
    meta["node_threshold"] = float(node_threshold)
    meta["edge_threshold"] = float(edge_threshold)
    meta["keep_errors"] = bool(keep_errors)
    meta["pruned"] = {"nodes": int(len(keep)), "links": int(len(e)), "from_nodes": n, "from_links": int(len(w))}
    kept_ids = {graph.nodes[i].node_id for i in keep}
    groups = [{"name": g["name"], "members": [m for m in g["members"] if m in kept_ids]} for g in graph.supernodes]
    pruned = Graph([graph.nodes[i] for i in keep], edges, meta, [g for g in groups if g["members"]])
    pruned.replacement = graph.replacement
    return pruned
