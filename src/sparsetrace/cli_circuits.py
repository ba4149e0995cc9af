"""Commands of the circuit stage: ``trace``, ``verify``, ``steer``, ``upstream``, ``export``, ``export-graph``.

Plain functions registered on the typer app by :mod:`sparsetrace.cli`; like it, thin: they parse flags,
call the library and print results.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli_options import clear_or_refuse as _clear_or_refuse
from .cli_options import progress_enabled as _progress
from .errors import ConfigError


# ---------------------------------------------------------------------------------------------- circuits
def _say(msg: str) -> None:
    typer.echo(f"[sparsetrace] {msg}", err=True)


def _dictionaries_and_model(dictionaries: list[Path], model: str | None, device: str):
    from .intervene.circuit_job import load_dictionaries, model_of
    from .model.adapter import LanguageModel

    if not dictionaries:
        raise ConfigError("--dictionaries is required: a run folder (e.g. runs/tc) or dictionary folders")
    dicts = load_dictionaries(dictionaries)
    name = model or model_of(dicts)
    _say(f"loading model {name}")
    lm = LanguageModel.load(name, device=device)
    return lm, load_dictionaries(dictionaries, lm)


def trace(
    dictionaries: list[Path] = typer.Option(None, "--dictionaries", "-d", help="Run folder(s) or dictionary folders."),
    model: str = typer.Option(None, help="Model (default: the one the dictionaries were trained on)."),
    task: str = typer.Option(None, help="Built-in task: ioi | greater-than | sva | facts."),
    prompt: str = typer.Option(None, help="A custom prompt (with --target)."),
    target: str = typer.Option(None, help="The next token to explain, e.g. ' Paris' (one token)."),
    contrast: str = typer.Option(None, help="Optional contrast token: metric = logit(target) - logit(contrast)."),
    n_prompts: int = typer.Option(32, "--n-prompts", help="Task prompts the circuit is verified on."),
    graph_prompts: int = typer.Option(4, "--graph-prompts", help="Task prompts attributed to choose the circuit with --select influence (effect: 1)."),
    max_features: int = typer.Option(20, "--max-features", help="Circuit size."),
    node_threshold: float = typer.Option(0.8, "--node-threshold", help="Pruning: fraction of node influence kept."),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold", help="Pruning: fraction of edge influence kept."),
    mode: str = typer.Option("mean", help="Ablation used by verify: mean | zero | patch."),
    unrelated_task: str = typer.Option(None, "--unrelated-task", help="Specificity task (default facts)."),
    select: str = typer.Option("effect", help="Circuit ranking: effect (estimated effect of the verify ablation on the "
                               "task metric) | influence (attribution graphs)."),
    positions: str = typer.Option("role", help="role: nodes at token roles (IOI S1/IO/S2/END...), every template | "
                                  "relative: positions from the end, one template | any: every position."),
    template: int = typer.Option(0, help="With --positions relative: which task template."),
    seed: int = typer.Option(0, help="Seed of the selection prompts the circuit is chosen on."),
    heldout_seed: int = typer.Option(None, "--heldout-seed", help="Seed of the held-out prompts verify uses "
                                     "(default seed + 1)."),
    verify: bool = typer.Option(False, "--verify", help="Also run `sparsetrace verify` on the result (held-out prompts)."),
    qk: bool = typer.Option(False, "--qk", help="Add QK terms and head loadings of the 5 strongest attention-mediated "
                            "edges to graph.json (key \"qk\")."),
    device: str = typer.Option("cpu"),
    out: Path = typer.Option(None, help="Output folder (default DICTIONARIES/circuits/TASK)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a graph/circuit already in the output folder "
                                   "(refused otherwise); its verify.json is deleted with it."),
) -> None:
    """Attribution graph for a task or a prompt, and the circuit of its most influential features."""
    from .intervene.circuit_job import TraceConfig, format_verify, task_for, trace_circuit, verify_trace

    cfg = TraceConfig(task=task if task is not None or prompt is not None else "ioi", prompt=prompt, target=target, contrast=contrast,
                      n_prompts=n_prompts, n_graph_prompts=graph_prompts, max_features=max_features,
                      node_threshold=node_threshold, edge_threshold=edge_threshold, mode=mode,
                      unrelated_task=unrelated_task, select=select, positions=positions, template=template,
                      seed=seed, heldout_seed=heldout_seed, qk_edges=5 if qk else 0).validate()
    task_for(cfg)  # an unknown task name fails before the model loads
    if not dictionaries:
        raise ConfigError("--dictionaries is required: a run folder (e.g. runs/tc) or dictionary folders")
    if out is None:
        base = dictionaries[0] if dictionaries[0].is_dir() else dictionaries[0].parent
        out = base / "circuits" / cfg.name
    lm, dicts = _dictionaries_and_model(dictionaries, model, device)
    task_for(cfg).prompts(lm, n=1, seed=cfg.seed)  # a prompt/target the model cannot use fails before the refusal
    _clear_or_refuse([out / "circuit.json", out / "graph.json", out / "verify.json"], overwrite)
    doc = trace_circuit(lm, dicts, cfg, out, log=_say)
    gs, ps, ec = doc.get("graph_scores") or {}, doc.get("pruned_scores") or {}, doc.get("edge_check") or {}
    typer.echo(f"task {doc['task']}: clean {doc['metric_name']} {doc['baseline']:.3f}")
    typer.echo(f"graph: replacement score {gs.get('replacement', float('nan')):.3f}, graph_completeness "
               f"{gs.get('graph_completeness', float('nan')):.3f} (pruned: {ps.get('replacement', float('nan')):.3f} / "
               f"{ps.get('graph_completeness', float('nan')):.3f}); exactness max|dlogit| {doc.get('exactness', float('nan')):.2e}")
    if ec.get("frozen"):
        typer.echo(f"edge check ({ec['n']} strongest edges, finite differences): max rel err "
                   f"{ec['frozen']['max_rel_err']:.2e} frozen; sign agreement with live attention "
                   f"{ec.get('causal_agreement', {}).get('sign_agreement', float('nan')):.0%}")
    if doc.get("paths"):
        top = doc["paths"][0]
        typer.echo(f"strongest path (of {len(doc['paths'])} in circuit.json): " + " -> ".join(top["nodes"])
                   + f"  (linearised effect {top['effect']:+.3g})")
    sel = doc.get("selection") or {}
    typer.echo(f"circuit ({len(doc['circuit'])} features, chosen on {sel.get('split', 'the')} prompts, seed "
               f"{sel.get('seed', cfg.seed)}): " + ", ".join(doc["circuit"]))
    typer.echo(f"written: {out}/graph.json, {out}/circuit.json")
    if verify:
        typer.echo(format_verify(verify_trace(lm, dicts, out, log=_say)))


def verify_cmd(
    trace_dir: Path = typer.Argument(..., help="Folder written by `sparsetrace trace`."),
    dictionaries: list[Path] = typer.Option(None, "--dictionaries", "-d", help="Default: those recorded by trace."),
    model: str = typer.Option(None, help="Default: the model recorded by trace."),
    mode: str = typer.Option(None, help="mean | zero | patch (default: the trace's)."),
    max_features: int = typer.Option(None, "--max-features", help="Verify only the first N circuit features."),
    n_prompts: int = typer.Option(None, "--n-prompts"),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print verify.json."),
    in_sample: bool = typer.Option(False, "--in-sample", help="Also measure on the selection prompts the circuit "
                                   "was chosen on; shown beside the held-out figures, labelled."),
) -> None:
    """Faithfulness, ablation_completeness and specificity of a traced circuit, by ablation inside the real model."""
    from .intervene.circuit_job import format_verify, read_circuit, verify_trace

    doc = read_circuit(trace_dir)
    paths = dictionaries or [Path(p) for p in doc.get("dictionaries") or [] if p]
    lm, dicts = _dictionaries_and_model(paths, model or doc.get("model"), device)
    res = verify_trace(lm, dicts, trace_dir, mode=mode, max_features=max_features, n_prompts=n_prompts,
                       in_sample=in_sample, log=_say)
    if as_json:
        typer.echo((trace_dir / "verify.json").read_text(encoding="utf-8").strip())
    else:
        typer.echo(format_verify(res))


def steer(
    feature: str = typer.Option(..., help="Feature as LAYER:INDEX (e.g. 6:1234) or L6/F1234."),
    prompt: str = typer.Option(..., help="Prompt to continue."),
    scale: float = typer.Option(4.0, help="Multiple of a typical activation norm added along the decoder row, "
                               "in [-1000, 1000] (0: unsteered, negative: suppress)."),
    dictionaries: list[Path] = typer.Option(None, "--dictionaries", "-d", help="Run folder or dictionary folders."),
    model: str = typer.Option(None),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens"),
    device: str = typer.Option("cpu"),
) -> None:
    """Generate with a feature's decoder direction added at every position, next to the unsteered text."""
    from .intervene import steer_generate
    from .intervene.features import parse_node_id

    node = parse_node_id(feature)
    lm, dicts = _dictionaries_and_model(dictionaries, model, device)
    ids = lm.tokenize(prompt)
    if ids.shape[1] + max_new_tokens > lm.max_length:
        raise ConfigError(f"--prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                          f"the model's context of {lm.max_length}")
    plain = steer_generate(lm, dicts, node.node_id, 0.0, ids, max_new_tokens)
    steered = steer_generate(lm, dicts, node.node_id, scale, ids, max_new_tokens)
    typer.echo(f"prompt:   {prompt!r}")
    typer.echo(f"baseline: {plain!r}")
    typer.echo(f"steered:  {steered!r}   ({node.layer}:{node.feature} x {scale:g})")


def export_graph(
    graph: Path = typer.Argument(..., help="A graph.json written by `sparsetrace trace`."),
    out: Path = typer.Option(..., help="Output JSON (circuit-tracer / Neuronpedia graph format)."),
    slug: str = typer.Option(None, help="Graph slug (default from the prompt)."),
) -> None:
    """Export an attribution graph as circuit-tracer / Neuronpedia graph JSON."""
    from .attribute.export import export_graph_file

    dest = export_graph_file(graph, out, slug=slug)
    typer.echo(f"written: {dest}")


def export_cmd(
    run: Path = typer.Argument(..., help="A run folder or one dictionary folder (or a graph.json: see --to)."),
    to: str = typer.Option(..., "--to", help="circuit-tracer | saelens | sparsify (a graph.json: circuit-tracer)."),
    out: Path = typer.Option(..., "--out", help="Output folder (a graph.json: output file)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    model: str = typer.Option(None, help="circuit-tracer: the model (default: the dictionaries' own)."),
    n_layers: int = typer.Option(None, "--n-layers", help="circuit-tracer: the model's layer count (skips loading it)."),
) -> None:
    """Write a run's dictionaries in circuit-tracer's, SAELens' or sparsify's own layout."""
    from .dictionary.export import check_out, check_target, export_run

    check_target(to)
    if run.is_file() and run.suffix.lower() == ".json":
        if to != "circuit-tracer":
            raise ConfigError(f"--to '{to}' cannot take a graph ({run}); expected --to circuit-tracer")
        from .attribute.export import export_graph_file

        check_out(out, overwrite, protect=run, kind="file")
        typer.echo(f"written: {export_graph_file(run, out)}")
        return
    for dest in export_run(run, to, out, overwrite=overwrite, model=model, n_layers=n_layers, progress=_progress()):
        typer.echo(f"written: {dest}")


def upstream(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="Run folder with the dictionaries (e.g. runs/tc)."),
    feature: str = typer.Option(..., help="Target feature as LAYER:INDEX, e.g. 6:123."),
    top: int = typer.Option(10, help="How many upstream features to list."),
    through_attention: bool = typer.Option(True, "--through-attention/--no-through-attention",
                                           help="Also score paths through each attention head's OV circuit."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON instead of the table."),
    model: str = typer.Option(None, help="Model (default: the one the dictionaries were trained on)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing RUN/upstream/LXX_FN.json."),
    device: str = typer.Option("cpu"),
) -> None:
    """Top upstream features of a feature (virtual weights from the weights alone) and its top input tokens."""
    from .attribute import upstream as up

    layer, index = up.parse_feature(feature)
    dest = up.upstream_file(run_dir, layer, index, overwrite=overwrite)
    lm, dicts = _dictionaries_and_model([run_dir], model, device)
    doc = up.upstream_features(lm, dicts, layer, index, top=top, through_attention=through_attention)
    up.write_upstream(dest, doc)
    typer.echo(json.dumps(doc, indent=1, ensure_ascii=False) if as_json else up.format_upstream(doc))
    _say(f"written: {dest}")


def graph_scores_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="Run folder with transcoders on every layer or a CLT."),
    prompts: Path = typer.Option(None, "--prompts", help="Text file, one prompt per line (default: the 20 "
                                 "packaged prompts, sparsetrace/attribute/data/score_prompts.txt)."),
    kind: str = typer.Option("auto", "--kind", help="auto (the run's CLT if it has one, else its transcoders) | "
                             "clt | plt."),
    max_feature_nodes: int = typer.Option(3000, "--max-feature-nodes", help="Feature rows per graph (by "
                                          "estimated influence); the rest are left out."),
    batch_size: int = typer.Option(None, "--batch-size", help="Targets per backward (default from the prompt length)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    model: str = typer.Option(None, help="Model (default: the one the dictionaries were trained on)."),
    device: str = typer.Option("cpu"),
) -> None:
    """Replacement score and graph completeness of unpruned attribution graphs, per prompt and averaged."""
    from .attribute.scores import (
        format_scores,
        graph_scores_over_prompts,
        load_mlp_replacement,
        score_prompts,
    )
    from .model.adapter import LanguageModel

    texts = score_prompts(prompts)
    if max_feature_nodes < 1:
        raise ConfigError(f"--max-feature-nodes {max_feature_nodes} is invalid; expected an integer >= 1")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} is invalid; expected an integer >= 1")
    rep = load_mlp_replacement(run_dir, kind, device=device)
    name = model or rep.model_id
    if not name:
        raise ConfigError(f"the dictionaries in '{run_dir}' record no model; pass --model")
    _say(f"loading model {name}; {rep.kind} on {len(rep.layers)} layers; {len(texts)} prompts")
    lm = LanguageModel.load(name, device=device)
    res = graph_scores_over_prompts(lm, rep, texts, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                                    progress=_progress())
    res["run"] = str(run_dir)
    typer.echo(json.dumps(res, allow_nan=True) if as_json else format_scores(res))
