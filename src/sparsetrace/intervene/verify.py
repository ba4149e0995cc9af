"""Causal verification of a feature circuit (the ``verify.json`` of docs/formats.md).

With ``m(.)`` the task metric and the given dictionaries spliced in as interventions (errors kept):

- ``m_full``  = m(M): the real model (no feature changed);
- ``m_empty`` = m(empty): every feature of every given dictionary ablated;
- ``m_circuit`` = m(C): every feature ablated except the circuit's nodes;
- ``faithfulness`` f(C) = (m(C) - m(empty)) / (m(M) - m(empty))   (1 for C = everything, 0 for C = {});
- ``completeness`` = f(M \\ C) = (m(M \\ C) - m(empty)) / (m(M) - m(empty)), with only C ablated: how
  much of the task the model still does without the circuit (near 0 for a circuit that carries all of
  it, near 1 for one the model does not need);
- ``ablation_drop`` = 1 - m(M \\ C) / m(M);
- ``specificity``: the relative change of an unrelated task's metric when C (at every position) is ablated
  (mean-ablated when ``mode="patch"``: the unrelated task has no corrupted counterpart of C);
- ``curve``: f(C_k) for prefixes of the circuit in the order given, ``curve_auc`` its area with size
  normalised to [0, 1];
- ``spearman``: rank correlation between given attribution scores and the measured single-feature
  ablation effects ``m(M) - m(M \\ {node})`` of the top-scored nodes;
- ``edge_checks``: for given feature->feature edges, the predicted weight and the measured change of the
  target's activation when the source is zero-ablated.

Ablation ``mode``: ``"mean"`` (default; means over the task's clean prompts unless ``means`` is given),
``"zero"``, or ``"patch"`` (activations from the task's corrupted prompts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataError
from .core import (
    Dictionaries,
    LayerIntervention,
    as_layer_map,
    feature_acts,
    feature_means,
    run_with_interventions,
)
from .features import FeatureNode, FeatureSet, is_feature_node, parse_node_id
from .ops import MODES, ablation_interventions

MetricFn = Callable[[Tensor, object], float]


# ---------------------------------------------------------------------------------------------- helpers


def _ranks(x: Sequence[float]) -> list[float]:
    """Ranks (1-based) with ties averaged."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = r
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (None for fewer than 3 pairs or a constant side)."""
    if len(a) != len(b):
        raise DataError(f"spearman needs two sequences of the same length, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return None
    ra, rb = _ranks(list(a)), _ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: float, den: float) -> float | None:
    if abs(den) < 1e-9:
        return None
    return _finite(num / den)


def _trapezoid(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if len(pts) < 2:
        return None
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def _scores_list(scores) -> list[tuple[FeatureNode, float]]:
    """[(node, score)] from {node_id: score}, [(node_id, score)] or graph-style [{"node_id", "influence"}]."""
    if scores is None:
        return []
    if isinstance(scores, Mapping):
        items = list(scores.items())
    else:
        items = []
        for s in scores:
            if isinstance(s, Mapping):
                key = s.get("node_id", s.get("node"))
                val = s.get("score", s.get("influence", s.get("attribution")))
                items.append((key, val))
            else:
                items.append(tuple(s))
    out = []
    for key, val in items:
        if isinstance(key, FeatureNode):
            node = key
        elif isinstance(key, str) and is_feature_node(key):
            node = parse_node_id(key)
        elif isinstance(key, str):
            continue  # embeddings / errors / logits have no single-feature ablation
        else:
            raise DataError(f"cannot read attribution score entry {key!r}")
        if val is None:
            raise DataError(f"attribution score for '{node}' is missing")
        out.append((node, float(val)))
    return out


class _Evaluator:
    """Runs the task batch under ablations of feature sets, caching means / corrupted activations."""

    def __init__(self, lm, dmap, batch, metric: MetricFn, mode: str, means, *, batch_size: int = 32):
        if mode not in MODES:
            raise DataError(f"ablation mode '{mode}' is unknown; expected one of {', '.join(MODES)}")
        self.lm, self.dmap, self.batch, self.metric, self.mode = lm, dmap, batch, metric, mode
        self.batch_size = batch_size
        self.ids = batch.clean.to(lm.device)
        self.last_pos = batch.last_pos.to(lm.device)
        self.means = None
        self.corrupted_acts = None
        if mode == "mean":
            self.means = means if means is not None else feature_means(lm, dmap, self.ids, mask=batch.mask)
        elif mode == "patch":
            self.corrupted_acts = feature_acts(lm, dmap, batch.corrupted.to(lm.device))

    def logits(self, features: FeatureSet, invert: bool) -> Tensor:
        out = []
        for start in range(0, self.ids.shape[0], self.batch_size):
            sl = slice(start, start + self.batch_size)
            ids = self.ids[sl]
            cacts = None
            if self.corrupted_acts is not None:
                cacts = {k: v[sl] for k, v in self.corrupted_acts.items()}
            ivs = ablation_interventions(
                self.lm,
                self.dmap,
                ids,
                features,
                self.mode,
                means=self.means,
                invert=invert,
                last_pos=self.last_pos[sl],
                corrupted_acts=cacts,
            )
            out.append(run_with_interventions(self.lm, self.dmap, ids, ivs).logits)
        return torch.cat(out, 0)

    def m(self, features: FeatureSet, *, invert: bool) -> float:
        return float(self.metric(self.logits(features, invert), self.batch))


def _resolve_task_batch(lm, task, n: int, seed: int):
    from ..tasks import TaskBatch, get_task

    if isinstance(task, TaskBatch):
        return task
    t = get_task(task) if isinstance(task, str) else task
    return t.prompts(lm, n, seed)


def _metric_of(batch, metric: MetricFn | None) -> MetricFn:
    if metric is not None:
        return metric
    task = getattr(batch, "task_obj", None)
    if task is None:
        raise DataError("no metric given and the task batch has no task attached")
    return task.metric


# ---------------------------------------------------------------------------------------------- verify


def verify_circuit(
    lm,
    dictionaries: Dictionaries,
    task_batch,
    metric: MetricFn | None,
    circuit_nodes,
    *,
    unrelated_task=None,
    mode: str = "mean",
    means: Mapping[int, Tensor] | None = None,
    scores=None,
    edges: Iterable | None = None,
    curve_points: int = 21,
    max_spearman_nodes: int = 50,
    max_edge_checks: int = 20,
    unrelated_n: int | None = None,
    seed: int = 0,
    task_name: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Faithfulness, completeness, ablation drop, specificity, curve and Spearman check of a circuit.

    ``task_batch``: a :class:`~sparsetrace.tasks.TaskBatch` (clean prompts; corrupted ones for
    ``mode="patch"``). ``metric(logits, batch) -> float``; None uses the batch's task metric.
    ``circuit_nodes``: feature node ids in order of importance (non-feature graph nodes are skipped).
    ``unrelated_task``: a task name, Task or TaskBatch for the specificity check (None: no check).
    ``means``: {layer: [n_features]} mean activations (e.g. over a corpus) for ``mode="mean"``.
    ``scores``: attribution scores of candidate nodes ({node_id: score}, pairs, or graph nodes with
    "influence") for the Spearman check. ``edges``: graph links ({"source", "target", "weight"}).
    Returns the verify.json dict.
    """
    dmap = as_layer_map(dictionaries)
    if not dmap:
        raise DataError("verify_circuit needs at least one dictionary")
    metric = _metric_of(task_batch, metric)
    circuit = FeatureSet.parse(circuit_nodes, skip_non_features=True)
    for layer in circuit.layers:
        if layer not in dmap:
            raise DataError(f"circuit has nodes on layer {layer}; dictionaries are for layers {sorted(dmap)}")
    ev = _Evaluator(lm, dmap, task_batch, metric, mode, means, batch_size=batch_size)
    empty = FeatureSet()

    m_full = float(metric(lm.run(ev.ids).logits, task_batch))
    m_empty = ev.m(empty, invert=True)
    m_circuit = ev.m(circuit, invert=True)
    m_without = ev.m(circuit, invert=False) if len(circuit) else m_full
    den = m_full - m_empty

    # faithfulness curve over prefixes of the circuit
    size = len(circuit)
    k_points = max(2, int(curve_points))
    sizes = sorted({round(i * size / (k_points - 1)) for i in range(k_points)}) if size else [0]
    curve = []
    for k in sizes:
        if k == 0:
            f = 0.0 if abs(den) >= 1e-9 else None
        elif k == size:
            f = _ratio(m_circuit - m_empty, den)
        else:
            f = _ratio(ev.m(circuit.prefix(k), invert=True) - m_empty, den)
        curve.append({"size": int(k), "faithfulness": f})
    auc = _trapezoid([c["size"] / size for c in curve], [c["faithfulness"] for c in curve]) if size else None

    # attribution scores vs single-feature ablation effects
    sp = None
    single = []
    items = _scores_list(scores)
    if items:
        for node, _ in items:
            if node.layer not in dmap:
                raise DataError(f"scored node '{node}' is on layer {node.layer}; no dictionary there")
        items = sorted(items, key=lambda t: -abs(t[1]))[: max(0, int(max_spearman_nodes))]
        for node, score in items:
            effect = m_full - ev.m(FeatureSet([node]), invert=False)
            single.append({"node": node.node_id, "score": score, "effect": effect})
        sp = _finite(spearman([s["score"] for s in single], [s["effect"] for s in single]))

    # specificity on an unrelated task
    specificity = None
    if unrelated_task is not None:
        ub = _resolve_task_batch(lm, unrelated_task, unrelated_n or len(task_batch), seed)
        umetric = _metric_of(ub, None)
        # patching needs the task's own corrupted prompts; on an unrelated task "ablate C" means its mean
        umode = "mean" if mode == "patch" else mode
        u_means = means if (mode == "mean" and means is not None) else None
        uev = _Evaluator(lm, dmap, ub, umetric, umode, u_means, batch_size=batch_size)
        base = float(umetric(lm.run(ub.clean.to(lm.device)).logits, ub))
        ablated = uev.m(circuit.without_positions(), invert=False) if len(circuit) else base
        specificity = {
            "task": ub.task,
            "baseline": base,
            "ablated": ablated,
            "rel_change": _ratio(ablated - base, abs(base)),
            "mode": umode,
        }

    # layer importance, measured: ablate only the circuit's features of one layer at a time
    by_layer = []
    if len(circuit) and abs(m_full) > 1e-9:
        for layer in sorted(circuit.layers):
            part = FeatureSet([n for n in circuit.nodes if n.layer == layer])
            m_l = ev.m(part, invert=False)
            d = dmap[layer]
            by_layer.append({"layer": int(layer), "component": _component(d), "n_features": len(part),
                             "m_without": m_l, "drop": _ratio(m_full - m_l, m_full)})
        by_layer.sort(key=lambda r: -abs(r["drop"] or 0.0))

    checks = edge_checks(lm, dmap, task_batch, edges, max_checks=max_edge_checks) if edges else []

    return {
        "task": task_name or getattr(task_batch, "task", "custom"),
        "circuit": circuit.node_ids(),
        "metric_name": getattr(task_batch, "metric_name", getattr(metric, "__name__", "metric")),
        "m_full": m_full,
        "m_empty": m_empty,
        "m_circuit": m_circuit,
        "faithfulness": _ratio(m_circuit - m_empty, den),
        "completeness": _ratio(m_without - m_empty, den),
        "specificity": specificity,
        "ablation_drop": _ratio(m_full - m_without, m_full),
        "curve": curve,
        "curve_auc": _finite(auc),
        "spearman": sp,
        "edge_checks": checks,
        "mode": mode,
        "n_prompts": len(task_batch),
        "m_without_circuit": m_without,
        "single_feature_effects": single,
        "layer_importance": by_layer,
    }


def _component(d) -> str:
    """What a dictionary's features stand for: the MLP (transcoders) or a residual/attention hookpoint."""
    cfg = getattr(d, "cfg", None)
    if cfg is None:
        return "?"
    if cfg.kind in ("transcoder", "skip_transcoder"):
        return "mlp"
    return str(cfg.hookpoint_in)


def edge_checks(lm, dictionaries: Dictionaries, task_batch, edges, *, max_checks: int = 20) -> list[dict]:
    """For feature->feature edges (source upstream of target): ``predicted`` = the edge weight,
    ``measured`` = mean over prompts of the target's activation minus its activation with the source
    zero-ablated (at the target's position; over all real tokens when the target has no position)."""
    dmap = as_layer_map(dictionaries)
    ids = task_batch.clean.to(lm.device) if hasattr(task_batch, "clean") else task_batch
    last_pos = getattr(task_batch, "last_pos", None)
    mask = task_batch.mask if hasattr(task_batch, "mask") else torch.ones(ids.shape, dtype=torch.bool)
    out = []
    for e in edges or []:
        if len(out) >= max_checks:
            break
        if isinstance(e, Mapping):
            src, tgt, w = e.get("source"), e.get("target"), e.get("weight")
        else:
            src, tgt, w = e
        if not (is_feature_node(str(src)) and is_feature_node(str(tgt))):
            continue
        s, t = parse_node_id(str(src)), parse_node_id(str(tgt))
        if s.layer >= t.layer or s.layer not in dmap or t.layer not in dmap:
            continue
        b, n = ids.shape
        ds, dt = dmap[s.layer], dmap[t.layer]
        iv = {
            s.layer: LayerIntervention(
                mask=FeatureSet([s]).mask(s.layer, b, n, ds.n_features, last_pos=last_pos), values=0.0
            )
        }
        clean = run_with_interventions(lm, dmap, ids, {}, record=[t.layer], stop_after=t.layer).acts[t.layer]
        abl = run_with_interventions(lm, dmap, ids, iv, record=[t.layer], stop_after=t.layer).acts[t.layer]
        sel = FeatureSet([FeatureNode(t.layer, t.feature, t.position)]).mask(
            t.layer, b, n, dt.n_features, last_pos=last_pos
        )[:, :, t.feature] & mask.to(ids.device)
        diff = (clean - abl)[:, :, t.feature][sel]
        out.append(
            {
                "source": s.node_id,
                "target": t.node_id,
                "predicted": None if w is None else float(w),
                "measured": float(diff.mean()) if diff.numel() else None,
            }
        )
    return out


def circuit_from_graph(
    graph: Mapping | str,
    *,
    top_k: int | None = None,
    min_abs_influence: float = 0.0,
) -> tuple[list[str], dict[str, float]]:
    """Feature node ids of an attribution graph (``graph.json`` dict or path), most influential first,
    and their influence scores (for ``verify_circuit(..., circuit_nodes, scores=...)``)."""
    if isinstance(graph, (str, Path)):
        try:
            graph = json.loads(Path(graph).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read attribution graph '{graph}': {e}") from e
    nodes = graph.get("nodes") if isinstance(graph, Mapping) else None
    if not isinstance(nodes, list):
        raise DataError("attribution graph has no 'nodes' list")
    feats = []
    for n in nodes:
        if not isinstance(n, Mapping):
            continue
        nid = n.get("node_id")
        if n.get("kind", "feature") != "feature" or not isinstance(nid, str) or not is_feature_node(nid):
            continue
        infl = n.get("influence")
        infl = float(infl) if isinstance(infl, (int, float)) else 0.0
        if abs(infl) >= min_abs_influence:
            feats.append((nid, infl))
    feats.sort(key=lambda t: -abs(t[1]))
    if top_k is not None:
        feats = feats[: max(0, int(top_k))]
    return [f for f, _ in feats], dict(feats)


def write_verify_json(result: Mapping, path: str | Path) -> Path:
    """Write a :func:`verify_circuit` result as strict JSON (NaN/inf become null), atomically."""
    from ..dictionary.io import atomic_write_text

    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    atomic_write_text(path, json.dumps(clean(dict(result)), indent=1, allow_nan=False) + "\n")
    return path
