"""Building attribution graphs: target selection (:func:`select_targets`), the batched-backward
builder (:func:`build_graph`) and the one-call entry point (:func:`attribute`, which also prunes).
The graph's nodes and edges are defined in :mod:`.graph_types`.

Computation: a forward of the replacement model on ``batch_size`` copies of the prompt (frozen
constants replayed), kept alive with ``retain_graph`` (one with ``n_logits`` copies through the whole
model for the logit rows, one that stops after the deepest dictionary for the feature rows); each batch of ``batch_size`` targets is one
``torch.autograd.grad`` call seeding copy b with target b's read vector (``W_enc[f]`` at the read
site, or ``W_U[t] - mean W_U`` at the unembedding input); per-feature edges then come from one
batched matmul of the gradient at each site with the active decoder rows (times activations).
Targets get rows in influence order: the logits first, then features by their estimated influence on
the logits (recomputed every ``update_interval`` batches, and at least every ``MIN_ROWS_PER_UPDATE`` rows, from
the rows so far: long prompts get small batches, and each refresh costs a pass per layer over every edge), up to
``max_feature_nodes`` (when the cap binds, features whose estimated influence is exactly zero are
skipped: no path links them to the logits); a batch's targets are sorted by layer so its backward
stops early.

Memory bound: edges are kept sparse (exact zeros dropped: sources after the target's position or
layer never appear): at most ``(n_logits + max_feature_nodes) * (n_active + (n_sites + 1) * seq)``
edges, 8 bytes each while building (float32 weight, int32 source; see :mod:`.rows`), and only edges
from nodes are copied out. Decoder rows are never copied per active feature (see :mod:`.sources`). The
retained forward holds the leaves and what each dictionary reads, ``2 * batch_size * seq * d_model``
floats per layer up to the deepest dictionary; attention patterns are shared by the batch (one
``n_heads * seq^2`` tape per layer). Freed memory is handed back to the OS between forwards and after
each influence refresh (:func:`~sparsetrace.util.memory.release_free_memory`). Measured on 30 layers of
SmolLM2 with 1,000 feature rows: 4.6 GB at 512 tokens, 7.1 GB at 1,024 (``bench/bench_attribution_scaling.py``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..dictionary.model import SparseDictionary
from ..errors import ConfigError, DataError
from ..model.adapter import LanguageModel
from ..util.memory import release_free_memory
from .graph_types import Edges, Graph, Node
from .prune import compute_influence, graph_scores, normalised_adjacency, prune_graph
from .replacement import ReplacementModel, Site
from .rows import Rows
from .sources import SiteSources, decoder_matrix, edge_values, site_sources
from .threads import auto_threads, one_thread, threads

__all__ = ["attribute", "auto_batch_size", "build_graph", "select_targets"]


def select_targets(lm: LanguageModel, logits: Tensor, target: str | int | None = None, *,
                   desired_logit_prob: float = 0.95, max_n_logits: int = 10) -> list[tuple[int, float]]:
    """(token_id, prob) pairs: the user's target, or the most likely next tokens covering
    ``desired_logit_prob`` of the probability mass, at most ``max_n_logits``."""
    probs = torch.softmax(logits.double(), -1)
    if target is not None:
        if isinstance(target, str):
            tid = lm.single_token_id(target)
        else:
            tid = int(target)
            if not 0 <= tid < probs.numel():
                raise DataError(f"target token id {tid} is out of range 0..{probs.numel() - 1}")
        return [(tid, float(probs[tid]))]
    if not 0 < desired_logit_prob <= 1 or max_n_logits < 1:
        raise ConfigError("desired_logit_prob must be in (0, 1] and max_n_logits >= 1")
    p, idx = probs.sort(descending=True)
    n = int((p.cumsum(0) < desired_logit_prob).sum()) + 1
    n = max(1, min(n, max_n_logits))
    return [(int(idx[i]), float(p[i])) for i in range(n)]


# ============================================================================================ building
class _Attributor:
    def __init__(self, rm: ReplacementModel, batch_size: int):
        self.rm = rm
        self.B = batch_size
        P = rm.n_pos
        self.P = P
        self.sites: list[Site] = list(rm.sites.values())
        self.feat_sites = [s for s in self.sites if s.dictionary is not None]
        off = 0
        self.feat_offset: dict[str, int] = {}
        for s in self.feat_sites:
            self.feat_offset[s.key] = off
            off += s.n_active
        self.n_feat = off
        self.err_offset = {s.key: self.n_feat + i * P for i, s in enumerate(self.sites)}
        self.emb_offset = self.n_feat + len(self.sites) * P
        self.n_cols = self.emb_offset + P
        # per-column info for features
        self.col_site = np.zeros(self.n_feat, dtype=np.int64)  # index into feat_sites
        self.col_pos = np.zeros(self.n_feat, dtype=np.int64)
        self.col_feat = np.zeros(self.n_feat, dtype=np.int64)
        self.col_act = np.zeros(self.n_feat, dtype=np.float64)
        self.site_rank = {s.key: i for i, s in enumerate(self.sites)}
        self.col_rank = np.zeros(self.n_feat, dtype=np.int64)
        for j, s in enumerate(self.feat_sites):
            n = s.n_active
            o = self.feat_offset[s.key]
            self.col_site[o:o + n] = j
            self.col_pos[o:o + n] = s.pos.cpu().numpy()
            self.col_feat[o:o + n] = s.feat.cpu().numpy()
            self.col_act[o:o + n] = s.act.double().cpu().numpy()
            self.col_rank[o:o + n] = self.site_rank[s.key]
        # per leaf, what writes into it (indices into the decoders, not copies of decoder rows; see .sources)
        self.multi = any(len(s.target_keys) > 1 for s in self.feat_sites)
        flat = decoder_matrix(self.feat_sites) if self.multi else None
        self.src: dict[str, SiteSources] = {
            t.key: site_sources(t, self.feat_sites, self.feat_offset, t.error, self.err_offset[t.key], P, flat)
            for t in self.sites}
        self.src["emb"] = site_sources(None, [], {}, rm.emb, self.emb_offset, P)
        big = max((s.max_chunk for s in self.src.values()), default=0)
        W = next((s.W for s in self.src.values() if s.W is not None), None)
        self._buf = None if W is None else torch.empty(big, W.shape[1], dtype=W.dtype, device=W.device)
        self.deepest = max((s.layer for s in self.feat_sites), default=0)
        self.fwd = None
        self.rows = Rows(self.n_cols)
        self.backward_s = 0.0
        self.forward_s = 0.0

    def forward(self, batch: int, *, logits: bool) -> None:
        """Build the retained forward: full depth for logit rows, up to the deepest dictionary otherwise."""
        self.fwd = None
        release_free_memory()  # the previous forward's activations, before the new one is allocated
        t0 = time.perf_counter()
        self.fwd = self.rm.run(batch, mode="replay", requires_grad=True, logits=False,
                               stop_after=None if logits else self.deepest)
        self.forward_s += time.perf_counter() - t0
        self.fwd_batch = batch
        self.leaf_keys = list(self.fwd.leaves)
        self.leaf_tensors = [self.fwd.leaves[k] for k in self.leaf_keys]

    def _read(self, key: str) -> Tensor:
        return self.fwd.final if key == "final" else self.fwd.reads[key]

    def compute(self, items: list[tuple[str, int, Tensor]], row_nodes: list[int], *, last: bool = False) -> None:
        """One batched backward: item b = (read key, position, seed vector) -> one row."""
        nb = len(items)
        assert 0 < nb <= self.fwd_batch
        seeds: dict[str, Tensor] = {}
        for b, (key, pos, vec) in enumerate(items):
            g = seeds.get(key)
            if g is None:
                g = seeds[key] = torch.zeros_like(self._read(key))
            g[b, pos] = vec
        t0 = time.perf_counter()
        grads = list(torch.autograd.grad([self._read(k) for k in seeds], self.leaf_tensors, list(seeds.values()),
                                         retain_graph=not last, allow_unused=True))
        self.backward_s += time.perf_counter() - t0
        parts = []
        feat_vals = None  # multi (CLT): a feature's rows in several sites are summed here
        # many small matmuls: one thread avoids an OpenMP hand-off per call, which on a busy machine
        # costs a scheduler time slice each
        with torch.no_grad(), one_thread():
            for i, key in enumerate(self.leaf_keys):
                G = grads[i]
                if G is None:
                    continue
                src = self.src[key]
                # under autocast G can come back in bf16 while the decoders are float32: multiply in their dtype
                Gp = G[:nb].permute(1, 2, 0).to(src.const.dtype).contiguous()  # [P, d, nb]
                grads[i] = G = None  # each gradient is freed once used ([batch, seq, d_model] per leaf)
                vals = edge_values(src, Gp, self._buf).cpu()
                n_f = src.n_f
                if self.multi and n_f:
                    if feat_vals is None:
                        feat_vals = torch.zeros(self.n_feat, nb, dtype=vals.dtype)
                    feat_vals.index_add_(0, src.cols, vals[:n_f])
                    parts.append((vals[n_f:], src.const_cols))
                else:
                    parts.append((vals, torch.cat([src.cols, src.const_cols])))
        if feat_vals is not None:
            parts.append((feat_vals, torch.arange(self.n_feat)))
        self.rows.add_batch(parts, nb, row_nodes)

    def feature_item(self, col: int) -> tuple[str, int, Tensor]:
        s = self.feat_sites[self.col_site[col]]
        return (s.key, int(self.col_pos[col]), s.W_enc[int(self.col_feat[col])])


MIN_ROWS_PER_UPDATE = 512  # feature rows between influence refreshes, whatever the batch size


def auto_batch_size(n_pos: int, token_budget: int = 3072) -> int:
    """Default targets per backward: about ``token_budget`` prompt copies x tokens, within 8..256."""
    return int(max(8, min(256, token_budget // max(n_pos, 1))))


def build_graph(rm: ReplacementModel, targets: list[tuple[int, float]], *, max_feature_nodes: int = 3000,
                batch_size: int | None = None, update_interval: int = 4, verbose: bool = False,
                prompt: str | None = None, num_threads: int | None = None) -> Graph:
    """The full (unpruned) attribution graph of ``rm`` for the given (token_id, prob) targets.

    ``num_threads``: torch threads while building (default :func:`auto_threads`)."""
    with threads(num_threads or auto_threads()):
        return _build_graph(rm, targets, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                            update_interval=update_interval, verbose=verbose, prompt=prompt)


def _build_graph(rm: ReplacementModel, targets: list[tuple[int, float]], *, max_feature_nodes: int,
                 batch_size: int | None, update_interval: int, verbose: bool, prompt: str | None) -> Graph:
    if batch_size is None:
        batch_size = auto_batch_size(rm.n_pos)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; expected >= 1")
    if max_feature_nodes < 0:
        raise ConfigError(f"max_feature_nodes={max_feature_nodes}; expected >= 0")
    t_start = time.perf_counter()
    c_start = time.process_time()
    log = (lambda m: print(f"[attribute] {m}", file=sys.stderr)) if verbose else (lambda m: None)
    at = _Attributor(rm, batch_size)
    n_logits = len(targets)
    probs = np.array([p for _, p in targets], dtype=np.float64)
    logit_w = probs / probs.sum() if probs.sum() > 0 else np.full(n_logits, 1.0 / n_logits)
    last = rm.n_pos - 1
    n_feat = at.n_feat
    budget = min(max_feature_nodes, n_feat)

    # logit rows, on a full-depth forward of (at most) batch_size copies
    at.forward(min(batch_size, n_logits), logits=True)
    for i in range(0, n_logits, batch_size):
        chunk = list(range(i, min(i + batch_size, n_logits)))
        at.compute([("final", last, rm.logit_direction(targets[j][0])) for j in chunk],
                   [at.n_cols + j for j in chunk], last=chunk[-1] == n_logits - 1)
    log(f"{n_logits} logit rows; {n_feat} active features, budget {budget}")

    visited = _feature_rows(at, budget, logit_w, batch_size, update_interval, log)
    n_visited = int(visited.sum())
    at.fwd = None
    t_rows = time.perf_counter() - t_start

    nodes, col_node = _nodes(at, targets, visited)
    # only edges from columns that are nodes (features without a row are left out before any copy)
    r, c, v = at.rows.arrays(keep_cols=col_node[: at.n_cols] >= 0)
    row_node = col_node[np.asarray(at.rows.row_node, dtype=np.int64)].astype(np.int32)
    at.rows = None  # free the building copies
    release_free_memory()
    # int32 throughout (a 30-layer graph with every feature row holds ~10^8 edges)
    dst = row_node[r]
    src = col_node.astype(np.int32)[c]
    del r, c
    edges = Edges.from_numpy(src, dst, v)
    del src, dst, v

    meta = _metadata(at, targets, prompt, batch_size, n_visited)
    meta["timings"] = {"forward_s": round(at.forward_s, 3), "rows_s": round(t_rows, 3),
                       "backward_s": round(at.backward_s, 3)}
    g = Graph(nodes, edges, meta)
    g.replacement = rm
    infl = compute_influence(normalised_adjacency(len(nodes), *edges.numpy()), g.logit_weights()) + g.logit_weights()
    for n, x in zip(nodes, infl.tolist(), strict=True):
        n.influence = x
    g.metadata["scores"] = graph_scores(g)
    g.metadata["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    g.metadata["timings"]["cpu_s"] = round(time.process_time() - c_start, 3)
    log(f"{len(nodes)} nodes, {len(edges)} edges, scores {g.metadata['scores']}")
    return g


def _feature_rows(at: _Attributor, budget: int, logit_w: np.ndarray, batch_size: int, update_interval: int,
                  log) -> np.ndarray:
    """Feature rows in influence order, on a forward that stops at the deepest dictionary; returns which
    feature columns got a row."""
    n_feat = at.n_feat
    visited = np.zeros(n_feat, dtype=bool)
    n_visited = 0
    if budget:
        at.forward(min(batch_size, budget), logits=False)
    while n_visited < budget:
        if budget == n_feat:
            pending = np.arange(n_feat)
        else:
            infl = at.rows.influence(logit_w)[:n_feat]
            release_free_memory()  # the merge's and the estimate's temporaries
            rank = np.argsort(-infl, kind="stable")
            rank = rank[~visited[rank] & (infl[rank] > 0)]
            if not rank.size:  # what is left cannot reach the logits through the rows so far, nor later
                log("no remaining feature has influence on the logits; stopping early")
                break
            pending = rank[: min(max(update_interval * batch_size, MIN_ROWS_PER_UPDATE), budget - n_visited)]
        # group by site (layer) so each backward stops as early as possible
        pending = pending[np.lexsort((at.col_pos[pending], at.col_rank[pending]))]
        for i in range(0, len(pending), batch_size):
            chunk = pending[i:i + batch_size]
            n_visited += len(chunk)
            at.compute([at.feature_item(int(c)) for c in chunk], chunk.tolist())
            visited[chunk] = True
        log(f"{n_visited}/{budget} feature rows, {at.rows.n_edges} edges")
    return visited


def _nodes(at: _Attributor, targets: list[tuple[int, float]], visited: np.ndarray) -> tuple[list[Node], np.ndarray]:
    """The graph's nodes (embeddings, visited features, errors, logits) and, per column of the rows
    (then per logit), its node index (-1: a feature without a row, left out)."""
    rm = at.rm
    lm = rm.lm
    P = rm.n_pos
    last = P - 1
    ids = rm.input_ids[0].tolist()
    toks = lm.to_str_tokens(ids)
    n_logits = len(targets)
    nodes: list[Node] = []
    col_node = np.full(at.n_cols + n_logits, -1, dtype=np.int64)
    for p in range(P):
        col_node[at.emb_offset + p] = len(nodes)
        nodes.append(Node(f"E@{p}", "embedding", -1, p, token=toks[p], token_id=int(ids[p])))
    for c in np.flatnonzero(visited):
        s = at.feat_sites[at.col_site[c]]
        p, f = int(at.col_pos[c]), int(at.col_feat[c])
        prefix = f"L{s.layer}" if s.kind == "mlp" else s.key
        col_node[c] = len(nodes)
        nodes.append(Node(f"{prefix}/F{f}@{p}", "feature", s.layer, p, feature=f, hookpoint=s.key,
                          activation=float(at.col_act[c]), token=toks[p]))
    for s in at.sites:
        prefix = f"L{s.layer}" if s.kind == "mlp" else s.key
        for p in range(P):
            col_node[at.err_offset[s.key] + p] = len(nodes)
            nodes.append(Node(f"{prefix}/ERR@{p}", "error", s.layer, p, hookpoint=s.key, token=toks[p]))
    final_logits = rm.clean_logits[-1].double()
    mean_logit = float(final_logits.mean())
    for j, (tid, prob) in enumerate(targets):
        col_node[at.n_cols + j] = len(nodes)
        nodes.append(Node(f"LOGIT/{tid}@{last}", "logit", lm.n_layers, last, activation=float(final_logits[tid]) - mean_logit,
                          token=lm.to_str_tokens([tid])[0], token_id=int(tid), prob=float(prob)))
    return nodes, col_node


def _metadata(at: _Attributor, targets: list[tuple[int, float]], prompt: str | None, batch_size: int,
              n_visited: int) -> dict:
    rm = at.rm
    lm = rm.lm
    ids = rm.input_ids[0].tolist()
    toks = lm.to_str_tokens(ids)
    return {
        "model": lm.model_id,
        "prompt": prompt if prompt is not None else "".join(toks),
        "prompt_tokens": toks,
        "prompt_token_ids": [int(i) for i in ids],
        "targets": [{"token": lm.to_str_tokens([t])[0], "token_id": int(t), "prob": float(p)} for t, p in targets],
        "node_threshold": None,
        "edge_threshold": None,
        "scores": {},
        "n_layers": lm.n_layers,
        "logit_target": "logit - mean(logits)",
        "dictionaries": [
            {"site": s.key, "layer": s.layer, "kind": s.dictionary.cfg.kind, "hookpoint_in": s.dictionary.cfg.hookpoint_in,
             "hookpoint_out": s.dictionary.cfg.hookpoint_out, "n_features": s.dictionary.cfg.n_features,
             "n_active": s.n_active}
            for s in at.feat_sites
        ],
        "transcoder_list": [f"L{s.layer}" for s in at.feat_sites if s.kind == "mlp"],
        "mlp_replacement": rm.mlp_replacement,
        "exactness": rm.exactness,
        "n_active_features": at.n_feat,
        "batch_size": batch_size,
        "num_threads": torch.get_num_threads(),
        "n_feature_rows": int(n_visited),
    }


def attribute(lm: LanguageModel, prompt: str | Tensor, dictionaries: Sequence[SparseDictionary], *,
              target: str | int | None = None, max_feature_nodes: int = 3000, batch_size: int | None = None,
              node_threshold: float = 0.8, edge_threshold: float = 0.98, desired_logit_prob: float = 0.95,
              max_n_logits: int = 10, update_interval: int = 4, prune: bool = True, keep_errors: bool | None = None,
              num_threads: int | None = None, verbose: bool = False) -> Graph:
    """Attribution graph of ``lm`` on ``prompt`` (text, tokenised with BOS, or token ids [1, seq]).

    ``target``: a single-token string (or token id) to explain; default: the top next-token logits
    covering ``desired_logit_prob`` of the probability (at most ``max_n_logits``). ``batch_size``: targets
    per batched backward (default :func:`auto_batch_size`: about 3072 / seq, within 8..256; memory grows
    with it, see the module docstring). Returns the graph
    pruned with ``node_threshold``/``edge_threshold`` (``prune=False``: the full graph); the full graph
    is ``graph.unpruned``, its scores are ``graph.scores`` (the pruned graph's under
    ``metadata["pruned_scores"]``). ``keep_errors`` (see :func:`prune_graph`): default True when some
    MLP layer has no transcoder (its whole output is an error node), else False. ``num_threads``:
    torch threads while building the graph (default: :func:`auto_threads`).
    """
    with threads(num_threads or auto_threads()):
        return _attribute(lm, prompt, dictionaries, target=target, max_feature_nodes=max_feature_nodes,
                          batch_size=batch_size, node_threshold=node_threshold, edge_threshold=edge_threshold,
                          desired_logit_prob=desired_logit_prob, max_n_logits=max_n_logits,
                          update_interval=update_interval, prune=prune, keep_errors=keep_errors, verbose=verbose)


def _attribute(lm, prompt, dictionaries, *, target, max_feature_nodes, batch_size, node_threshold, edge_threshold,
               desired_logit_prob, max_n_logits, update_interval, prune, keep_errors, verbose) -> Graph:
    if isinstance(prompt, str):
        ids = lm.tokenize(prompt)
        text = prompt
    else:
        ids = torch.as_tensor(prompt)
        text = None
    rm = ReplacementModel(lm, ids, dictionaries)
    targets = select_targets(lm, rm.clean_logits[-1], target, desired_logit_prob=desired_logit_prob,
                             max_n_logits=max_n_logits)
    full = build_graph(rm, targets, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                       update_interval=update_interval, verbose=verbose, prompt=text,
                       num_threads=torch.get_num_threads())
    if not prune:
        return full
    if keep_errors is None:
        keep_errors = any(s.kind == "mlp" and s.dictionary is None for s in rm.sites.values())
    pruned = prune_graph(full, node_threshold, edge_threshold, keep_errors=keep_errors)
    pruned.metadata["pruned_scores"] = graph_scores(pruned)
    pruned.unpruned = full
    return pruned

