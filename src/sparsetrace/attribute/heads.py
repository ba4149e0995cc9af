"""Which attention heads carry an edge (:func:`head_loadings`), and QK terms for a graph (:func:`add_qk`).

An edge ``s -> t`` between a source at position ``k`` and a target at position ``q != k`` is, in the frozen
replacement model, the sum over every path from s to t; since MLP outputs are constants there, every such
path crosses from other positions into position ``q`` through attention, and (causal attention: nothing
ever leaves ``q`` and comes back) it has exactly one *last* crossing: head ``h`` of layer ``l`` moving the
source's effect from some position ``k' != q`` into ``q``. Grouping paths by that last crossing splits the
edge weight exactly over heads:

    loading(l, h) = g_{l,h} . sum_{k' != q} A_{l,h}[q, k'] * dV_{l,h}[k']

where ``A`` is the frozen pattern, ``dV`` the source's (total, frozen-model) effect on the head's value
vectors and ``g`` the gradient of the target's pre-activation with respect to the head's output at ``q``
(before the output projection). ``sum_{l,h} loading(l, h)`` equals the edge weight; ``at_key`` is the part
that comes straight from the source's own position (``k' = k``), the part a QK decomposition of
``(l, h, q, k)`` explains.

:func:`add_qk` picks a graph's strongest attention-mediated edges (source and target at different
positions), computes their head loadings and, for the heads that carry most of each, the QK decomposition
(:func:`~.qk.qk_terms`) of the score from the target's position to the source's, and stores them under the
graph's optional top-level ``"qk"`` key (docs/formats.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError, ModelError
from .checks import _target_read, source_deltas
from .graph_types import Graph, Node
from .qk import AttentionCapture, QKTerms, check_qk, qk_terms
from .replacement import ReplacementModel

__all__ = ["add_qk", "attention_edges", "head_loadings"]


def _patterns(rm: ReplacementModel) -> list[Tensor]:
    """The frozen attention probabilities of every layer ``[H, P, P]``, from the replacement model's tape."""
    probs = [v for kind, v in (rm.tape or []) if kind == "sdpa"]
    if len(probs) != rm.lm.n_layers:
        raise ModelError(f"expected one frozen sdpa pattern per layer ({rm.lm.n_layers}), found {len(probs)}; "
                         "head loadings need sdpa attention")
    return [p.reshape(-1, *p.shape[-3:])[0] for p in probs]


def head_loadings(rm: ReplacementModel, edges: list[tuple[Node, Node]]) -> tuple[np.ndarray, np.ndarray]:
    """Per edge (source node, target node), each head's loading ``[n_edges, n_layers, n_heads]`` and the part
    of it that comes from the source's own position (``at_key``, same shape); see the module docstring.
    For an edge whose source and target share a position the split covers only the attention part."""
    lm = rm.lm
    n = len(edges)
    if n == 0:
        return np.zeros((0, lm.n_layers, 0)), np.zeros((0, lm.n_layers, 0))
    reads = [_target_read(rm, t) for _, t in edges]
    depth = max(lm.n_layers if key == "final" else rm.sites[key].layer for key, _ in reads)
    stop = None if depth >= lm.n_layers else depth
    leaves = rm.make_leaves(n + 1, requires_grad=True, up_to=stop)
    with torch.no_grad():
        for b, (s, _) in enumerate(edges, start=1):
            for key, delta in source_deltas(rm, s, 1.0):
                if key in leaves:
                    leaves[key][b, s.position] -= delta.reshape(-1)
    layers = list(range(lm.n_layers if stop is None else stop + 1))
    cap = AttentionCapture(lm, layers)
    with cap:
        res = rm.run(n + 1, mode="replay", leaves=leaves, stop_after=stop)
    calls = [cap.call(L) for L in layers]
    total = 0
    for b, ((key, vec), (_, t)) in enumerate(zip(reads, edges, strict=True), start=1):
        x = res.final if key == "final" else res.reads[key]
        total = total + x[b, t.position] @ vec.to(x.dtype)
    grads = torch.autograd.grad(total, [c.out for c in calls], allow_unused=True)
    pats = _patterns(rm)
    H = calls[0].n_heads
    load = np.zeros((n, lm.n_layers, H))
    at_key = np.zeros((n, lm.n_layers, H))
    with torch.no_grad():
        for L, (c, g) in enumerate(zip(calls, grads, strict=True)):
            if g is None:
                continue
            V = c.value.double()
            rep = H // V.shape[1]
            dV = (V[:1] - V[1:]).repeat_interleave(rep, dim=1)  # [n, H, P, dh]: the source's effect
            A = pats[L].double().to(dV.device)  # [H, P, P]
            for b, (s, t) in enumerate(edges):
                q = t.position
                w = A[:, q].clone()  # [H, P]
                w[:, q] = 0.0  # the last crossing comes from another position
                cross = torch.einsum("hp,hpd->hd", w, dV[b])
                gq = g[b + 1, :, q].double()  # [H, dh]
                load[b, L] = (gq * cross).sum(-1).cpu().numpy()
                if s.position != q:
                    at_key[b, L] = (gq * A[:, q, s.position, None] * dV[b, :, s.position]).sum(-1).cpu().numpy()
    return load, at_key


def attention_edges(graph: Graph, n: int, *, skip_source_positions: tuple[int, ...] = ()) -> list[int]:
    """Indices of the ``n`` strongest edges whose source and target sit at different positions (so every
    path between them runs through attention), leaving out sources at ``skip_source_positions``."""
    src, dst, w = graph.edges.numpy()
    pos = np.array([nd.position for nd in graph.nodes])
    kinds = np.array([nd.kind for nd in graph.nodes])
    ok = (pos[src] != pos[dst]) & np.isin(kinds[src], ["feature", "error", "embedding"]) & \
        np.isin(kinds[dst], ["feature", "logit"]) & ~np.isin(pos[src], list(skip_source_positions))
    idx = np.flatnonzero(ok)
    return idx[np.argsort(-np.abs(w[idx]), kind="stable")][:n].tolist()


def add_qk(graph: Graph, rm: ReplacementModel | None = None, *, n_edges: int = 5, n_heads: int = 2,
           n_pairs: int = 10, n_checks: int = 0, log=None) -> list[dict]:
    """Head loadings and QK terms for the ``n_edges`` strongest attention-mediated edges of ``graph`` (sources
    at a BOS position left out), stored
    as ``graph.qk`` (written to graph.json's top-level ``"qk"``) and returned.

    For each edge: every head's loading (the ``n_heads`` largest listed, the rest summed as ``other``); for
    each listed head, the QK decomposition of the score from the target's position to the source's with its
    ``n_pairs`` largest pair terms (``n_checks`` > 0 also ablates that many key-side features and records
    the measured change of the score, :func:`~.qk.check_qk`)."""
    say = log or (lambda _m: None)
    rm = rm if rm is not None else graph.replacement
    if rm is None:
        raise DataError("add_qk needs the graph's replacement model (build the graph in this process)")
    # a BOS token is an attention sink: edges from it are strong in every prompt and say nothing about this one
    bos = getattr(rm.lm.tokenizer, "bos_token_id", None)
    skip = (0,) if bos is not None and int(rm.input_ids[0, 0]) == int(bos) and rm.n_pos > 1 else ()
    idx = attention_edges(graph, n_edges, skip_source_positions=skip)
    src, dst, w = graph.edges.numpy()
    pairs = [(graph.nodes[src[e]], graph.nodes[dst[e]]) for e in idx]
    load, at_key = head_loadings(rm, pairs)
    pats = _patterns(rm) if idx else []
    cache: dict[tuple[int, int, int, int], QKTerms] = {}
    out = []
    for i, e in enumerate(idx):
        s, t = pairs[i]
        flat = np.abs(load[i]).ravel()
        top = np.argsort(-flat, kind="stable")[:n_heads]
        H = load.shape[2]
        heads, qks = [], []
        for j in top.tolist():
            L, h = divmod(j, H)
            heads.append({"layer": L, "head": h, "loading": float(load[i, L, h]), "at_key": float(at_key[i, L, h]),
                          "pattern": float(pats[L][h, t.position, s.position])})
            key = (L, h, t.position, s.position)
            if key not in cache:
                say(f"QK terms: layer {L} head {h}, query {t.position} -> key {s.position}")
                cache[key] = qk_terms(rm, *key)
            doc = cache[key].to_json(n_pairs)
            if n_checks:
                doc["checks"] = check_qk(rm, cache[key], k=n_checks, real=False)
            qks.append(doc)
        out.append({"source": s.node_id, "target": t.node_id, "weight": float(w[e]),
                    "sum_of_loadings": float(load[i].sum()), "heads": heads,
                    "other_heads": float(load[i].sum() - sum(hd["loading"] for hd in heads)), "qk": qks})
    graph.qk = out
    return out
