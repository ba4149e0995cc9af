"""Which layers carry a verified circuit's behaviour, and which to fine-tune.

>>> imp = layer_importance(verify, graph)                       # from the JSON artifacts alone
>>> abl = measure_layer_ablation(lm, dictionaries, graph, verify)  # optional: real per-layer ablations
>>> imp = layer_importance(verify, graph, ablation=abl)
>>> imp["train_these_layers"]                                   # e.g. [6, 3, 9]

Per layer, three components are measured on the circuit (``verify["circuit"]`` node ids; the whole
graph when absent):

- **mlp**: summed |influence| of the circuit's feature nodes at that layer (transcoder features stand
  in for the MLP);
- **error**: summed |influence| of the circuit's error nodes (what the dictionary misses at that MLP);
- **attn**: attention is not a node in a transcoder graph, but every circuit edge between *different*
  positions must cross at least one attention layer between its source and its target. Each such
  edge's |weight| is spread evenly over those layers (source layer + 1 .. target layer; embeddings
  count as layer -1, logits as ``n_layers``).

Node influence and edge weight are normalised separately into shares; a layer's ``influence_score`` is
``(1 - a) * node_share + a * attn_share`` with ``a`` the fraction of circuit edge weight that crosses
positions. When per-layer ablation drops are given (``measure_layer_ablation``: the circuit's features
of one layer are removed inside the real model, ``out -= act * W_dec[f]`` at their positions, and the
metric drop is measured), the final score is the mean of the influence score and the ablation share.
``train_these_layers`` lists layers by score until ``cover`` of the total is reached.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import DataError
from ..model.hookpoints import Hookpoint

_NODE_RE = re.compile(r"^(?:E|L(?P<layer>\d+)/(?:F(?P<feature>\d+)|ERR)|LOGIT/(?P<tok>\d+))@(?P<pos>\d+)$")


def _node_index(graph: dict) -> dict[str, dict]:
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise DataError("graph has no 'nodes' list; expected sparsetrace-graph/1 JSON")
    return {n["node_id"]: n for n in nodes if isinstance(n, dict) and "node_id" in n}


def _layer_of(node: dict, n_layers: int) -> int:
    kind = node.get("kind")
    if kind == "embedding":
        return -1
    if kind == "logit":
        return n_layers
    return int(node.get("layer", 0))


def layer_importance(
    verify: dict | None,
    graph: dict,
    *,
    ablation: dict[int, float] | None = None,
    cover: float = 0.8,
) -> dict:
    """Per-layer shares of a circuit's influence (+ optional ablation drops) and a ranked layer list."""
    index = _node_index(graph)
    meta = graph.get("metadata") or {}
    layers_seen = [int(n.get("layer", 0)) for n in index.values() if n.get("kind") in ("feature", "error")]
    n_layers = int(meta.get("n_layers") or (max(layers_seen) + 1 if layers_seen else 0))
    if n_layers <= 0:
        raise DataError("graph metadata has no n_layers and no feature/error nodes")
    circuit = list((verify or {}).get("circuit") or [])
    in_circuit = set(circuit) if circuit else set(index)
    missing = [c for c in in_circuit if c not in index]
    mlp = [0.0] * n_layers
    err = [0.0] * n_layers
    n_feat = [0] * n_layers
    for nid in in_circuit:
        node = index.get(nid)
        if node is None:
            continue
        kind = node.get("kind")
        if kind not in ("feature", "error"):
            continue
        layer = int(node.get("layer", 0))
        if not (0 <= layer < n_layers):
            continue
        infl = abs(float(node.get("influence") or 0.0))
        if kind == "feature":
            mlp[layer] += infl
            n_feat[layer] += 1
        else:
            err[layer] += infl
    attn = [0.0] * n_layers
    total_edge = cross_edge = 0.0
    for link in graph.get("links") or []:
        s, t = link.get("source"), link.get("target")
        if s not in in_circuit or t not in in_circuit or s not in index or t not in index:
            continue
        w = abs(float(link.get("weight") or 0.0))
        total_edge += w
        ns, nt = index[s], index[t]
        if int(ns.get("position", 0)) == int(nt.get("position", 0)):
            continue
        ls, lt = _layer_of(ns, n_layers), _layer_of(nt, n_layers)
        span = [layer for layer in range(ls + 1, min(lt, n_layers - 1) + 1) if 0 <= layer < n_layers]
        if not span:
            continue
        cross_edge += w
        for layer in span:
            attn[layer] += w / len(span)
    node_total = sum(mlp) + sum(err)
    attn_total = sum(attn)
    a = cross_edge / total_edge if total_edge > 0 else 0.0
    abl_pos = {k: max(float(v), 0.0) for k, v in (ablation or {}).items()}
    abl_total = sum(abl_pos.values())
    rows = []
    for layer in range(n_layers):
        node_share = (mlp[layer] + err[layer]) / node_total if node_total > 0 else 0.0
        attn_share = attn[layer] / attn_total if attn_total > 0 else 0.0
        infl_score = (1 - a) * node_share + a * attn_share
        row = {
            "layer": layer,
            "n_features": n_feat[layer],
            "mlp_share": mlp[layer] / node_total if node_total > 0 else 0.0,
            "error_share": err[layer] / node_total if node_total > 0 else 0.0,
            "attn_share": attn_share,
            "influence_score": infl_score,
        }
        if ablation is not None:
            row["ablation_drop"] = float(ablation.get(layer, 0.0))
            row["ablation_share"] = abl_pos.get(layer, 0.0) / abl_total if abl_total > 0 else 0.0
            row["score"] = 0.5 * infl_score + 0.5 * row["ablation_share"]
        else:
            row["score"] = infl_score
        rows.append(row)
    ranked, cum = [], 0.0
    total_score = sum(r["score"] for r in rows)
    for r in sorted(rows, key=lambda r: (-r["score"], r["layer"])):
        if r["score"] <= 0:
            break
        cum += r["score"] / total_score
        comps = []
        parts = {
            "mlp": (1 - a) * r["mlp_share"],
            "error": (1 - a) * r["error_share"],
            "attn": a * r["attn_share"],
        }
        tot = sum(parts.values())
        for name, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            if tot > 0 and v / tot >= 0.25:
                comps.append(name)
        ranked.append({"layer": r["layer"], "score": r["score"], "cumulative": cum, "components": comps})
    train, acc = [], 0.0
    for r in ranked:
        train.append(r["layer"])
        acc = r["cumulative"]
        if acc >= cover:
            break
    return {
        "task": (verify or {}).get("task"),
        "n_layers": n_layers,
        "circuit_size": len(in_circuit),
        "missing_nodes": len(missing),
        "attention_fraction": a,
        "error_fraction": sum(err) / node_total if node_total > 0 else 0.0,
        "layers": rows,
        "ranked": ranked,
        "train_these_layers": train,
        "cover": cover,
        "has_ablation": ablation is not None,
    }


def default_metric(graph: dict) -> Callable[[Tensor], float]:
    """Logit difference of the first two targets at the last position (log-prob of the first when
    there is only one)."""
    targets = (graph.get("metadata") or {}).get("targets") or []
    ids = [int(t["token_id"]) for t in targets if isinstance(t, dict) and "token_id" in t]
    if not ids:
        raise DataError("graph metadata has no targets with token_id; pass a metric")
    if len(ids) >= 2:
        a, b = ids[0], ids[1]
        return lambda logits: float(logits[-1, a] - logits[-1, b])
    a = ids[0]
    return lambda logits: float(torch.log_softmax(logits[-1].float(), -1)[a])


@torch.no_grad()
def measure_layer_ablation(
    lm,
    dictionaries: dict[int, object],
    graph: dict,
    verify: dict | None = None,
    *,
    metric: Callable[[Tensor], float] | None = None,
    input_ids: Tensor | None = None,
) -> dict[int, float]:
    """Metric drop when the circuit's features of one layer are removed in the real model.

    For each layer with circuit feature nodes, ``act * W_dec[f]`` is subtracted from the dictionary's
    output hookpoint at each node's position (the rest of the model runs normally). Returns
    {layer: metric_clean - metric_ablated}.
    """
    index = _node_index(graph)
    meta = graph.get("metadata") or {}
    if input_ids is None:
        prompt = meta.get("prompt")
        if not prompt:
            raise DataError("graph metadata has no prompt; pass input_ids")
        input_ids = lm.tokenize(prompt)
    metric = metric or default_metric(graph)
    circuit = list((verify or {}).get("circuit") or []) or list(index)
    by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for nid in circuit:
        node = index.get(nid)
        if node is None or node.get("kind") != "feature" or node.get("feature") is None:
            continue
        by_layer.setdefault(int(node["layer"]), []).append(
            (int(node["position"]), int(node["feature"]), float(node.get("activation") or 0.0))
        )
    clean = lm.run(input_ids).logits[0]
    m_clean = metric(clean)
    out: dict[int, float] = {}
    for layer, items in sorted(by_layer.items()):
        d = dictionaries.get(layer)
        if d is None:
            continue
        hp = Hookpoint(d.cfg.hookpoint_out, layer)
        W = d.W_dec.detach()
        pos = torch.tensor([p for p, _, _ in items])
        feats = torch.tensor([f for _, f, _ in items])
        acts = torch.tensor([a for _, _, a in items])

        def edit(x: Tensor, pos=pos, feats=feats, acts=acts, W=W) -> Tensor:
            x = x.clone()
            x[0].index_add_(0, pos.to(x.device), -(acts.unsqueeze(1) * W[feats]).to(x.device, x.dtype))
            return x

        ablated = lm.run(input_ids, edit={hp: edit}).logits[0]
        out[layer] = m_clean - metric(ablated)
    return out
