"""`sparsetrace trace` and `sparsetrace verify`: find a circuit for a task, then check it causally.

``trace_circuit`` attributes a few of the task's clean prompts (one attribution graph each, through the
local replacement model; ``graph.json`` is the first) and keeps ``max_features`` feature nodes as the
circuit, ranked (``select``) by

- ``"effect"`` (default): the first-order estimate of the very intervention ``verify`` performs, on the
  task metric m over all the task's prompts: ``(a_ablated - a) * dm/da`` per feature and position
  (``a_ablated`` = the feature on the corrupted prompt for ``mode="patch"``, its mean over the prompts for
  ``"mean"``, 0 for ``"zero"``; ``dm/da`` = the decoder row times the gradient of m at the dictionary's
  output in the real model, errors held fixed), summed over the prompts where the feature is active and
  averaged; nodes whose ablation is estimated to lower m most come first. This is attribution patching at feature level, and it targets the task's
  own metric (e.g. the IOI logit *difference*), which a graph of one target logit cannot;
- ``"influence"``: each node's influence on the target logit in the graphs, summed over the prompts
  (every graph normalised to total feature influence 1).
 Features at the BOS position are left out: under
causal attention that position's state is the same in every prompt. Three ways to name a node (``positions``):

- ``"role"`` (default): ``L6/F12@S2`` = feature 12 of layer 6 at the token playing the role S2 (IOI: S1, IO,
  S2, END; agreement: SUBJ, OTHER, END; greater-than: NOUN, YY, XX2, END; facts: SUBJ, END) in each
  prompt, whatever its template, so a circuit chosen on some templates can be ablated on others;
- ``"relative"``: ``L6/F12@-3`` = the feature at the third token from the end, on prompts of one template
  (``template``, default 0);
- ``"any"``: ``6:12`` = the feature at every position, over prompts of all the task's templates.

Selection and verification are disjoint: ``trace`` scores and chooses the circuit on the task's
``split="selection"`` prompts (``seed``); ``verify`` measures it on ``split="heldout"`` prompts (names,
objects, numbers, templates or relations the circuit never saw; ``heldout_seed``, default ``seed + 1``),
and with ``in_sample=True`` also on the selection prompts, stored beside them under ``"in_sample"``.

Written to the trace folder::

    graph.json    the first prompt's pruned attribution graph (docs/formats.md)
    circuit.json  {"format": "sparsetrace-circuit/1", "circuit": [node ids], "scores": {node: influence},
                   "config": TraceConfig, "model": str, "dictionaries": [paths], "baseline": float,
                   "graph_prompts": [str], "edge_check": check_edges summary, "graph_scores": {...}}

``verify_trace`` reads that folder, ablates features inside the real model (``verify_circuit``: errors
kept, so only the features change) and writes ``verify.json``. The edge-level causal check of the
strongest feature -> feature edges runs on the graph's own prompt (positions are that prompt's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..dictionary.io import atomic_write_text, find_dictionaries
from ..dictionary.load import load_dictionary
from ..errors import ConfigError, DataError
from ..model.adapter import LanguageModel
from .effect import effect_scores
from .verify import edge_checks, verify_circuit, write_verify_json
from .verify_text import format_verify  # noqa: F401  (re-exported: the CLI prints verify results with it)

CIRCUIT_FORMAT = "sparsetrace-circuit/1"
MODES = ("mean", "zero", "patch")
POSITIONS = ("role", "relative", "any")
SELECTS = ("effect", "influence")


@dataclass
class TraceConfig:
    """What to trace and how the circuit is chosen and verified."""

    task: str | None = "ioi"  # a built-in task, or None with prompt + target (custom)
    prompt: str | None = None
    target: str | None = None  # single token, e.g. " Paris"
    contrast: str | None = None  # optional single token: metric = logit(target) - logit(contrast)
    n_prompts: int = 32  # prompts the circuit is verified on
    n_graph_prompts: int = 4  # prompts attributed to choose the circuit (select="influence"; effect uses 1)
    max_features: int = 20
    max_feature_nodes: int = 3000
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    mode: str = "mean"  # ablation for verification: mean | zero | patch
    unrelated_task: str | None = None  # None: "facts" (or "greater-than" when the task is facts)
    n_edge_checks: int = 100  # finite-difference checks of the strongest graph edges
    n_spearman: int = 30  # top-scored features whose single ablation effect is measured
    select: str = "effect"  # effect: first-order estimate of the verify ablation on the metric | influence: graphs
    positions: str = "role"  # role: nodes at token roles (S2, END) | relative: from the end, one template | any
    template: int | None = 0  # with positions="relative": the task template used (None: all templates)
    seed: int = 0  # selection prompts (trace)
    heldout_seed: int | None = None  # held-out prompts (verify); None: seed + 1
    qk_edges: int = 0  # QK terms and head loadings for this many attention-mediated graph edges (--qk: 5)

    def validate(self) -> TraceConfig:
        if self.task is None and not self.prompt:
            raise ConfigError("nothing to trace: pass --task NAME or --prompt TEXT --target TOKEN")
        if self.task is None and not self.target:
            raise ConfigError("--prompt needs --target (the next token to explain, e.g. ' Paris')")
        if self.task is not None and self.prompt:
            raise ConfigError(f"pass either --task ('{self.task}') or --prompt, not both")
        for name in ("target", "contrast"):
            if getattr(self, name) is not None and self.prompt is None:
                raise ConfigError(f"--{name} {getattr(self, name)!r} needs --prompt (a built-in task gives its own)")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("--prompt is empty; expected the text whose next token to explain")
        for name in ("n_prompts", "n_graph_prompts", "max_features", "max_feature_nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is invalid; expected a positive integer")
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is invalid; expected a fraction in (0, 1]")
        if self.mode not in MODES:
            raise ConfigError(f"--mode '{self.mode}' is unknown; expected one of {', '.join(MODES)}")
        if self.select not in SELECTS:
            raise ConfigError(f"--select '{self.select}' is unknown; expected one of {', '.join(SELECTS)}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"--positions '{self.positions}' is unknown; expected one of {', '.join(POSITIONS)}")
        if self.template is not None and (not isinstance(self.template, int) or self.template < 0):
            raise ConfigError(f"--template {self.template!r} is invalid; expected a template index >= 0")
        return self

    @property
    def name(self) -> str:
        return self.task or "custom"

    def split_seed(self, split: str) -> int:
        if split == "heldout":
            return self.seed + 1 if self.heldout_seed is None else self.heldout_seed
        return self.seed

    def unrelated(self) -> str:
        if self.unrelated_task:
            return self.unrelated_task
        return "greater-than" if self.task == "facts" else "facts"

    @classmethod
    def from_dict(cls, d: dict) -> TraceConfig:
        known = {f.name for f in fields(cls)}
        d = {"positions": "any", "select": "influence", **d}  # files from before these options existed
        return cls(**{k: v for k, v in d.items() if k in known})


def load_dictionaries(paths: list[str | Path] | str | Path, lm: LanguageModel | None = None) -> list:
    """Dictionaries from run folders and/or dictionary folders (one per layer and site), checked against
    ``lm`` when given."""
    from ..dictionary.io import check_matches_model

    if isinstance(paths, (str, Path)):
        paths = [paths]
    folders: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(f"dictionaries '{p}' do not exist; expected a run folder or a dictionary folder")
        found = find_dictionaries(p)
        if not found:
            raise DataError(f"no dictionaries found in '{p}'; expected a run folder (L06_transcoder/ ...) "
                            "or a dictionary folder (config.json + weights.safetensors)")
        folders.extend(found)
    dicts = [load_dictionary(f, device=lm.device if lm is not None else "cpu") for f in folders]
    seen: dict[tuple, Path] = {}
    for d, f in zip(dicts, folders, strict=True):
        key = (d.cfg.kind == "sae", d.cfg.hookpoint_in, d.cfg.layer)
        if key in seen:
            raise DataError(f"two dictionaries for the same site (layer {d.cfg.layer}, {d.cfg.hookpoint_in}): "
                            f"'{seen[key]}' and '{f}'; pass one of them")
        seen[key] = f
        if lm is not None:
            check_matches_model(d, lm.model_id, lm.d_model, lm.n_layers)
    for d, f in zip(dicts, folders, strict=True):
        d.source_path = str(f)
    return sorted(dicts, key=lambda d: d.cfg.layer)


def model_of(dictionaries: list) -> str:
    ids = {d.cfg.model_id for d in dictionaries if d.cfg.model_id}
    if len(ids) != 1:
        raise DataError(f"the dictionaries record models {sorted(ids) or 'none'}; pass --model")
    return ids.pop()


def task_for(cfg: TraceConfig):
    """The task; with relative positions, restricted to one of its templates (so positions line up)."""
    from ..tasks import get_task

    if cfg.task is None:
        return get_task("custom", prompt=cfg.prompt, target=cfg.target, contrast=cfg.contrast)
    task = get_task(cfg.task)
    templates = getattr(task, "templates", None)
    if cfg.template is not None and templates and cfg.template >= len(templates):
        raise ConfigError(f"--template {cfg.template} is out of range; task '{cfg.task}' has templates "
                          f"0..{len(templates) - 1}")
    if cfg.positions == "relative" and cfg.template is not None and templates:
        task.templates = type(templates)([templates[cfg.template]])
    return task


def node_key(node, last: int, positions: str, roles: dict[int, str] | None = None) -> str | None:
    """The circuit node id of a graph feature node (``L6/F12@S2``, ``L6/F12@-3`` or ``6:12``); None for a
    role-keyed circuit when the node's position plays no role (``roles``: {position: role})."""
    if positions == "any":
        return f"{node.layer}:{node.feature}"
    if positions == "role":
        role = (roles or {}).get(int(node.position))
        return None if role is None else f"L{node.layer}/F{node.feature}@{role}"
    return f"L{node.layer}/F{node.feature}@{int(node.position) - last - 1}"


def _roles_of_row(batch, i: int) -> dict[int, str]:
    """{position: role} of prompt ``i`` (END wins where two roles share a token)."""
    out: dict[int, str] = {}
    for role, pos in sorted(batch.roles.items(), key=lambda kv: kv[0] == "END"):
        if int(pos[i]) >= 0:
            out[int(pos[i])] = role
    return out


def _prompt_ids(batch, i: int):
    return batch.clean[i : i + 1, : int(batch.last_pos[i]) + 1]


def _top_paths(graph, say, n: int = 5) -> list[dict]:
    """The strongest paths into the graph's likeliest target logit (greedy beam search, attribute/paths.py)."""
    from ..attribute.paths import find_paths

    if not len(graph.edges):
        return []
    say(f"path search: the {n} strongest paths into the target logit")
    return [p.to_dict() for p in find_paths(graph, None, num_iters=10, num_branches=n)[:n]]


def trace_circuit(
    lm: LanguageModel,
    dictionaries: list,
    cfg: TraceConfig,
    out: str | Path,
    *,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Attribute the task's first prompt (``cfg.n_graph_prompts`` of them with ``select="influence"``), choose
    the circuit, write graph.json + circuit.json."""
    from ..attribute import attribute, check_edges

    cfg.validate()
    say = log or (lambda _m: None)
    out = Path(out)
    task = task_for(cfg)
    # the graphs' influence ranks the circuit only with select="influence"; otherwise one graph (graph.json,
    # the edge checks) is all that is used
    n_graph = 1 if cfg.task is None or cfg.select == "effect" else cfg.n_graph_prompts
    batch = task.prompts(lm, n=max(cfg.n_prompts, n_graph) if cfg.task else 1, seed=cfg.seed, split="selection")
    if cfg.positions == "role" and set(batch.roles) <= {"END"}:
        cfg.positions = "relative"  # a prompt without marked roles (custom): positions from its end
    if cfg.positions == "relative" and len(set(batch.last_pos.tolist())) > 1:
        say(f"the '{cfg.name}' prompts differ in length, so positions counted from the end do not line up: "
            "circuit nodes are features at every position (--positions any)")
        cfg.positions = "any"
    baseline = task.baseline(lm, batch=batch)
    totals: dict[str, float] = {}
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    first = None
    t0 = time.perf_counter()
    for i in range(min(n_graph, len(batch))):
        ids = _prompt_ids(batch, i)
        target = int(batch.answer_ids[i])
        say(f"attribution graph {i + 1}/{n_graph}: {batch.prompts[i]!r} -> {lm.to_str_tokens([target])[0]!r}")
        g = attribute(lm, ids, dictionaries, target=target, max_feature_nodes=cfg.max_feature_nodes,
                      node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
        g.metadata["prompt"] = batch.prompts[i]
        full = g.unpruned if g.unpruned is not None else g
        # the BOS position sees only itself (causal attention): its features are the same in every prompt,
        # carry nothing about this one, and cannot be ablated or patched to any effect; they are left out
        skip0 = bos is not None and int(ids[0, 0]) == int(bos)
        feats = [n for n in full.nodes if n.kind == "feature" and n.influence and not (skip0 and n.position == 0)]
        total = sum(abs(float(n.influence)) for n in feats) or 1.0
        last = int(batch.last_pos[i])
        roles = _roles_of_row(batch, i)
        for n in feats:
            key = node_key(n, last, cfg.positions, roles)
            if key is not None:
                totals[key] = totals.get(key, 0.0) + abs(float(n.influence)) / total
        if first is None:
            first = g
    graph_s = time.perf_counter() - t0
    if first is None:
        raise DataError(f"task '{cfg.name}' gave no prompt to attribute")
    if cfg.select == "effect":
        say(f"scoring features by the estimated effect of {cfg.mode}-ablating them on {len(batch)} prompts")
        scores = effect_scores(lm, dictionaries, batch, task, cfg.mode, cfg.positions)
    else:
        ranked = sorted(totals.items(), key=lambda kv: -kv[1])
        scores = {key: s / n_graph for key, s in ranked}
    circuit = list(scores)[: cfg.max_features]

    say(f"checking the {cfg.n_edge_checks} strongest edges by finite differences")
    check = check_edges(first, k=cfg.n_edge_checks) if cfg.n_edge_checks and len(first.edges) else {}
    check_summary = {k: v for k, v in check.items() if k != "edges"}
    first.metadata["edge_check"] = check_summary
    if cfg.qk_edges:
        from ..attribute.heads import add_qk

        say(f"QK terms and head loadings for the {cfg.qk_edges} strongest attention-mediated edges")
        add_qk(first, n_edges=cfg.qk_edges, log=say)
    paths = _top_paths(first, say)
    out.mkdir(parents=True, exist_ok=True)
    first.save(out / "graph.json")
    doc = {
        "format": CIRCUIT_FORMAT,
        "task": cfg.name,
        "model": lm.model_id,
        "dictionaries": [getattr(d, "source_path", None) for d in dictionaries],
        "config": asdict(cfg),
        "metric_name": batch.metric_name,
        "baseline": baseline,
        "graph_prompts": batch.prompts[:n_graph],
        "selection": {"split": "selection" if cfg.task else "custom prompt", "seed": cfg.seed,
                      "n_prompts": len(batch), "prompts": batch.prompts[:5]},
        "circuit": circuit,
        "scores": dict(list(scores.items())[: max(cfg.n_spearman, cfg.max_features, 200)]),
        "graph_scores": first.metadata.get("scores"),
        "pruned_scores": first.metadata.get("pruned_scores"),
        "exactness": first.metadata.get("exactness"),
        "edge_check": check_summary,
        "paths": paths,
        "seconds": {"graphs": round(graph_s, 2), "first_graph": first.metadata.get("timings", {}).get("total_s")},
    }
    (out / "verify.json").unlink(missing_ok=True)  # it described the circuit this one replaces
    atomic_write_text(out / "circuit.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


def circuit_sha256(trace_dir: str | Path) -> str | None:
    """sha256 of a trace folder's circuit.json bytes (None when it is missing)."""
    from ..util.hashing import sha256_file

    p = Path(trace_dir) / "circuit.json"
    return sha256_file(p) if p.is_file() else None


def verify_is_current(trace_dir: str | Path) -> bool:
    """True when verify.json exists and records the sha256 of the circuit.json now beside it."""
    try:
        res = json.loads((Path(trace_dir) / "verify.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    digest = circuit_sha256(trace_dir)
    return isinstance(res, dict) and digest is not None and res.get("circuit_sha256") == digest


def read_circuit(trace_dir: str | Path) -> dict:
    p = Path(trace_dir) / "circuit.json"
    if not p.is_file():
        raise DataError(f"'{trace_dir}' has no circuit.json; expected a folder written by `sparsetrace trace`")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"'{p}' is corrupt ({type(e).__name__}); expected sparsetrace-circuit/1 JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != CIRCUIT_FORMAT or not isinstance(doc.get("circuit"), list):
        raise DataError(f"'{p}' is not a circuit file; expected \"format\": \"{CIRCUIT_FORMAT}\"")
    return doc


def _strong_feature_edges(graph_path: Path, k: int) -> list[dict]:
    from ..attribute import Graph

    if not graph_path.is_file():
        return []
    g = Graph.load(graph_path)
    src, dst, w = g.edges.numpy()
    def fid(n) -> str:  # interventions name a dictionary by its layer (SAE nodes are "resid_pre.16/F3@5")
        return f"L{n.layer}/F{n.feature}@{n.position}"

    rows = [(abs(float(x)), fid(g.nodes[s]), fid(g.nodes[t]), float(x)) for s, t, x in zip(src, dst, w, strict=True)
            if g.nodes[s].kind == "feature" and g.nodes[t].kind == "feature"]
    rows.sort(reverse=True)
    return [{"source": s, "target": t, "weight": x} for _, s, t, x in rows[:k]]


def verify_trace(
    lm: LanguageModel,
    dictionaries: list,
    trace_dir: str | Path,
    *,
    mode: str | None = None,
    max_features: int | None = None,
    n_prompts: int | None = None,
    max_edge_checks: int = 20,
    in_sample: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Verify the circuit of a trace folder causally on held-out prompts (and, with ``in_sample``, also on
    the selection prompts it was chosen on, stored under ``"in_sample"``); writes and returns verify.json."""
    say = log or (lambda _m: None)
    trace_dir = Path(trace_dir)
    doc = read_circuit(trace_dir)
    digest = circuit_sha256(trace_dir)
    cfg = TraceConfig.from_dict(doc.get("config") or {})
    if mode is not None:
        cfg.mode = mode
    if n_prompts is not None:
        cfg.n_prompts = n_prompts
    cfg.validate()
    circuit = doc["circuit"][: max_features] if max_features else doc["circuit"]
    task = task_for(cfg)
    scores = dict(list((doc.get("scores") or {}).items())[: cfg.n_spearman])
    if cfg.task is None:  # one fixed prompt: nothing is held out
        splits = ["custom prompt"]
    else:
        splits = ["heldout", "selection"] if in_sample else ["heldout"]
    t0 = time.perf_counter()
    results = {}
    for split in splits:
        n = cfg.n_prompts if cfg.task else 1
        seed = cfg.split_seed(split)
        batch = task.prompts(lm, n=n, seed=seed, split="all" if cfg.task is None else split)
        say(f"verifying {len(circuit)} features on {len(batch)} {split} '{cfg.name}' prompts (seed {seed}, "
            f"{cfg.mode} ablation); unrelated task: {cfg.unrelated()}")
        r = verify_circuit(lm, dictionaries, batch, None, circuit, unrelated_task=cfg.unrelated(), mode=cfg.mode,
                           scores=scores, seed=seed, task_name=cfg.name)
        r["split"] = {"name": split, "seed": seed, "example_prompts": batch.prompts[:3]}
        if split == "heldout" and cfg.positions == "relative":
            r["split"]["note"] = ("--positions relative keeps one template, so only the vocabulary is held out, "
                                  "not the template")
        results[split] = r
    res = results[splits[0]]
    res["selection"] = doc.get("selection") or {"split": "all (circuit traced before prompt splits existed)",
                                                "seed": cfg.seed}
    if "selection" in results:
        res["in_sample"] = results["selection"]
    edges = _strong_feature_edges(trace_dir / "graph.json", max_edge_checks)
    if edges:
        # graph positions are those of the graph's own prompt: the first selection prompt
        say(f"edge-level check: zero-ablating the sources of the {len(edges)} strongest feature edges")
        first = task.prompts(lm, n=1, seed=cfg.seed, split="selection" if cfg.task else "all")
        res["edge_checks"] = edge_checks(lm, dictionaries, first, edges, max_checks=max_edge_checks)
        pairs = [(e["predicted"], e["measured"]) for e in res["edge_checks"] if e["measured"] is not None]
        if pairs:
            from .verify import spearman

            res["edge_check_sign_agreement"] = sum((p > 0) == (m > 0) for p, m in pairs) / len(pairs)
            res["edge_check_spearman"] = spearman([p for p, _ in pairs], [m for _, m in pairs])
    res["baseline"] = doc.get("baseline")
    res["unrelated_task"] = cfg.unrelated()
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["circuit_sha256"] = digest
    if circuit_sha256(trace_dir) != digest:
        raise DataError(f"'{trace_dir / 'circuit.json'}' changed while it was being verified; verify it again")
    write_verify_json(res, trace_dir / "verify.json")
    return res
