"""The ``sparsetrace`` command line. Thin: parses flags, calls the library, prints results.

User mistakes raise :class:`sparsetrace.errors.SparsetraceError`; ``main`` prints them as one line
(``error: ...``) and exits with status 2. ``--debug`` (or ``SPARSETRACE_DEBUG=1``) shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from .cli_options import clear_or_refuse as _clear_or_refuse
from .cli_options import parse_layers as _parse_layers
from .errors import ConfigError, SparsetraceError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Sparse dictionaries (SAEs, transcoders) and verified feature circuits for Hugging Face causal LMs.",
)

_DEBUG = {"on": os.environ.get("SPARSETRACE_DEBUG") == "1"}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    if debug:
        _DEBUG["on"] = True


def _corpus_spec(corpus: str | None, encoding: str | None) -> str | None:
    """--corpus with --encoding recorded in it (encoding=NAME:SPEC); an unknown encoding is an error."""
    if encoding is None:
        return corpus
    if corpus is None:
        raise ConfigError(f"--encoding {encoding} needs --corpus: it names the encoding of the corpus files")
    from .data.corpus import with_encoding

    return with_encoding(corpus, encoding)


def _progress() -> bool:
    return os.environ.get("SPARSETRACE_NO_PROGRESS") != "1"


# ---------------------------------------------------------------------------------------------- train
@app.command()
def train(
    model: str = typer.Option("smollm2-135m", help="Short name, local folder/GGUF, or hub name."),
    layers: str = typer.Option("3,6", help="Layers to train, e.g. 3,6 or 2-5."),
    kind: str = typer.Option("transcoder", help="sae | transcoder | skip_transcoder"),
    hookpoint: str = typer.Option(None, help="SAE hookpoint: resid_pre | resid_post | attn_out | mlp_out"),
    activation: str = typer.Option("relu", help="relu (L1, automatic λ) | jumprelu (automatic λ) | topk | batchtopk"),
    target_l0: float = typer.Option(32.0, "--target-l0", help="Target active features per token."),
    k: int = typer.Option(None, help="k for topk/batchtopk (default: target L0)."),
    expansion: int = typer.Option(8, help="n_features = expansion × d_model."),
    n_features: int = typer.Option(None, "--n-features", help="Overrides --expansion."),
    corpus: str = typer.Option("default", help="default (the mix) | default-NAME (mix without NAME) | heldout | a source name | FILE.txt/.jsonl | DIR | GLOB | A,B,... | hf:NAME"),
    encoding: str = typer.Option(None, "--encoding", help="Encoding of corpus files (default utf-8), e.g. latin-1."),
    n_tokens: int = typer.Option(300_000, "--n-tokens", help="Harvested training tokens."),
    epochs: float = typer.Option(3.0, help="Passes over the harvested tokens."),
    batch_size: int = typer.Option(512, "--batch-size"),
    lr: float = typer.Option(1e-3),
    l1: float = typer.Option(None, "--l1", help="Initial λ (default automatic)."),
    context: int = typer.Option(128, help="Tokens per window."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    parallel: str = typer.Option("data", help="Under torchrun: data (DDP) | layer (ranks own layers)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints (0: none)."),
    max_memory: float = typer.Option(None, "--max-memory", help="Resident-memory budget in GB (default unbounded)."),
    out: Path = typer.Option(Path("runs/tc"), help="Output run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                   help="ReLU/JumpReLU: shift encoder biases at the end so L0 equals the target."),
    overwrite: bool = typer.Option(False, "--overwrite", help="An --out that already holds a run is refused unless "
                                   "--resume or --overwrite (which deletes that run folder first) is given."),
) -> None:
    """Harvest activations and train one dictionary per layer, with λ tuned automatically to --target-l0."""
    from .train.config import TrainConfig
    from .train.pipeline import run_training

    tcfg = TrainConfig(
        model=model,
        layers=_parse_layers(layers),
        kind=kind,
        hookpoint=hookpoint,
        activation=activation,
        target_l0=target_l0,
        k=k,
        expansion=expansion,
        n_features=n_features,
        corpus=_corpus_spec(corpus, encoding),
        n_tokens=n_tokens,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        l1_init=l1,
        context=context,
        seed=seed,
        device=device,
        parallel=parallel,
        checkpoint_every=checkpoint_every,
        max_memory_gb=max_memory,
        calibrate=calibrate,
    ).validate()
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both")
    if not resume:
        _clear_or_refuse([out / "train_config.json", out / "run.json"], overwrite, folder=out,
                         how="pass --resume to continue it, --overwrite to start over, or another --out")
    info = run_training(tcfg, out, resume=resume, progress=_progress())
    info.pop("dictionaries", None)
    typer.echo(f"trained {len(tcfg.layers)} dictionaries in {info['seconds_total']:.0f} s -> {out}")


# ---------------------------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder (or one dictionary folder)."),
    model: str = typer.Option(None, help="Model (default: the one recorded in the dictionaries)."),
    corpus: str = typer.Option(None, help="Held-out text (default: the run's held-out windows)."),
    encoding: str = typer.Option(None, "--encoding", help="Encoding of corpus files (default utf-8), e.g. latin-1."),
    n_windows: int = typer.Option(64, "--n-windows", help="Held-out windows of 128 tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per dictionary."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier evaluation of the same text "
                                   "(refused otherwise). With --corpus the figures go to RUN/eval_<corpus>.json, "
                                   "beside the run's own eval.json, which they never replace."),
) -> None:
    """Evaluate dictionaries against the real model: FVU, L0, dead/dense, CE recovered, KL, substitution."""
    from .evaluate.job import eval_path, evaluate_run

    spec = _corpus_spec(corpus, encoding)
    dest = eval_path(run_dir, spec)
    if run_dir.is_dir():
        _clear_or_refuse([dest], overwrite)
    result = evaluate_run(run_dir, model=model, corpus=spec, n_windows=n_windows, progress=_progress())
    for w in result.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        for row in result["dictionaries"]:
            typer.echo(json.dumps(row))
        if result["substitution"]:
            typer.echo(json.dumps({"substitution": result["substitution"], "clean_ce": result["clean_ce"]}))
        return
    from .evaluate.job import format_table

    typer.echo(format_table(result))
    typer.echo(f"written: {dest}")


# ---------------------------------------------------------------------------------------------- run
@app.command()
def run(
    out: Path = typer.Option(Path("runs/default"), help="Run folder; the report goes to OUT/report."),
    preset: str = typer.Option("default", help="default (≤20 min on 2 CPU cores) | quick (a taste of every stage "
                              "in ≤2 min; see README for what it leaves out)"),
    model: str = typer.Option("smollm2-135m", help="Model."),
    corpus: str = typer.Option("default", help="Training text."),
    encoding: str = typer.Option(None, "--encoding", help="Encoding of corpus files (default utf-8), e.g. latin-1."),
    device: str = typer.Option("cpu"),
    max_memory: float = typer.Option(None, "--max-memory", help="Resident-memory budget in GB for training "
                                     "(default unbounded)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over. By default a folder that holds an earlier "
                                   "run of the same settings is resumed: finished stages are kept, training "
                                   "continues from its last checkpoint."),
) -> None:
    """The main job: train transcoders with automatic λ, evaluate them, trace and verify a circuit, write a report."""
    from .job import run_main_job

    summary = run_main_job(out, preset=preset, model=model, corpus=_corpus_spec(corpus, encoding), device=device,
                           progress=_progress(), max_memory_gb=max_memory, overwrite=overwrite)
    typer.echo(summary)


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


@app.command()
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
    positions: str = typer.Option("relative", help="relative: nodes at positions from the end, prompts of one "
                                  "template | any: features at every position, all templates."),
    template: int = typer.Option(0, help="With --positions relative: which task template."),
    seed: int = typer.Option(0),
    verify: bool = typer.Option(False, "--verify", help="Also run `sparsetrace verify` on the result."),
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
                      seed=seed, qk_edges=5 if qk else 0).validate()
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
    typer.echo(f"graph: replacement score {gs.get('replacement', float('nan')):.3f}, completeness "
               f"{gs.get('completeness', float('nan')):.3f} (pruned: {ps.get('replacement', float('nan')):.3f} / "
               f"{ps.get('completeness', float('nan')):.3f}); exactness max|dlogit| {doc.get('exactness', float('nan')):.2e}")
    if ec.get("frozen"):
        typer.echo(f"edge check ({ec['n']} strongest edges, finite differences): max rel err "
                   f"{ec['frozen']['max_rel_err']:.2e} frozen; sign agreement with live attention "
                   f"{ec.get('causal_agreement', {}).get('sign_agreement', float('nan')):.0%}")
    typer.echo(f"circuit ({len(doc['circuit'])} features): " + ", ".join(doc["circuit"]))
    typer.echo(f"written: {out}/graph.json, {out}/circuit.json")
    if verify:
        typer.echo(format_verify(verify_trace(lm, dicts, out, log=_say)))


@app.command(name="verify")
def verify_cmd(
    trace_dir: Path = typer.Argument(..., help="Folder written by `sparsetrace trace`."),
    dictionaries: list[Path] = typer.Option(None, "--dictionaries", "-d", help="Default: those recorded by trace."),
    model: str = typer.Option(None, help="Default: the model recorded by trace."),
    mode: str = typer.Option(None, help="mean | zero | patch (default: the trace's)."),
    max_features: int = typer.Option(None, "--max-features", help="Verify only the first N circuit features."),
    n_prompts: int = typer.Option(None, "--n-prompts"),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print verify.json."),
) -> None:
    """Faithfulness, completeness and specificity of a traced circuit, by ablation inside the real model."""
    from .intervene.circuit_job import format_verify, read_circuit, verify_trace

    doc = read_circuit(trace_dir)
    paths = dictionaries or [Path(p) for p in doc.get("dictionaries") or [] if p]
    lm, dicts = _dictionaries_and_model(paths, model or doc.get("model"), device)
    res = verify_trace(lm, dicts, trace_dir, mode=mode, max_features=max_features, n_prompts=n_prompts, log=_say)
    if as_json:
        typer.echo((trace_dir / "verify.json").read_text(encoding="utf-8").strip())
    else:
        typer.echo(format_verify(res))


@app.command()
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


@app.command(name="export-graph")
def export_graph(
    graph: Path = typer.Argument(..., help="A graph.json written by `sparsetrace trace`."),
    out: Path = typer.Option(..., help="Output JSON (circuit-tracer / Neuronpedia graph format)."),
    slug: str = typer.Option(None, help="Graph slug (default from the prompt)."),
) -> None:
    """Export an attribution graph as circuit-tracer / Neuronpedia graph JSON."""
    from .attribute.export import export_graph_file

    dest = export_graph_file(graph, out, slug=slug)
    typer.echo(f"written: {dest}")


@app.command(name="export")
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


@app.command()
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


# ---------------------------------------------------------------------------------------------- interpret
@app.command()
def explain(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    layer: int = typer.Option(..., help="Layer whose dictionary to explain."),
    features: str = typer.Option("random:100", help="0:200 | 3,17,99 | random:120 (live features) | all"),
    n_tokens: int = typer.Option(60_000, "--n-tokens", help="Corpus tokens for the dashboards."),
    corpus: str = typer.Option(None, help="Corpus (default: the run's)."),
    encoding: str = typer.Option(None, "--encoding", help="Encoding of corpus files (default utf-8), e.g. latin-1."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Causally verify each label."),
    promoted: str = typer.Option("steered", help="Labels' promoted outputs: steered (measured by steering on the "
                                 "top examples) | direct (decoder row through the unembedding)."),
    labeler: str = typer.Option("builtin", help="Who writes the labels: builtin | local:PATH (a transformers model "
                                "folder) | openai:URL[#MODEL] (an OpenAI-compatible server; key from OPENAI_API_KEY)."),
    seed: int = typer.Option(0),
    model: str = typer.Option(None),
    device: str = typer.Option("cpu"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the layer's earlier dashboards "
                                   "(RUN/features/LNN, refused otherwise)."),
) -> None:
    """Feature dashboards, labels, and a causal verdict for each label (tested on held-out windows)."""
    from .interpret.explain_job import explain_layer, find_layer_dictionary, format_explain

    if promoted not in ("steered", "direct"):
        raise ConfigError(f"--promoted '{promoted}' is unknown; expected steered or direct")
    from .interpret.llm_labelers import make_labeler

    make_labeler(labeler, promoted=promoted)  # a bad --labeler fails before the model loads
    folder = find_layer_dictionary(run_dir, layer)
    feats = run_dir / "features" / f"L{layer:02d}"
    _clear_or_refuse([feats / "summary.json", feats / "index.json"], overwrite, folder=feats)
    lm, _ = _dictionaries_and_model([folder], model, device)
    summary = explain_layer(lm, run_dir, layer, features, n_tokens=n_tokens, corpus=_corpus_spec(corpus, encoding),
                            verify=verify, promoted=promoted, seed=seed, labeler=labeler, progress=_progress(), log=_say)
    typer.echo(format_explain(summary))
    typer.echo(f"written: {run_dir}/features/L{layer:02d}/")


@app.command()
def align(
    run1: Path = typer.Argument(..., help="First run folder."),
    run2: Path = typer.Argument(..., help="Second run folder (e.g. another seed)."),
    layer: int = typer.Option(None, help="Layer to align (default: the first one both runs have)."),
    threshold: float = typer.Option(0.7, help="Similarity above which a pair counts as matched."),
    n_windows: int = typer.Option(64, "--n-windows", help="Held-out windows for firing densities (0: none)."),
    out: Path = typer.Option(None, help="Where to write align.json (default RUN1/align.json)."),
    device: str = typer.Option("cpu"),
) -> None:
    """Match the features of two runs' dictionaries; matched fraction by firing-frequency bucket."""
    from .interpret.explain_job import align_runs, feature_densities, find_layer_dictionary, format_align

    for r in (run1, run2):
        if not r.is_dir():
            raise ConfigError(f"run folder '{r}' does not exist")
    dens = None
    if n_windows > 0:
        from .dictionary.load import load_dictionary
        from .evaluate.job import heldout_windows

        res_layer = layer
        if res_layer is None:
            from .dictionary.io import find_dictionaries
            from .interpret.explain_job import _layer_of

            l2 = {_layer_of(p) for p in find_dictionaries(run2)}
            common = sorted(x for x in (_layer_of(p) for p in find_dictionaries(run1)) if x in l2)
            res_layer = common[0] if common else None
        if res_layer is not None:
            folder = find_layer_dictionary(run1, res_layer)
            lm, _ = _dictionaries_and_model([folder], None, device)
            d1 = load_dictionary(folder, device=lm.device)
            dens = feature_densities(lm, d1, heldout_windows(run1, lm, None, n_windows))
    res = align_runs(run1, run2, layer=layer, threshold=threshold, out=out, densities=dens)
    typer.echo(format_align(res))


# ---------------------------------------------------------------------------------------------- report / serve
@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders (or a folder of runs)."),
    out: Path = typer.Option(Path("report"), help="Output folder for the static site."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild over a report already in --out (refused "
                                   "otherwise)."),
    upstream_seconds: float = typer.Option(60.0, "--upstream-seconds", help="Time budget per run for the feature "
                                           "pages' upstream panel (weight-only attribution; loads the model); 0 = off."),
) -> None:
    """Build the static HTML report (opens from disk, no network)."""
    from .report.html import build_report

    _clear_or_refuse([out / "index.html"], overwrite)
    dirs: list[Path] = []
    for d in run_dirs:
        if not d.exists():
            raise ConfigError(f"run folder '{d}' does not exist")
        if (d / "run.json").exists() or (d / "eval.json").exists():
            dirs.append(d)
        else:
            subs = sorted(p.parent for p in d.glob("*/run.json"))
            dirs.extend(subs or [d])
    index = build_report(dirs, out, upstream=upstream_seconds > 0, upstream_budget_s=upstream_seconds)
    typer.echo(f"report written: {index}")


@app.command()
def serve(
    root: Path = typer.Argument(Path("report"), help="Report folder to serve."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback unless --allow-remote)."),
    port: int = typer.Option(8000),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback bind address."),
) -> None:
    """Serve a report read-only on 127.0.0.1."""
    from .report.server import serve as _serve

    if not root.is_dir():
        raise ConfigError(f"report folder '{root}' does not exist; build one with `sparsetrace report`")
    _serve(root, host=host, port=port, allow_remote=allow_remote)


def command():
    """The click command tree of ``app`` with every option checked by :mod:`sparsetrace.cli_options`."""
    import typer.main

    from .cli_options import install

    return install(typer.main.get_command(app))


def main() -> None:
    try:
        from typer._click import exceptions as click_exc
    except ImportError:  # typer < 0.20 uses the click package
        from click import exceptions as click_exc
    try:
        rv = command().main(args=sys.argv[1:], prog_name="sparsetrace", standalone_mode=False)
    except SparsetraceError as e:
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(e.exit_code) from None
    except click_exc.ClickException as e:  # bad flags, unknown command: one line, not a usage box
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        typer.echo(f"error: {e.format_message()}{where}".replace("\n", " "), err=True)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, getattr(click_exc, "Abort", KeyboardInterrupt)):
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    if isinstance(rv, int) and rv:
        raise SystemExit(rv)


if __name__ == "__main__":
    main()
