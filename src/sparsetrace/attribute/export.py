"""Convert attribution graphs between our ``sparsetrace-graph/1`` JSON and circuit-tracer / Neuronpedia
graph JSON.

The Neuronpedia side follows circuit-tracer 0.5's writer (``circuit_tracer.frontend.graph_models``
and ``circuit_tracer.utils.create_graph_files``), field for field:

- feature:   node_id ``{layer}_{feature}_{pos}``, feature ``cantor(layer, feature)``, layer ``"{layer}"``,
  feature_type ``cross layer transcoder``, jsNodeId ``{layer}_{feature}-0``
- error:     node_id ``0_{layer}_{pos}``, feature -1, layer ``"{layer}"``,
  feature_type ``mlp reconstruction error``, jsNodeId ``{layer}_{pos}-0``
- embedding: node_id ``E_{token_id}_{pos}``, feature ``pos``, layer ``"E"``, feature_type ``embedding``,
  jsNodeId ``E_{token_id}-{pos}``
- logit:     node_id ``{n_layers+1}_{token_id}_{pos}``, feature ``token_id``, layer ``"{n_layers+1}"``,
  feature_type ``logit``, jsNodeId ``L_{token_id}-{pos}``

Every node also carries ``ctx_idx`` (= position), ``token_prob`` and ``is_target_logit`` (logits;
the first target is the target logit), ``run_idx`` 0, ``reverse_ctx_idx`` 0 (as circuit-tracer
writes them), ``clerp`` (our label; ``Output "tok" (p=0.123)`` for logits), ``influence`` and
``activation``. Links are ``{"source", "target", "weight"}`` with the same direction as ours.
``metadata`` holds ``slug``, ``scan`` (the model id, as Neuronpedia uses it), ``transcoder_list``,
``prompt_tokens``, ``prompt``, ``node_threshold`` and ``schema_version``; what Neuronpedia has no
field for (targets, scores, edge threshold, hookpoints, ...) goes under ``metadata["sparsetrace"]``
so ``from_neuronpedia(to_neuronpedia(g))`` gives ``g`` back (pass ``extras=False`` to leave it out).
A graph's optional ``supernodes`` (``[{"name", "members": [node_id, ...]}]``, made in the report's viewer)
become ``qParams.supernodes``, Neuronpedia's ``[name, np_node_id, ...]`` lists, and come back.

Embedding node ids need the prompt's token ids: taken from an embedding node's ``token_id`` or
``metadata["prompt_token_ids"]``; when neither is present ``-1`` is written.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

from ..errors import SparsetraceError
from .graph_types import GRAPH_FORMAT

FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "embedding": "embedding",
    "logit": "logit",
}
_OUR_ID = re.compile(r"^(?:E@(?P<epos>\d+)|L(?P<layer>-?\d+)/(?:F(?P<feat>\d+)|(?P<err>ERR))@(?P<pos>\d+)"
                     r"|LOGIT/(?P<tok>-?\d+)@(?P<lpos>\d+))$")
_LOGIT_CLERP = re.compile(r'^Output "(?P<tok>.*)" \(p=(?P<p>[-+0-9.eE]+|nan|inf)\)$', re.S)


class GraphFormatError(SparsetraceError):
    """A graph JSON is not in the expected format."""


def cantor(x: int, y: int) -> int:
    """Cantor pairing (circuit-tracer's ``feature`` for a (layer, feature) pair)."""
    return (x + y) * (x + y + 1) // 2 + y


def uncantor(z: int) -> tuple[int, int]:
    w = (math.isqrt(8 * z + 1) - 1) // 2
    y = z - w * (w + 1) // 2
    return w - y, y


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].strip("-")
    return s or "sparsetrace-graph"


def _float(v):
    return None if v is None else float(v)


# ------------------------------------------------------------------------------------ ours -> NP
def to_neuronpedia(graph: dict, *, slug: str | None = None, scan: str | None = None, extras: bool = True) -> dict:
    """Our ``sparsetrace-graph/1`` dict -> circuit-tracer / Neuronpedia graph JSON (a dict)."""
    if not isinstance(graph, dict) or not str(graph.get("format", "")).startswith("sparsetrace-graph/"):
        raise GraphFormatError(f"not a sparsetrace graph (format={graph.get('format') if isinstance(graph, dict) else None!r}); "
                               f"expected '{GRAPH_FORMAT}'")
    meta = graph.get("metadata") or {}
    nodes = graph.get("nodes") or []
    prompt_tokens = [str(t) for t in meta.get("prompt_tokens") or []]
    n_layers = meta.get("n_layers")
    if n_layers is None:
        layers = [n["layer"] for n in nodes if n.get("kind") == "logit"]
        layers = layers or [n["layer"] + 1 for n in nodes if n.get("kind") in ("feature", "error")]
        n_layers = max(layers, default=0)
    n_layers = int(n_layers)
    targets = meta.get("targets") or []
    probs = {int(t["token_id"]): float(t.get("prob", 0.0)) for t in targets if "token_id" in t}
    first_target = int(targets[0]["token_id"]) if targets and "token_id" in targets[0] else None
    token_ids = meta.get("prompt_token_ids")

    out_nodes, id_map, hookpoints = [], {}, {}
    for n in nodes:
        kind, pos = n.get("kind"), int(n.get("position", 0))
        if kind not in FEATURE_TYPES:
            raise GraphFormatError(f"node {n.get('node_id')!r} has kind {kind!r}; expected one of {', '.join(FEATURE_TYPES)}")
        base = {"ctx_idx": pos, "feature_type": FEATURE_TYPES[kind], "token_prob": 0.0, "is_target_logit": False,
                "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "", "influence": _float(n.get("influence")),
                "activation": None}
        if kind == "feature":
            layer, f = int(n["layer"]), int(n["feature"])
            node = {"node_id": f"{layer}_{f}_{pos}", "feature": cantor(layer, f), "layer": str(layer),
                    "jsNodeId": f"{layer}_{f}-0", "activation": _float(n.get("activation"))}
            base["clerp"] = n.get("label") or ""
            if n.get("hookpoint"):
                hookpoints[str(layer)] = n["hookpoint"]
        elif kind == "error":
            layer = int(n["layer"])
            node = {"node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer), "jsNodeId": f"{layer}_{pos}-0"}
            base["clerp"] = n.get("label") or ""
            if n.get("hookpoint"):
                hookpoints.setdefault(str(layer), n["hookpoint"])
        elif kind == "embedding":
            tid = n.get("token_id")
            if tid is None and token_ids is not None and pos < len(token_ids):
                tid = token_ids[pos]
            tid = -1 if tid is None else int(tid)
            node = {"node_id": f"E_{tid}_{pos}", "feature": pos, "layer": "E", "jsNodeId": f"E_{tid}-{pos}"}
        else:  # logit
            tid = n.get("token_id")
            if tid is None:
                m = _OUR_ID.match(str(n.get("node_id", "")))
                if not m or m.group("tok") is None:
                    raise GraphFormatError(f"logit node {n.get('node_id')!r} has no token id; expected LOGIT/<id>@<pos>")
                tid = m.group("tok")
            tid = int(tid)
            layer = str(n_layers + 1)
            prob = float(n.get("prob", probs.get(tid, 0.0)))
            node = {"node_id": f"{layer}_{tid}_{pos}", "feature": tid, "layer": layer, "jsNodeId": f"L_{tid}-{pos}"}
            base.update(token_prob=prob, is_target_logit=tid == first_target,
                        clerp=f'Output "{n.get("token", "")}" (p={prob:.3f})')
        base.update(node)
        if base["node_id"] in id_map.values():
            raise GraphFormatError(f"two nodes map to Neuronpedia id {base['node_id']!r}")
        id_map[n["node_id"]] = base["node_id"]
        out_nodes.append({k: base[k] for k in _NODE_FIELDS})

    links = []
    for e in graph.get("links") or []:
        try:
            links.append({"source": id_map[e["source"]], "target": id_map[e["target"]], "weight": float(e["weight"])})
        except KeyError as k:
            raise GraphFormatError(f"link {e.get('source')!r} -> {e.get('target')!r} names unknown node {k}") from None

    out_meta = {
        "slug": slug or meta.get("slug") or _slug(meta.get("prompt", "")),
        "scan": scan or meta.get("scan") or meta.get("model") or "",
        "transcoder_list": list(meta.get("transcoder_list") or []),
        "prompt_tokens": prompt_tokens,
        "prompt": meta.get("prompt", ""),
        "node_threshold": _float(meta.get("node_threshold")),
        "schema_version": 1,
    }
    if extras:
        keep = {k: v for k, v in meta.items() if k not in ("prompt", "prompt_tokens", "node_threshold")}
        keep["format"] = graph.get("format", GRAPH_FORMAT)
        keep["n_layers"] = n_layers
        if hookpoints:
            keep["hookpoints"] = hookpoints
        out_meta["sparsetrace"] = keep
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    qparams.update(meta.get("qParams") or {})
    if graph.get("supernodes"):
        qparams["supernodes"] = _supernodes_out(graph["supernodes"], id_map)
    return {"metadata": out_meta, "qParams": qparams, "nodes": out_nodes, "links": links}


def _supernodes_out(groups, id_map: dict[str, str]) -> list[list[str]]:
    """Our ``supernodes`` ([{name, members}]) -> Neuronpedia's ``qParams.supernodes`` ([name, np_id, ...])."""
    if not isinstance(groups, list):
        raise GraphFormatError(f"'supernodes' is {type(groups).__name__}; expected a list of {{name, members}}")
    out = []
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not isinstance(g.get("members"), list):
            raise GraphFormatError(f"supernode {str(g)[:80]!r} is malformed; expected {{\"name\": str, \"members\": [node_id, ...]}}")
        missing = [m for m in g["members"] if m not in id_map]
        if missing:
            raise GraphFormatError(f"supernode {g['name']!r} names {missing[0]!r}, which is not a node of the graph")
        out.append([g["name"], *(id_map[m] for m in g["members"])])
    return out


def _supernodes_in(qparams, id_map: dict[str, str]) -> list[dict]:
    """Neuronpedia's ``qParams.supernodes`` ([name, np_id, ...]) -> our ``supernodes``; members that name no
    node of the graph are dropped (Neuronpedia keeps supernodes of nodes a later pruning removed)."""
    groups = qparams.get("supernodes") if isinstance(qparams, dict) else None
    out = []
    for i, g in enumerate(groups if isinstance(groups, list) else []):
        if not isinstance(g, list) or not g or not isinstance(g[0], str):
            raise GraphFormatError(f"Neuronpedia graph: qParams.supernodes[{i}] is {str(g)[:80]!r}; "
                                   "expected [name, node_id, ...]")
        members = [id_map[m] for m in g[1:] if isinstance(m, str) and m in id_map]
        if members:
            out.append({"name": g[0], "members": members})
    return out


_NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation")


# ------------------------------------------------------------------------------------ NP -> ours
def _split_id(node_id: str, parts: int) -> list[str]:
    p = str(node_id).split("_")
    if len(p) != parts:
        raise GraphFormatError(f"Neuronpedia node id {node_id!r} does not have {parts} '_'-separated parts")
    return p


_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError)


@contextmanager
def _malformed(where: str):
    """Turn a crash while reading ``where`` into a GraphFormatError that names it."""
    try:
        yield
    except _MALFORMED as e:
        why = f"no field {e}" if isinstance(e, KeyError) else str(e)[:200]
        raise GraphFormatError(f"Neuronpedia graph: {where} is malformed ({why}); "
                               f"expected circuit-tracer graph JSON") from None


def _expect(value, kind: type, where: str):
    if not isinstance(value, kind):
        want = {dict: "an object", list: "a list", str: "a string"}[kind]
        raise GraphFormatError(f"Neuronpedia graph: {where} is {type(value).__name__}; expected {want}")
    return value


def from_neuronpedia(d: dict) -> dict:
    """circuit-tracer / Neuronpedia graph JSON (a dict) -> our ``sparsetrace-graph/1`` dict.

    Malformed input raises :class:`GraphFormatError` naming the part that is wrong.
    """
    if not isinstance(d, dict) or "nodes" not in d or "metadata" not in d:
        raise GraphFormatError("not a Neuronpedia graph; expected an object with 'metadata', 'nodes' and 'links'")
    meta = _expect(d["metadata"] or {}, dict, "metadata")
    extra = _expect(meta.get("sparsetrace") or {}, dict, "metadata.sparsetrace")
    hookpoints = _expect(extra.get("hookpoints") or {}, dict, "metadata.sparsetrace.hookpoints")
    nodes_in = _expect(d.get("nodes") or [], list, "nodes")
    links_in = _expect(d.get("links") or [], list, "links")
    for i, n in enumerate(nodes_in):
        _expect(n, dict, f"nodes[{i}]")
    with _malformed("metadata"):
        prompt_tokens = [str(t) for t in _expect(meta.get("prompt_tokens") or [], list, "metadata.prompt_tokens")]
        pids = _expect(extra.get("prompt_token_ids") or [], list, "metadata.sparsetrace.prompt_token_ids")
        node_threshold = _float(meta.get("node_threshold"))
        n_layers = extra.get("n_layers")
        if n_layers is None:
            logit_layers = [int(n["layer"]) for n in nodes_in
                            if n.get("feature_type") == "logit" and str(n.get("layer")).isdigit()]
            n_layers = (max(logit_layers) - 1) if logit_layers else 1 + max(
                (int(n["layer"]) for n in nodes_in if str(n.get("layer")).lstrip("-").isdigit()), default=-1)
        n_layers = int(n_layers)

    def tok(pos: int) -> str:
        return prompt_tokens[pos] if 0 <= pos < len(prompt_tokens) else ""

    nodes, id_map, targets = [], {}, []
    for i, n in enumerate(nodes_in):
        np_id = _expect(n.get("node_id"), str, f"nodes[{i}].node_id")
        with _malformed(f"node {np_id[:60]!r}"):
            ft, pos = str(n.get("feature_type", "")), int(n.get("ctx_idx", 0))
            common = {"position": pos, "activation": _float(n.get("activation")),
                      "influence": _float(n.get("influence")), "label": n.get("clerp") or None, "token": tok(pos),
                      "feature": None, "hookpoint": None}
            if ft == "embedding":
                tid = int(_split_id(np_id, 3)[1])
                node = {"node_id": f"E@{pos}", "kind": "embedding", "layer": -1}
                if tid >= 0 and not (pos < len(pids) and pids[pos] == tid):
                    node["token_id"] = tid
                common["label"] = None
            elif ft == "logit":
                tid = int(n["feature"])
                m = _LOGIT_CLERP.match(n.get("clerp") or "")
                token = m.group("tok") if m else ""
                prob = float(n.get("token_prob", 0.0))
                node = {"node_id": f"LOGIT/{tid}@{pos}", "kind": "logit", "layer": n_layers}
                common.update(token=token, label=None)
                targets.append((bool(n.get("is_target_logit")), {"token": token, "token_id": tid, "prob": prob}))
            elif "error" in ft:
                layer = int(n["layer"])
                node = {"node_id": f"L{layer}/ERR@{pos}", "kind": "error", "layer": layer}
                common["hookpoint"] = hookpoints.get(str(layer))
            else:  # a feature ("cross layer transcoder", "transcoder", "unexplored node", ...)
                layer = int(n["layer"])
                p = _split_id(np_id, 3)
                f = int(p[1]) if p[0] == str(layer) else uncantor(int(n["feature"]))[1]
                node = {"node_id": f"L{layer}/F{f}@{pos}", "kind": "feature", "layer": layer}
                common.update(feature=f, hookpoint=hookpoints.get(str(layer)))
        node.update(common)
        if np_id in id_map or node["node_id"] in id_map.values():
            raise GraphFormatError(f"Neuronpedia graph: two nodes map to {node['node_id']!r} (node_id {np_id[:60]!r})")
        id_map[np_id] = node["node_id"]
        nodes.append(node)

    links = []
    for i, e in enumerate(links_in):
        _expect(e, dict, f"links[{i}]")
        for end in ("source", "target"):
            if _expect(e.get(end), str, f"links[{i}].{end}") not in id_map:
                raise GraphFormatError(f"Neuronpedia graph: links[{i}] {end} {e[end][:60]!r} names no node; "
                                       f"expected one of the nodes' node_id")
        with _malformed(f"links[{i}]"):
            links.append({"source": id_map[e["source"]], "target": id_map[e["target"]], "weight": float(e["weight"])})

    out_meta = {k: v for k, v in extra.items() if k not in ("format", "hookpoints")}
    out_meta.setdefault("model", meta.get("scan", ""))
    out_meta["prompt"] = meta.get("prompt", "")
    out_meta["prompt_tokens"] = prompt_tokens
    if "targets" not in out_meta:
        out_meta["targets"] = [t for _, t in sorted(targets, key=lambda t: not t[0])]
    out_meta["node_threshold"] = node_threshold
    out_meta.setdefault("edge_threshold", None)
    out_meta.setdefault("scores", {})
    out_meta["n_layers"] = n_layers
    if not extra:
        out_meta["slug"] = meta.get("slug", "")
    doc = {"format": extra.get("format", GRAPH_FORMAT), "metadata": out_meta, "nodes": nodes, "links": links}
    supernodes = _supernodes_in(d.get("qParams"), id_map)
    if supernodes:
        doc["supernodes"] = supernodes
    return doc


# ----------------------------------------------------------------------------------------- files
def export_graph_file(src: str | Path, dest: str | Path, **kwargs) -> Path:
    """Read our graph.json, write Neuronpedia JSON to ``dest``."""
    try:
        graph = json.loads(Path(src).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraphFormatError(f"graph file {src} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise GraphFormatError(f"{src} is not valid JSON ({e})") from None
    out = to_neuronpedia(graph, **kwargs)
    dest = Path(dest)
    from ..dictionary.io import atomic_write_text

    atomic_write_text(dest, json.dumps(out, indent=2, ensure_ascii=False))
    return dest
