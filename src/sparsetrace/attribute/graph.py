"""Input-dependent attribution graphs over the local replacement model.

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

Computation: a forward of the replacement model on ``batch_size`` copies of the prompt (frozen
constants replayed), kept alive with ``retain_graph`` (one with ``n_logits`` copies through the whole
model for the logit rows, one that stops after the deepest dictionary for the feature rows); each batch of ``batch_size`` targets is one
``torch.autograd.grad`` call seeding copy b with target b's read vector (``W_enc[f]`` at the read
site, or ``W_U[t] - mean W_U`` at the unembedding input); per-feature edges then come from one
batched matmul of the gradient at each site with the active decoder rows (times activations).
Targets get rows in influence order: the logits first, then features by their estimated influence on
the logits (recomputed every ``update_interval`` batches from the rows so far), up to
``max_feature_nodes`` (when the cap binds, features whose estimated influence is exactly zero are
skipped: no path links them to the logits); a batch's targets are sorted by layer so its backward
stops early.

Memory bound: edges are kept sparse (exact zeros dropped: sources after the target's position or
layer never appear): at most ``(n_logits + max_feature_nodes) * (n_active + (n_sites + 1) * seq)``
edges, 12 bytes each (int32 source, int32 target, float32 weight), plus 12 more per edge while
building when the feature cap binds (the row-normalised copy used for influence ordering). No
``n x n`` matrix is ever formed. The retained forward holds about ``4 * batch_size * seq * d_model``
floats per layer up to the deepest dictionary (measured: 360 MB for batch 64, 24 tokens, d_model 576,
30 layers) plus ``batch_size * n_heads * seq^2`` per layer for attention patterns, so for long prompts
lower ``batch_size``; the dense per-batch gradients are ``batch_size * seq * d_model`` per site.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ..dictionary.model import SparseDictionary
from ..errors import ConfigError, DataError
from ..model.adapter import LanguageModel
from .replacement import ReplacementModel, Site

__all__ = ["GRAPH_FORMAT", "Edges", "Graph", "Node", "attribute", "build_graph", "check_edges", "select_targets"]

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
    ``nodes``), ``metadata`` (the JSON metadata; ``scores`` lives there).

    Not serialised: ``replacement`` (the :class:`ReplacementModel` it was computed on, when built in
    this process) and ``unpruned`` (the full graph, for a pruned one).
    """

    def __init__(self, nodes: list[Node], edges: Edges, metadata: dict | None = None):
        self.nodes = nodes
        self.edges = edges
        self.metadata = dict(metadata or {})
        self.replacement: ReplacementModel | None = None
        self.unpruned: Graph | None = None
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
        return {"format": GRAPH_FORMAT, "metadata": _jsonable(self.metadata), "nodes": nodes, "links": links}

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
        g = cls(nodes, Edges.from_numpy(np.array(src, dtype=np.int32), np.array(dst, dtype=np.int32), np.array(w)), meta)
        g._index = index
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


# ============================================================================================ targets
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
class _Rows:
    """Accumulates sparse rows (target row -> source column) produced batch by batch, plus one CSR
    block of row-normalised absolute weights per batch (for the running influence estimate)."""

    def __init__(self, n_cols: int):
        self.n_cols = n_cols
        self.rows: list[Tensor] = []
        self.cols: list[Tensor] = []
        self.vals: list[Tensor] = []
        self.blocks: list[tuple[int, sp.csr_matrix]] = []  # (first row, normalised |w| block)
        self.row_node: list[int] = []  # row -> column index (features) or n_cols + logit index
        self.n_rows = 0

    def add_batch(self, parts: list[tuple[Tensor, Tensor]], nb: int, row_nodes: list[int], *,
                  blocks: bool = True) -> None:
        """``parts``: (values [n, nb], column ids [n]) for this batch's rows (one column of values per row)."""
        r0 = self.n_rows
        vals = torch.cat([p[0] for p in parts])
        cols = torch.cat([p[1] for p in parts])
        ci, r = (vals != 0).nonzero(as_tuple=True)
        if r.numel():
            v = vals[ci, r].to(torch.float32)
            c = cols[ci].to(torch.int32)
            r = r.to(torch.int32)
            self.rows.append(r + r0)
            self.cols.append(c)
            self.vals.append(v)
            if blocks:
                a = v.abs().double().numpy()
                rn, cn = r.numpy(), c.numpy()
                sums = np.bincount(rn, weights=a, minlength=nb)
                a = a / np.maximum(sums[rn], 1e-30)
                self.blocks.append((r0, sp.csr_matrix((a, (cn, rn)), shape=(self.n_cols, nb))))
        self.row_node.extend(row_nodes)
        self.n_rows += nb

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.rows:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
        return (torch.cat(self.rows).numpy(), torch.cat(self.cols).numpy(), torch.cat(self.vals).numpy())

    @property
    def n_edges(self) -> int:
        return sum(int(r.numel()) for r in self.rows)

    def influence(self, logit_w: np.ndarray) -> np.ndarray:
        """Influence of every column on the logits through the rows computed so far."""
        row_node = np.asarray(self.row_node, dtype=np.int64)
        prod = np.zeros(self.n_cols + len(logit_w))
        prod[self.n_cols:] = logit_w
        infl = np.zeros(self.n_cols)
        for _ in range(self.n_rows + 2):
            v = prod[row_node]
            x = np.zeros(self.n_cols)
            for r0, block in self.blocks:
                x += block @ v[r0:r0 + block.shape[1]]
            if not x.any():
                break
            infl += x
            prod[: self.n_cols] = x
            prod[self.n_cols:] = 0
        return infl


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _one_thread():
    return _threads(1)


def auto_threads() -> int:
    """torch's thread count, or 1 when the machine is oversubscribed (1-minute load average above 1.5x
    the CPU count): OpenMP threads then wait for each other at every op and run slower than one thread
    (measured on a shared 2-core machine at load 6-8: 0.96 s vs 1.5 s per batched backward)."""
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return n
    return 1 if n > 1 and load > 1.5 * (os.cpu_count() or 1) else n


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
        # per site, the "decoder" vectors of its sources in position-major order: at each position the
        # active features' decoder rows times their activations, then the error vector; a site's edges for
        # a batch of targets are then one small matmul per position with the site's gradient there
        self.dec: dict[str, tuple[Tensor, list[tuple[int, int]], Tensor]] = {}
        for s in self.sites:
            n = s.n_active
            if s.dictionary is not None and n:
                o = self.feat_offset[s.key]
                j = self.feat_sites.index(s)
                self.col_site[o:o + n] = j
                self.col_pos[o:o + n] = s.pos.cpu().numpy()
                self.col_feat[o:o + n] = s.feat.cpu().numpy()
                self.col_act[o:o + n] = s.act.double().cpu().numpy()
                self.col_rank[o:o + n] = self.site_rank[s.key]
                counts = torch.bincount(s.pos.cpu(), minlength=P)
            else:
                counts = torch.zeros(P, dtype=torch.long)
            # s.pos is sorted (row-major nonzero), so features of position p are a contiguous run
            fstart = (counts.cumsum(0) - counts).tolist()
            vecs, cols, spans, r = [], [], [], 0
            for p, c in enumerate(counts.tolist()):
                if c:
                    f0 = fstart[p]
                    vecs.append(s.W_dec[s.feat[f0:f0 + c]] * s.act[f0:f0 + c, None])
                    cols.append(self.feat_offset[s.key] + torch.arange(f0, f0 + c))
                vecs.append(s.error[p:p + 1])
                cols.append(torch.tensor([self.err_offset[s.key] + p]))
                spans.append((r, r + c + 1))
                r += c + 1
            self.dec[s.key] = (torch.cat(vecs).contiguous(), spans, torch.cat(cols))
        self.dec["emb"] = (rm.emb.contiguous(), [(p, p + 1) for p in range(P)], self.emb_offset + torch.arange(P))
        self.deepest = max((s.layer for s in self.feat_sites), default=0)
        self.fwd = None
        self.rows = _Rows(self.n_cols)
        self.need_blocks = True  # per-batch normalised blocks, only needed for influence ordering
        self.backward_s = 0.0
        self.forward_s = 0.0

    def forward(self, batch: int, *, logits: bool) -> None:
        """Build the retained forward: full depth for logit rows, up to the deepest dictionary otherwise."""
        self.fwd = None
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
        grads = torch.autograd.grad([self._read(k) for k in seeds], self.leaf_tensors, list(seeds.values()),
                                    retain_graph=not last, allow_unused=True)
        self.backward_s += time.perf_counter() - t0
        parts = []
        # many small matmuls: one thread avoids an OpenMP hand-off per call, which on a busy machine
        # costs a scheduler time slice each
        with torch.no_grad(), _one_thread():
            for key, G in zip(self.leaf_keys, grads, strict=True):
                if G is None:
                    continue
                dec, spans, cols = self.dec[key]
                Gp = G[:nb].permute(1, 2, 0).contiguous()  # [P, d, nb]
                vals = torch.empty(dec.shape[0], nb, dtype=G.dtype, device=G.device)
                for p, (r0, r1) in enumerate(spans):
                    torch.mm(dec[r0:r1], Gp[p], out=vals[r0:r1])
                parts.append((vals.cpu(), cols))
        self.rows.add_batch(parts, nb, row_nodes, blocks=self.need_blocks)

    def feature_item(self, col: int) -> tuple[str, int, Tensor]:
        s = self.feat_sites[self.col_site[col]]
        return (s.key, int(self.col_pos[col]), s.W_enc[int(self.col_feat[col])])


def auto_batch_size(n_pos: int, token_budget: int = 3072) -> int:
    """Default targets per backward: about ``token_budget`` prompt copies x tokens, within 8..256."""
    return int(max(8, min(256, token_budget // max(n_pos, 1))))


def build_graph(rm: ReplacementModel, targets: list[tuple[int, float]], *, max_feature_nodes: int = 3000,
                batch_size: int | None = None, update_interval: int = 4, verbose: bool = False,
                prompt: str | None = None, num_threads: int | None = None) -> Graph:
    """The full (unpruned) attribution graph of ``rm`` for the given (token_id, prob) targets.

    ``num_threads``: torch threads while building (default :func:`auto_threads`)."""
    with _threads(num_threads or auto_threads()):
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
    lm = rm.lm
    log = (lambda m: print(f"[attribute] {m}", file=sys.stderr)) if verbose else (lambda m: None)
    at = _Attributor(rm, batch_size)
    n_logits = len(targets)
    probs = np.array([p for _, p in targets], dtype=np.float64)
    logit_w = probs / probs.sum() if probs.sum() > 0 else np.full(n_logits, 1.0 / n_logits)
    last = rm.n_pos - 1
    n_feat = at.n_feat
    budget = min(max_feature_nodes, n_feat)
    at.need_blocks = budget < n_feat

    # logit rows, on a full-depth forward of (at most) batch_size copies
    at.forward(min(batch_size, n_logits), logits=True)
    for i in range(0, n_logits, batch_size):
        chunk = list(range(i, min(i + batch_size, n_logits)))
        at.compute([("final", last, rm.logit_direction(targets[j][0])) for j in chunk],
                   [at.n_cols + j for j in chunk], last=chunk[-1] == n_logits - 1)
    log(f"{n_logits} logit rows; {n_feat} active features, budget {budget}")

    # feature rows in influence order, on a forward that stops at the deepest dictionary
    visited = np.zeros(n_feat, dtype=bool)
    n_visited = 0
    if budget:
        at.forward(min(batch_size, budget), logits=False)
    while n_visited < budget:
        if budget == n_feat:
            pending = np.arange(n_feat)
        else:
            infl = at.rows.influence(logit_w)[:n_feat]
            rank = np.argsort(-infl, kind="stable")
            rank = rank[~visited[rank] & (infl[rank] > 0)]
            if not rank.size:  # what is left cannot reach the logits through the rows so far, nor later
                log("no remaining feature has influence on the logits; stopping early")
                break
            pending = rank[: min(update_interval * batch_size, budget - n_visited)]
        # group by site (layer) so each backward stops as early as possible
        pending = pending[np.lexsort((at.col_pos[pending], at.col_rank[pending]))]
        for i in range(0, len(pending), batch_size):
            chunk = pending[i:i + batch_size]
            n_visited += len(chunk)
            at.compute([at.feature_item(int(c)) for c in chunk], chunk.tolist())
            visited[chunk] = True
        log(f"{n_visited}/{budget} feature rows, {at.rows.n_edges} edges")
    at.fwd = None
    t_rows = time.perf_counter() - t_start

    # ------------------------------------------------------------------ assemble nodes
    P = rm.n_pos
    ids = rm.input_ids[0].tolist()
    toks = lm.to_str_tokens(ids)
    n_layers = lm.n_layers
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
    final_logits = rm.clean_logits[last].double()
    mean_logit = float(final_logits.mean())
    for j, (tid, prob) in enumerate(targets):
        col_node[at.n_cols + j] = len(nodes)
        nodes.append(Node(f"LOGIT/{tid}@{last}", "logit", n_layers, last, activation=float(final_logits[tid]) - mean_logit,
                          token=lm.to_str_tokens([tid])[0], token_id=int(tid), prob=float(prob)))

    r, c, v = at.rows.arrays()
    row_node = np.asarray(at.rows.row_node, dtype=np.int64)
    at.rows = None  # free the building copies
    dst = col_node[row_node[r]]
    src = col_node[c]
    keep = src >= 0
    edges = Edges.from_numpy(src[keep].astype(np.int32), dst[keep].astype(np.int32), v[keep])

    meta = {
        "model": lm.model_id,
        "prompt": prompt if prompt is not None else "".join(toks),
        "prompt_tokens": toks,
        "prompt_token_ids": [int(i) for i in ids],
        "targets": [{"token": lm.to_str_tokens([t])[0], "token_id": int(t), "prob": float(p)} for t, p in targets],
        "node_threshold": None,
        "edge_threshold": None,
        "scores": {},
        "n_layers": n_layers,
        "logit_target": "logit - mean(logits)",
        "dictionaries": [
            {"site": s.key, "layer": s.layer, "kind": s.dictionary.cfg.kind, "hookpoint_in": s.dictionary.cfg.hookpoint_in,
             "hookpoint_out": s.dictionary.cfg.hookpoint_out, "n_features": s.dictionary.cfg.n_features,
             "n_active": s.n_active}
            for s in at.feat_sites
        ],
        "transcoder_list": [f"L{s.layer}" for s in at.feat_sites if s.kind == "mlp"],
        "exactness": rm.exactness,
        "n_active_features": n_feat,
        "batch_size": batch_size,
        "num_threads": torch.get_num_threads(),
        "n_feature_rows": int(n_visited),
        "timings": {"forward_s": round(at.forward_s, 3), "rows_s": round(t_rows, 3), "backward_s": round(at.backward_s, 3)},
    }
    g = Graph(nodes, edges, meta)
    g.replacement = rm
    from .prune import compute_influence, graph_scores, normalised_adjacency

    infl = compute_influence(normalised_adjacency(len(nodes), *edges.numpy()), g.logit_weights()) + g.logit_weights()
    for n, x in zip(nodes, infl.tolist(), strict=True):
        n.influence = x
    g.metadata["scores"] = graph_scores(g)
    g.metadata["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    g.metadata["timings"]["cpu_s"] = round(time.process_time() - c_start, 3)
    log(f"{len(nodes)} nodes, {len(edges)} edges, scores {g.metadata['scores']}")
    return g


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
    with _threads(num_threads or auto_threads()):
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
    from .prune import graph_scores, prune_graph

    if keep_errors is None:
        keep_errors = any(s.kind == "mlp" and s.dictionary is None for s in rm.sites.values())
    pruned = prune_graph(full, node_threshold, edge_threshold, keep_errors=keep_errors)
    pruned.metadata["pruned_scores"] = graph_scores(pruned)
    pruned.unpruned = full
    return pruned


# ============================================================================================ checks
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
    with _threads(auto_threads()):
        return _check_edges(graph, model, k, dictionaries=dictionaries, eps=eps, unfrozen=unfrozen,
                            batch_size=batch_size)


def _check_edges(graph, model, k, *, dictionaries, eps, unfrozen, batch_size) -> dict:
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
    src, dst, w = graph.edges.numpy()
    order = np.argsort(-np.abs(w), kind="stable")[:k]
    d = rm.lm.d_model
    specs = []
    for e in order:
        s_node, t_node = graph.nodes[src[e]], graph.nodes[dst[e]]
        skey = _node_site(s_node)
        p = s_node.position
        if s_node.kind == "feature":
            site = rm.sites[skey]
            a = site.activation(p, int(s_node.feature))
            delta = eps * a * site.W_dec[int(s_node.feature)]
        elif s_node.kind == "error":
            delta = eps * rm.sites[skey].error[p]
        elif s_node.kind == "embedding":
            delta = eps * rm.emb[p]
        else:
            raise DataError(f"edge source {s_node.node_id} is a {s_node.kind} node")
        if t_node.kind == "logit":
            tkey, tvec = "final", rm.logit_direction(int(t_node.token_id))
        elif t_node.kind == "feature":
            tkey = _node_site(t_node)
            tvec = rm.sites[tkey].W_enc[int(t_node.feature)]
        else:
            raise DataError(f"edge target {t_node.node_id} is a {t_node.kind} node")
        specs.append((skey, p, delta.reshape(d), tkey, t_node.position, tvec, float(w[e]), s_node.node_id, t_node.node_id))

    # run edges with feature targets on forwards that stop at the deepest target layer
    depth = [rm.lm.n_layers if s[3] == "final" else rm.sites[s[3]].layer for s in specs]
    by_depth = sorted(range(len(specs)), key=lambda i: depth[i])

    def measure(mode):
        out = [0.0] * len(specs)
        for i in range(0, len(by_depth), batch_size):
            idx = by_depth[i:i + batch_size]
            chunk = [specs[j] for j in idx]
            B = len(chunk) + 1
            leaves = rm.make_leaves(B)
            for b, sp_ in enumerate(chunk, start=1):
                leaves[sp_[0]][b, sp_[1]] += sp_[2]
            deepest = max(depth[j] for j in idx)
            res = rm.run(B, mode=mode, leaves=leaves, stop_after=None if deepest >= rm.lm.n_layers else deepest)
            for j, (b, sp_) in zip(idx, enumerate(chunk, start=1), strict=True):
                t = res.final if sp_[3] == "final" else res.reads[sp_[3]]
                diff = (t[b, sp_[4]].double() - t[0, sp_[4]].double()) @ sp_[5].double()
                out[j] = float(diff) / eps
        return out

    def summary(fd):
        if not fd:
            return {}
        ws = np.array([s[6] for s in specs])
        f = np.array(fd)
        rel = np.abs(f - ws) / np.maximum(np.abs(ws), 1e-30)
        res = {"max_rel_err": float(rel.max()), "median_rel_err": float(np.median(rel)),
               "mean_rel_err": float(rel.mean()), "sign_agreement": float(np.mean(np.sign(f) == np.sign(ws)))}
        if len(f) > 1 and f.std() > 0 and ws.std() > 0:
            res["pearson"] = float(np.corrcoef(f, ws)[0, 1])
        return res, rel

    fd_frozen = measure("replay")
    s_frozen, rel_frozen = summary(fd_frozen) if specs else ({}, [])
    result: dict = {"n": len(specs), "eps": eps, "frozen": s_frozen}
    fd_live = measure(None) if unfrozen else []
    if unfrozen and specs:
        s_live, rel_live = summary(fd_live)
        result["causal_agreement"] = s_live
    result["edges"] = []
    for i, s in enumerate(specs):
        row = {"source": s[7], "target": s[8], "weight": s[6], "fd_frozen": fd_frozen[i],
               "rel_err_frozen": float(rel_frozen[i])}
        if unfrozen:
            row.update(fd_unfrozen=fd_live[i], rel_err_unfrozen=float(rel_live[i]))
        result["edges"].append(row)
    return result
