"""QK attribution: why an attention head attends where it does (:func:`qk_terms`, :func:`check_qk`).

Attribution graphs freeze attention patterns, so their edges say what attention moved (the OV path) but
not why a head attended there. For one attention edge (layer ``L``, head ``h``, query position ``q``, key
position ``k``) the pre-softmax score is

    s = scale * <query_h(q), key_h(k)>  (+ the additive mask, 0 under plain causal attention)

where ``query_h(q)`` and ``key_h(k)`` are what the model hands to ``scaled_dot_product_attention``: after
the attention input norm, the projections with their biases, and the rotary embedding (RoPE, for position
``q`` on the query side and ``k`` on the key side) where the model has one; with grouped-query attention
``key_h`` is the key/value head that query head ``h`` shares.

In the local replacement model (:class:`~.replacement.ReplacementModel`: MLP outputs are constants, the
attention patterns of earlier layers and every norm scale are held at their clean values; LayerNorm's mean
subtraction is linear and stays in) both vectors are affine in the nodes of the attribution graph, so

    query_h(q) = sum_i Q_i + Q_bias,      key_h(k) = sum_j K_j + K_bias,
    s          = sum_{i,j} scale * <Q_i, K_j>  (+ mask),

an exact bilinear decomposition into *pair terms*. A node is an embedding ``E@p`` (token + position
embedding), an active feature (``L6/F12@p``: activation times decoder row), an error node (``L6/ERR@p``)
or ``BIAS`` (every constant: the model's biases carried through the frozen model, the dictionaries'
``b_dec``). Nodes at positions before ``q`` (or ``k``) reach that position through the frozen attention of
earlier layers, so a node can sit on both sides. ``Q_i`` is found exactly by one backward per coordinate
of the head's query (``d_head`` seeds, one batched backward) in the frozen replacement model; ``BIAS`` is
the query of a forward with every constant zeroed plus the ``b_dec`` terms. The sum of the terms is
checked against the real model's score (:attr:`QKTerms.exactness`).

Ablating node ``n`` (removing its constant) changes the score by
``-(sum_j P[n, j] + sum_i P[i, n]) + P[n, n]`` with norms and earlier patterns frozen (exactly: the score
is bilinear there); :func:`check_qk` measures that by re-running the model, frozen and live.

Needs a model whose attention calls ``torch.nn.functional.scaled_dot_product_attention`` (transformers'
``sdpa`` attention, the default for Llama, GPT-2, GPT-NeoX, Mistral, Qwen, ...).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError, DataError, ModelError
from .replacement import ReplacementModel

__all__ = ["AttentionCapture", "NodeRef", "QKTerms", "check_qk", "node_refs", "qk_terms"]

_SDPA_ARGS = list(inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    scale=None, enable_gqa=False: None).parameters)


# ============================================================================================ capture
@dataclass
class SDPACall:
    """One ``scaled_dot_product_attention`` call: query ``[B, H, P, dh]``, key/value ``[B, H or H_kv, P, dh]``."""

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Tensor | None
    is_causal: bool
    scale: float
    out: Tensor

    @property
    def n_heads(self) -> int:
        return int(self.query.shape[1])

    def kv_head(self, head: int) -> int:
        n_kv = int(self.key.shape[1])
        return head if n_kv == self.n_heads else head // (self.n_heads // n_kv)

    def mask_term(self, head: int, q: int, k: int) -> float:
        """The additive mask at (q, k) (0 without a float mask; -inf where a boolean mask forbids it)."""
        m = self.attn_mask
        if self.is_causal and k > q:
            return -math.inf
        if m is None:
            return 0.0
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        v = m[0, head if m.shape[1] > 1 else 0, q, k]
        if m.dtype == torch.bool:
            return 0.0 if bool(v) else -math.inf
        return float(v)

    def scores(self, head: int, q: int) -> Tensor:
        """The pre-softmax scores of query position ``q`` over all key positions, per batch copy ``[B, P]``."""
        kv = self.key[:, self.kv_head(head)]  # [B, P, dh]
        s = torch.einsum("bd,bpd->bp", self.query[:, head, q].double(), kv.double()) * self.scale
        add = torch.tensor([self.mask_term(head, q, j) for j in range(kv.shape[1])], dtype=torch.float64)
        return s + add.to(s.device)


class _Mode(TorchFunctionMode):
    def __init__(self, owner: AttentionCapture, layer: int):
        super().__init__()
        self.owner, self.layer = owner, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # this mode is off during the call: the next one (e.g. freezing) sees it
        if func is F.scaled_dot_product_attention:
            a = dict(zip(_SDPA_ARGS, args, strict=False))
            a.update(kwargs)
            q = a["query"]
            scale = a.get("scale")
            self.owner.calls[self.layer] = SDPACall(
                q, a["key"], a["value"], a.get("attn_mask"), bool(a.get("is_causal")),
                1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), out)
        return out


class AttentionCapture:
    """Records the ``scaled_dot_product_attention`` call of each attention module in ``layers`` (arguments
    and output, with their autograd graph) for one forward: ``calls[layer]``. The recording mode is
    entered when the attention module starts, so it sits above any mode already active (such as the
    replacement model's freezing) and sees the call first."""

    def __init__(self, lm, layers: Sequence[int]):
        self.lm = lm
        self.layers = list(layers)
        self.calls: dict[int, SDPACall] = {}
        self._handles: list = []
        self._active: list[_Mode] = []

    def __enter__(self) -> AttentionCapture:
        self.calls.clear()
        for L in self.layers:
            attn = self.lm.arch.attn(L)

            def pre(_m, _a, L=L):
                mode = _Mode(self, L)
                mode.__enter__()
                self._active.append(mode)

            def post(_m, _a, _o):
                if self._active:
                    self._active.pop().__exit__(None, None, None)

            self._handles += [attn.register_forward_pre_hook(pre), attn.register_forward_hook(post)]
        return self

    def __exit__(self, *exc) -> None:
        while self._active:  # an exception inside an attention module
            self._active.pop().__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles = []

    def call(self, layer: int) -> SDPACall:
        if layer not in self.calls:
            impl = getattr(getattr(self.lm.model, "config", None), "_attn_implementation", None)
            raise ModelError(f"attention of layer {layer} did not call scaled_dot_product_attention (the model uses "
                             f"{impl!r} attention); QK attribution needs sdpa attention")
        return self.calls[layer]


@contextlib.contextmanager
def _qk_live(rm: ReplacementModel) -> Iterator[None]:
    """Replay with the query/key projections computed (the replacement model skips them by default)."""
    old = rm.skip_qk
    rm.skip_qk = False
    try:
        yield
    finally:
        rm.skip_qk = old


def _run_capture(rm: ReplacementModel, leaves: dict[str, Tensor], layers: Sequence[int], mode: str | None,
                 stop_after: int | None) -> AttentionCapture:
    B = next(iter(leaves.values())).shape[0]
    cap = AttentionCapture(rm.lm, layers)
    with cap, _qk_live(rm):
        rm.run(B, mode=mode, leaves=leaves, stop_after=stop_after)
    return cap


# ============================================================================================ nodes
@dataclass
class NodeRef:
    """A graph node as a constant of the replacement model: ``vec`` added at ``site`` (``"emb"`` or a site
    key), position ``pos``."""

    node_id: str
    kind: str  # embedding | feature | error
    site: str
    pos: int
    vec: Tensor


def node_refs(rm: ReplacementModel, max_pos: int, max_layer: int | None = None) -> list[NodeRef]:
    """The nodes at positions ``<= max_pos`` (of sites at layers ``<= max_layer``), named as in the graph."""
    if getattr(rm, "clt", None) is not None:
        raise ConfigError("QK terms are not supported for a cross-layer transcoder's features yet (each writes to "
                          "several MLP sites); use per-layer transcoders for --qk")
    refs = [NodeRef(f"E@{p}", "embedding", "emb", p, rm.emb[p]) for p in range(max_pos + 1)]
    for key, s in rm.sites.items():
        if max_layer is not None and s.layer > max_layer:
            continue
        prefix = f"L{s.layer}" if s.kind == "mlp" else key
        if s.dictionary is not None:
            for i in range(s.n_active):
                p, f = int(s.pos[i]), int(s.feat[i])
                if p <= max_pos:
                    refs.append(NodeRef(f"{prefix}/F{f}@{p}", "feature", key, p, s.act[i] * s.W_dec[f]))
        refs += [NodeRef(f"{prefix}/ERR@{p}", "error", key, p, s.error[p]) for p in range(max_pos + 1)]
    return refs


def _bias_vectors(rm: ReplacementModel, max_layer: int) -> dict[str, Tensor]:
    """Each dictionary site's ``b_dec`` (part of its constant at every position, in no node)."""
    out = {}
    for key, s in rm.sites.items():
        if s.dictionary is not None and s.layer <= max_layer:
            out[key] = s.dictionary.b_dec.detach().to(device=s.leaf.device, dtype=s.leaf.dtype)
    return out


def _contract(refs: list[NodeRef], grads: dict[str, Tensor], biases: dict[str, Tensor], pos: int) -> tuple[Tensor, Tensor]:
    """Per node, the gradient rows (one per seeded coordinate) dotted with its vector: ``[n, B]``; and the
    ``b_dec`` part ``[B]`` (summed over positions ``<= pos``)."""
    B = next(iter(grads.values())).shape[0] if grads else 0
    vals = torch.zeros(len(refs), B, dtype=torch.float64)
    by_site: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_site.setdefault(r.site, []).append(i)
    for site, idx in by_site.items():
        G = grads.get(site)
        if G is None:
            continue
        pos_t = torch.tensor([refs[i].pos for i in idx], device=G.device)
        vecs = torch.stack([refs[i].vec for i in idx]).to(G.dtype)
        vals[idx] = torch.einsum("bnd,nd->nb", G[:, pos_t].double(), vecs.double()).cpu()
    bias = torch.zeros(B, dtype=torch.float64)
    for site, b in biases.items():
        G = grads.get(site)
        if G is not None:
            bias += (G[:, : pos + 1].double().sum(1) @ b.double()).cpu()
    return vals, bias


# ============================================================================================ terms
@dataclass
class QKTerms:
    """The bilinear decomposition of one attention score. ``Q`` ``[n_q, d_head]`` / ``K`` ``[n_k, d_head]``
    are the query- / key-side node contributions (rows named by ``q_nodes`` / ``k_nodes``; ``"BIAS"`` is
    the last row of each), float64; ``pairs()[i, j] = scale * <Q_i, K_j>``."""

    layer: int
    head: int
    kv_head: int
    query_pos: int
    key_pos: int
    scale: float
    mask: float
    q_nodes: list[str]
    Q: Tensor
    k_nodes: list[str]
    K: Tensor
    score: float  # the real model's score
    pattern: float  # the real model's attention probability at (q, k)
    refs: dict[str, NodeRef] = field(default_factory=dict, repr=False)

    def pairs(self) -> Tensor:
        return self.scale * (self.Q @ self.K.t())

    @property
    def total(self) -> float:
        """Sum of all pair terms (+ the mask term): equals :attr:`score` up to rounding."""
        return float(self.pairs().sum()) + self.mask

    @property
    def exactness(self) -> float:
        return abs(self.total - self.score)

    def query_side(self) -> dict[str, float]:
        """Node -> its query-side contribution to the score (its row of pair terms summed)."""
        return dict(zip(self.q_nodes, self.pairs().sum(1).tolist(), strict=True))

    def key_side(self) -> dict[str, float]:
        """Node -> its key-side contribution to the score (its column of pair terms summed)."""
        return dict(zip(self.k_nodes, self.pairs().sum(0).tolist(), strict=True))

    def ablation_effect(self, node_id: str) -> float:
        """Predicted change of the score when ``node_id`` is removed (norms and earlier patterns frozen):
        ``-(row + column) + P[n, n]`` (exact: the score is bilinear in the nodes there)."""
        P = self.pairs()
        qi = self.q_nodes.index(node_id) if node_id in self.q_nodes else None
        kj = self.k_nodes.index(node_id) if node_id in self.k_nodes else None
        if qi is None and kj is None:
            raise DataError(f"node {node_id!r} has no term in the QK decomposition of layer {self.layer} head {self.head}")
        out = 0.0
        if qi is not None:
            out -= float(P[qi].sum())
        if kj is not None:
            out -= float(P[:, kj].sum())
        if qi is not None and kj is not None:
            out += float(P[qi, kj])
        return out

    def top_pairs(self, n: int = 10) -> list[tuple[str, str, float]]:
        P = self.pairs()
        flat = P.abs().flatten()
        idx = flat.topk(min(n, flat.numel())).indices
        nk = P.shape[1]
        return [(self.q_nodes[int(i) // nk], self.k_nodes[int(i) % nk], float(P.flatten()[i])) for i in idx]

    def to_json(self, n_pairs: int = 10, n_side: int = 5) -> dict:
        def top(d: dict[str, float]) -> list[dict]:
            return [{"node": k, "value": v} for k, v in sorted(d.items(), key=lambda kv: -abs(kv[1]))[:n_side]]

        return {"layer": self.layer, "head": self.head, "kv_head": self.kv_head, "query_pos": self.query_pos,
                "key_pos": self.key_pos, "score": self.score, "sum_of_terms": self.total, "mask": self.mask,
                "scale": self.scale, "pattern": self.pattern, "n_query_nodes": len(self.q_nodes),
                "n_key_nodes": len(self.k_nodes),
                "top_pairs": [{"query": a, "key": b, "value": v} for a, b, v in self.top_pairs(n_pairs)],
                "query_side": top(self.query_side()), "key_side": top(self.key_side())}


def _side(rm: ReplacementModel, layer: int, head: int, pos: int, which: str, kv: bool,
          dh: int) -> tuple[list[NodeRef], Tensor]:
    """Node contributions ``[n, dh]`` (plus a final BIAS row) to the query (``which="query"``) or key vector
    at ``pos``: one batched backward with one seed per coordinate, in the frozen replacement model."""
    leaves = rm.make_leaves(dh, requires_grad=True, up_to=layer)
    cap = _run_capture(rm, leaves, [layer], "replay", layer)
    t = getattr(cap.call(layer), which)
    h = head if not kv else cap.call(layer).kv_head(head)
    seed = torch.zeros_like(t)
    ar = torch.arange(dh)
    seed[ar, h, pos, ar] = 1.0
    keys = list(leaves)
    grads = torch.autograd.grad([t], [leaves[k] for k in keys], [seed], allow_unused=True)
    G = {k: g.detach() for k, g in zip(keys, grads, strict=True) if g is not None}
    refs = node_refs(rm, pos, layer)
    vals, bdec = _contract(refs, G, _bias_vectors(rm, layer), pos)
    # the constant part: the vector with every constant zeroed (the frozen model is affine), plus b_dec
    zero = {k: torch.zeros_like(v[:1]) for k, v in rm.make_leaves(1, up_to=layer).items()}
    with torch.no_grad():
        z = getattr(_run_capture(rm, zero, [layer], "replay", layer).call(layer), which)[0, h, pos]
    bias = z.double().cpu() + bdec
    keep = vals.abs().amax(1) > 0
    refs = [r for r, k in zip(refs, keep.tolist(), strict=True) if k]
    return refs, torch.cat([vals[keep], bias[None]])


def real_score(lm, input_ids: Tensor, layer: int, head: int, q: int, k: int) -> tuple[float, float]:
    """(score, attention probability) of the real model at (layer, head, q, k)."""
    cap = AttentionCapture(lm, [layer])
    with cap:
        lm.run(input_ids, stop_after=layer)
    row = cap.call(layer).scores(head, q)[0]
    return float(row[k]), float(torch.softmax(row, -1)[k])


def qk_terms(rm: ReplacementModel, layer: int, head: int, query_pos: int, key_pos: int) -> QKTerms:
    """The exact bilinear decomposition of the attention score of ``head`` at ``layer`` from ``query_pos``
    to ``key_pos`` into (query-side node, key-side node) pair terms (see the module docstring)."""
    lm = rm.lm
    if not 0 <= layer < lm.n_layers:
        raise ConfigError(f"layer {layer} is out of range 0..{lm.n_layers - 1}")
    if not (0 <= key_pos <= query_pos < rm.n_pos):
        raise ConfigError(f"positions q={query_pos}, k={key_pos}: expected 0 <= k <= q < {rm.n_pos}")
    with torch.no_grad():
        probe = _run_capture(rm, rm.make_leaves(1, up_to=layer), [layer], "replay", layer).call(layer)
    if not 0 <= head < probe.n_heads:
        raise ConfigError(f"head {head} is out of range 0..{probe.n_heads - 1} (layer {layer})")
    if probe.query.shape[2] != rm.n_pos:
        raise ModelError("the attention's query length differs from the prompt's; cannot attribute its scores")
    dh = int(probe.query.shape[-1])
    qrefs, Q = _side(rm, layer, head, query_pos, "query", False, dh)
    krefs, K = _side(rm, layer, head, key_pos, "key", True, dh)
    score, pattern = real_score(lm, rm.input_ids, layer, head, query_pos, key_pos)
    refs = {r.node_id: r for r in qrefs + krefs}
    return QKTerms(layer, head, probe.kv_head(head), query_pos, key_pos, probe.scale,
                   probe.mask_term(head, query_pos, key_pos), [r.node_id for r in qrefs] + ["BIAS"], Q,
                   [r.node_id for r in krefs] + ["BIAS"], K, score, pattern, refs)


# ============================================================================================ checks
def _ablated_scores(rm: ReplacementModel, terms: QKTerms, refs: list[NodeRef], mode: str | None) -> np.ndarray:
    """Score at (layer, head, q, k) with each node removed (copy 0: nothing removed); [n + 1]."""
    L = terms.layer
    leaves = rm.make_leaves(len(refs) + 1, up_to=L)
    for b, r in enumerate(refs, start=1):
        leaves[r.site][b, r.pos] -= r.vec
    with torch.no_grad():
        call = _run_capture(rm, leaves, [L], mode, L).call(L)
        return call.scores(terms.head, terms.query_pos)[:, terms.key_pos].cpu().numpy()


def _real_ablated_scores(rm: ReplacementModel, terms: QKTerms, refs: list[NodeRef]) -> np.ndarray:
    """The same in the real model (every MLP live): the node's vector is subtracted from its site's output."""
    from ..model.hookpoints import Hookpoint

    lm, L = rm.lm, terms.layer
    B = len(refs) + 1
    by_hp: dict = {}
    for b, r in enumerate(refs, start=1):
        hp = Hookpoint("resid_pre", 0) if r.site == "emb" else rm.sites[r.site].hookpoint
        by_hp.setdefault(hp, []).append((b, r))

    def edit(items):
        def fn(x):
            x = x.clone()
            for b, r in items:
                x[b, r.pos] -= r.vec.to(x.dtype)
            return x
        return fn

    cap = AttentionCapture(lm, [L])
    with cap:
        lm.run(rm.input_ids.expand(B, -1), edit={hp: edit(it) for hp, it in by_hp.items()}, stop_after=L)
    return cap.call(L).scores(terms.head, terms.query_pos)[:, terms.key_pos].cpu().numpy()


def check_qk(rm: ReplacementModel, terms: QKTerms, nodes: Sequence[str] | None = None, k: int = 3, *,
             real: bool = True) -> list[dict]:
    """Ablate key-side nodes and compare the score's change with :meth:`QKTerms.ablation_effect`.

    ``nodes``: node ids to ablate (default: the ``k`` feature nodes with the largest key-side
    contribution). Each is removed at its position (its constant subtracted) and the score re-measured
    ``frozen`` (replacement model, earlier attention patterns and norm scales replayed: the prediction is
    exact there), ``live`` (attention and norms recomputed, MLP outputs held, as the edge checks do) and,
    with ``real``, in the real model (every MLP recomputed). Returns one row per node."""
    if nodes is None:
        ks = terms.key_side()
        feats = [n for n in ks if n in terms.refs and terms.refs[n].kind == "feature"]
        nodes = sorted(feats, key=lambda n: -abs(ks[n]))[:k]
    refs = []
    for n in nodes:
        if n not in terms.refs:
            raise DataError(f"node {n!r} is not a node of this QK decomposition")
        refs.append(terms.refs[n])
    if not refs:
        return []
    frozen = _ablated_scores(rm, terms, refs, "replay")
    live = _ablated_scores(rm, terms, refs, None)
    rl = _real_ablated_scores(rm, terms, refs) if real else None
    ks = terms.key_side()
    rows = []
    for b, r in enumerate(refs, start=1):
        pred = terms.ablation_effect(r.node_id)
        row = {"node": r.node_id, "key_side": ks.get(r.node_id, 0.0), "predicted": pred,
               "frozen": float(frozen[b] - frozen[0]), "live": float(live[b] - live[0])}
        row["rel_err_frozen"] = abs(row["frozen"] - pred) / max(abs(pred), 1e-30)
        if rl is not None:
            row["real"] = float(rl[b] - rl[0])
        rows.append(row)
    return rows
