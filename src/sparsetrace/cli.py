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
from .cli_options import parse_target_l0 as _parse_target_l0
from .cli_options import progress_enabled as _progress
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




# ---------------------------------------------------------------------------------------------- train
def _parse_minutes(text: str | None) -> list[float]:
    if text is None:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--snapshot-at '{text}' is invalid; expected minutes separated by commas, e.g. 2,5") from None


@app.command()
def train(
    model: str = typer.Option("smollm2-135m", help="Short name, local folder/GGUF, or hub name."),
    layers: str = typer.Option("3,6", help="Layers to train: all, or a list and/or ranges, e.g. 3,6 or 0-29 or 0-3,6,10-12."),
    kind: str = typer.Option("transcoder", help="sae | transcoder | skip_transcoder | clt (cross-layer "
                             "transcoder over every layer: --layers all; activation relu, jumprelu or topk)"),
    hookpoint: str = typer.Option(None, help="SAE hookpoint: resid_pre | resid_post | attn_out | mlp_out"),
    activation: str = typer.Option("relu", help="relu (L1, automatic λ) | jumprelu (automatic λ) | topk | batchtopk"),
    target_l0: str = typer.Option("32", "--target-l0", help="Target active features per token: one value, or one "
                                  "per layer (comma list in the order of --layers)."),
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
    store: str = typer.Option("auto", "--store", help="Activations: stream (from the model's forward passes, "
                              "bounded memory, no disk) | disk (harvest to a cache once) | auto (disk when small)."),
    preact_coef: float = typer.Option(0.0, "--preact-coef", help="CLT: pre-activation loss against dead features."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype", help="The dictionaries' matmuls: float32 | "
                                      "bfloat16 (float32 accumulation; parameters, optimizer and loss stay float32)."),
    model_dtype: str = typer.Option("float32", "--model-dtype", help="The language model's weights while harvesting: "
                                    "float32 | bfloat16 (2-4x faster forwards on CPUs with AMX/AVX512-BF16 and on "
                                    "GPUs; the run's own metrics then come from that model too)."),
    out: Path = typer.Option(Path("runs/tc"), help="Output run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                   help="ReLU/JumpReLU: shift encoder biases at the end so L0 equals the target."),
    overwrite: bool = typer.Option(False, "--overwrite", help="An --out that already holds a run is refused unless "
                                   "--resume or --overwrite (which deletes that run folder first) is given."),
    time_budget: float = typer.Option(None, "--time-budget", help="Minutes of wall time for the whole run (load, "
                                      "harvest, train): stops then and saves; LR schedule follows elapsed time; "
                                      "--n-tokens becomes an upper bound. Cannot be resumed."),
    snapshot_at: str = typer.Option(None, "--snapshot-at", help="Wall minutes at which to save uncalibrated copies "
                                    "of the dictionaries to OUT/snapshots/<m>min/, e.g. 2,5."),
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
        target_l0=_parse_target_l0(target_l0),
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
        store=store,
        preact_coef=preact_coef,
        time_budget=time_budget,
        snapshot_at=_parse_minutes(snapshot_at),
        compute_dtype=compute_dtype,
        model_dtype=model_dtype,
    ).validate()
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both")
    if not resume:
        _clear_or_refuse([out / "train_config.json", out / "run.json"], overwrite, folder=out,
                         how="pass --resume to continue it, --overwrite to start over, or another --out")
    info = run_training(tcfg, out, resume=resume, progress=_progress())
    info.pop("dictionaries", None)
    what = f"a cross-layer transcoder over {len(info['layers'])} layers" if tcfg.kind == "clt" else \
        f"{len(info['layers'])} dictionaries"
    typer.echo(f"trained {what} in {info['seconds_total']:.0f} s -> {out}")


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
    replacement: bool = typer.Option(None, "--replacement/--no-replacement", help="Evaluate the full replacement "
                                     "(every replaced MLP substituted at once, by depth). Default: when the run's "
                                     "transcoders cover every layer, or it has a CLT."),
    per_layer_ce: bool = typer.Option(None, "--per-layer-ce/--no-per-layer-ce", help="CE/KL with each dictionary "
                                      "spliced in alone. Default: on, except for a full replacement."),
) -> None:
    """Evaluate dictionaries against the real model: FVU, L0, dead/dense, CE recovered, KL, substitution,
    and the full replacement (every MLP replaced at once) for runs that replace every MLP."""
    from .evaluate.job import eval_path, evaluate_run

    spec = _corpus_spec(corpus, encoding)
    dest = eval_path(run_dir, spec)
    if run_dir.is_dir():
        _clear_or_refuse([dest], overwrite)
    result = evaluate_run(run_dir, model=model, corpus=spec, n_windows=n_windows, progress=_progress(),
                          replacement=replacement, per_layer_ce=per_layer_ce)
    for w in result.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        for row in result["dictionaries"]:
            typer.echo(json.dumps(row))
        if result["substitution"]:
            typer.echo(json.dumps({"substitution": result["substitution"], "clean_ce": result["clean_ce"]}))
        if result.get("replacement"):
            typer.echo(json.dumps({"replacement": result["replacement"]}))
        return
    from .evaluate.job import format_table

    typer.echo(format_table(result))
    typer.echo(f"written: {dest}")


# ---------------------------------------------------------------------------------------------- run
@app.command()
def run(
    out: Path = typer.Option(Path("runs/default"), help="Run folder; the report goes to OUT/report."),
    preset: str = typer.Option("default", help="default (a transcoder on every layer; ≤20 min on 2 CPU cores) | two-layer | quick (a taste of every stage "
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
    model_dtype: str = typer.Option("float32", "--model-dtype", help="The model's weights while harvesting training "
                                    "activations: float32 | bfloat16 (faster on CPUs with AMX/AVX512-BF16 and on "
                                    "GPUs); evaluation, circuits and labels always use the float32 model."),
) -> None:
    """The main job: train transcoders with automatic λ, evaluate them, trace and verify a circuit, write a report."""
    from .job import run_main_job

    summary = run_main_job(out, preset=preset, model=model, corpus=_corpus_spec(corpus, encoding), device=device,
                           progress=_progress(), max_memory_gb=max_memory, overwrite=overwrite,
                           model_dtype=model_dtype)
    typer.echo(summary)



# ---------------------------------------------------------------------------------------------- circuits
from .cli_circuits import (  # noqa: E402
    _dictionaries_and_model,
    _say,
    export_cmd,
    export_graph,
    graph_scores_cmd,
    steer,
    trace,
    upstream,
    verify_cmd,
)

app.command()(trace)
app.command(name="verify")(verify_cmd)
app.command()(steer)
app.command(name="export-graph")(export_graph)
app.command(name="export")(export_cmd)
app.command()(upstream)
app.command(name="graph-scores")(graph_scores_cmd)

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
