"""Finite-difference checks of attribution-graph edges (:func:`check_edges`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..dictionary.model import SparseDictionary
from ..errors import ConfigError, DataError
from ..model.adapter import LanguageModel
from .graph_types import Graph, Node
from .replacement import ReplacementModel
from .threads import auto_threads, threads

__all__ = ["check_edges", "source_deltas"]


def _node_site(node: Node) -> str:
    if node.kind == "embedding":
        return "emb"
    if node.hookpoint is None:
        raise DataError(f"node {node.node_id} has no hookpoint; cannot locate it in the replacement model")
    return node.hookpoint


def check_edges(graph: Graph, model: ReplacementModel | LanguageModel | None = None, k: int = 100, *,
                dictionaries: Sequence[SparseDictionary] | None = None, eps: float = 0.1,
                unfrozen: bool = True, batch_size: int = 64) -> dict:
    """Check the ``k`` strongest edges by perturbing each source and re-running the model.

    For edge s -> t the source is scaled by ``1 + eps`` (a feature's activation, or an error /
    embedding vector) and the change of t's pre-activation (``W_enc[f] . x_in`` or ``logit - mean``)
    divided by ``eps`` is compared with the edge weight:

    - ``frozen``: in the frozen replacement model (attention patterns and norm scales replayed), where
      the edge is exact up to rounding; ``rel_err = |fd - w| / |w|``;
    - ``unfrozen`` ("causal agreement"): attention and norms recomputed live; other MLP outputs and
      features held at their clean values, so it measures what freezing attention/norms leaves out.

    ``model``: the graph's :class:`ReplacementModel` (default ``graph.replacement``), or the language
    model plus ``dictionaries`` to rebuild it from ``metadata["prompt_token_ids"]``.
    """
    with threads(auto_threads()):
        return _check_edges(graph, model, k, dictionaries=dictionaries, eps=eps, unfrozen=unfrozen,
                            batch_size=batch_size)


class _Spec(NamedTuple):
    """One edge to check: perturb each site in ``deltas`` at ``position``; read the target at
    ``target_site`` (a dictionary's input or ``"final"``), ``target_position``, along ``read``."""

    deltas: list[tuple[str, Tensor]]  # (site, change of its constant at ``position``)
    position: int
    target_site: str
    target_position: int
    read: Tensor
    weight: float
    source: str
    target: str


def _replacement_model(graph: Graph, model, dictionaries) -> ReplacementModel:
    """The replacement model to check ``graph`` against: ``model``, ``graph.replacement``, or one rebuilt
    from a language model, the dictionaries and the graph's prompt."""
    rm = model if isinstance(model, ReplacementModel) else graph.replacement
    if isinstance(model, LanguageModel):
        if dictionaries is None:
            raise ConfigError("check_edges with a LanguageModel needs the dictionaries")
        ids = graph.metadata.get("prompt_token_ids")
        if not ids:
            raise DataError("graph metadata has no prompt_token_ids; cannot rebuild the replacement model")
        rm = ReplacementModel(model, torch.tensor([ids]), dictionaries)
    if rm is None:
        raise ConfigError("check_edges needs the replacement model (graph.replacement) or a LanguageModel + dictionaries")
    return rm


def source_deltas(rm: ReplacementModel, node: Node, eps: float) -> list[tuple[str, Tensor]]:
    """The changes of the constants (site key, vector at the node's position) when the source is scaled
    by ``1 + eps``: one site, or for a cross-layer transcoder's feature every MLP site it writes to."""
    key, p = _node_site(node), node.position
    if node.kind == "feature":
        site = rm.sites[key]
        return site.writes(int(node.feature), eps * site.activation(p, int(node.feature)))
    if node.kind == "error":
        return [(key, eps * rm.sites[key].error[p])]
    if node.kind == "embedding":
        return [(key, eps * rm.emb[p])]
    raise DataError(f"edge source {node.node_id} is a {node.kind} node")


def _target_read(rm: ReplacementModel, node: Node) -> tuple[str, Tensor]:
    """(where the target reads, the direction it reads there)."""
    if node.kind == "logit":
        return "final", rm.logit_direction(int(node.token_id))
    if node.kind == "feature":
        key = _node_site(node)
        return key, rm.sites[key].W_enc[int(node.feature)]
    raise DataError(f"edge target {node.node_id} is a {node.kind} node")


def _edge_specs(graph: Graph, rm: ReplacementModel, k: int, eps: float) -> list[_Spec]:
    """The ``k`` strongest edges (by |weight|) as perturbation specs."""
    src, dst, w = graph.edges.numpy()
    order = np.argsort(-np.abs(w), kind="stable")[:k]
    specs = []
    for e in order:
        s_node, t_node = graph.nodes[src[e]], graph.nodes[dst[e]]
        deltas = [(k, d.reshape(rm.lm.d_model)) for k, d in source_deltas(rm, s_node, eps)]
        tkey, tvec = _target_read(rm, t_node)
        specs.append(_Spec(deltas, s_node.position, tkey, t_node.position, tvec, float(w[e]), s_node.node_id,
                           t_node.node_id))
    return specs


def _measure(rm: ReplacementModel, specs: list[_Spec], mode: str | None, eps: float, batch_size: int) -> list[float]:
    """Finite-difference edge weights: copy 0 of each batch is clean, copy b perturbs edge b's source.
    Edges are grouped by target depth so forwards for feature targets stop at the deepest one."""
    n_layers = rm.lm.n_layers
    depth = [n_layers if s.target_site == "final" else rm.sites[s.target_site].layer for s in specs]
    by_depth = sorted(range(len(specs)), key=lambda i: depth[i])
    out = [0.0] * len(specs)
    for i in range(0, len(by_depth), batch_size):
        idx = by_depth[i:i + batch_size]
        chunk = [specs[j] for j in idx]
        B = len(chunk) + 1
        deepest = max(depth[j] for j in idx)
        stop = None if deepest >= n_layers else deepest
        leaves = rm.make_leaves(B, up_to=stop)
        for b, sp_ in enumerate(chunk, start=1):
            for key, delta in sp_.deltas:
                if key in leaves:  # a CLT write beyond the deepest target cannot reach it
                    leaves[key][b, sp_.position] += delta
        res = rm.run(B, mode=mode, leaves=leaves, stop_after=stop)
        for j, (b, sp_) in zip(idx, enumerate(chunk, start=1), strict=True):
            t = res.final if sp_.target_site == "final" else res.reads[sp_.target_site]
            diff = (t[b, sp_.target_position].double() - t[0, sp_.target_position].double()) @ sp_.read.double()
            out[j] = float(diff) / eps
    return out


def _summary(specs: list[_Spec], fd: list[float]) -> tuple[dict, np.ndarray]:
    """Agreement of finite differences ``fd`` with the edge weights, and the per-edge relative errors."""
    ws = np.array([s.weight for s in specs])
    f = np.array(fd)
    rel = np.abs(f - ws) / np.maximum(np.abs(ws), 1e-30)
    res = {"max_rel_err": float(rel.max()), "median_rel_err": float(np.median(rel)),
           "mean_rel_err": float(rel.mean()), "sign_agreement": float(np.mean(np.sign(f) == np.sign(ws)))}
    if len(f) > 1 and f.std() > 0 and ws.std() > 0:
        res["pearson"] = float(np.corrcoef(f, ws)[0, 1])
    return res, rel


def _check_edges(graph, model, k, *, dictionaries, eps, unfrozen, batch_size) -> dict:
    rm = _replacement_model(graph, model, dictionaries)
    specs = _edge_specs(graph, rm, k, eps)
    fd_frozen = _measure(rm, specs, "replay", eps, batch_size)
    s_frozen, rel_frozen = _summary(specs, fd_frozen) if specs else ({}, [])
    result: dict = {"n": len(specs), "eps": eps, "frozen": s_frozen}
    fd_live = _measure(rm, specs, None, eps, batch_size) if unfrozen else []
    if unfrozen and specs:
        s_live, rel_live = _summary(specs, fd_live)
        result["causal_agreement"] = s_live
    result["edges"] = []
    for i, s in enumerate(specs):
        row = {"source": s.source, "target": s.target, "weight": s.weight, "fd_frozen": fd_frozen[i],
               "rel_err_frozen": float(rel_frozen[i])}
        if unfrozen:
            row.update(fd_unfrozen=fd_live[i], rel_err_unfrozen=float(rel_live[i]))
        result["edges"].append(row)
    return result
