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


def _parse_layers(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise ConfigError(f"--layers '{text}' is invalid; expected integers like 3,6 or 2-5")
            out.extend(range(int(a), int(b) + 1))
        elif part.lstrip("-").isdigit():
            out.append(int(part))
        else:
            raise ConfigError(f"--layers '{text}' is invalid; expected integers like 3,6 or 2-5")
    return out


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
    corpus: str = typer.Option("default", help="default | austen | botchan | tinystories | FILE.txt/.jsonl | GLOB | hf:NAME"),
    n_tokens: int = typer.Option(300_000, "--n-tokens", help="Harvested training tokens."),
    epochs: float = typer.Option(3.0, help="Passes over the harvested tokens."),
    batch_size: int = typer.Option(512, "--batch-size"),
    lr: float = typer.Option(1e-3),
    l1: float = typer.Option(None, "--l1", help="Initial λ (default automatic)."),
    context: int = typer.Option(128, help="Tokens per window."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    parallel: str = typer.Option("data", help="Under torchrun: data (DDP) | layer (ranks own layers)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints."),
    out: Path = typer.Option(Path("runs/tc"), help="Output run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
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
        corpus=corpus,
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
    ).validate()
    info = run_training(tcfg, out, resume=resume, progress=_progress())
    info.pop("dictionaries", None)
    typer.echo(f"trained {len(tcfg.layers)} dictionaries in {info['seconds_total']:.0f} s -> {out}")


# ---------------------------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder (or one dictionary folder)."),
    model: str = typer.Option(None, help="Model (default: the one recorded in the dictionaries)."),
    corpus: str = typer.Option(None, help="Held-out text (default: the run's held-out windows)."),
    n_windows: int = typer.Option(32, "--n-windows", help="Held-out windows of 128 tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per dictionary."),
) -> None:
    """Evaluate dictionaries against the real model: FVU, L0, dead/dense, CE recovered, KL, substitution."""
    from .evaluate.job import evaluate_run

    result = evaluate_run(run_dir, model=model, corpus=corpus, n_windows=n_windows, progress=_progress())
    if as_json:
        for row in result["dictionaries"]:
            typer.echo(json.dumps(row))
        if result["substitution"]:
            typer.echo(json.dumps({"substitution": result["substitution"], "clean_ce": result["clean_ce"]}))
        return
    from .evaluate.job import format_table

    typer.echo(format_table(result))


# ---------------------------------------------------------------------------------------------- run
@app.command()
def run(
    out: Path = typer.Option(Path("runs/default"), help="Run folder; the report goes to OUT/report."),
    preset: str = typer.Option("default", help="default (≤20 min on 2 CPU cores) | quick (a few minutes)"),
    model: str = typer.Option("smollm2-135m", help="Model."),
    corpus: str = typer.Option("default", help="Training text."),
    device: str = typer.Option("cpu"),
) -> None:
    """The main job: train transcoders with automatic λ, evaluate them, trace and verify a circuit, write a report."""
    from .job import run_main_job

    summary = run_main_job(out, preset=preset, model=model, corpus=corpus, device=device, progress=_progress())
    typer.echo(summary)


# ---------------------------------------------------------------------------------------------- report / serve
@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders (or a folder of runs)."),
    out: Path = typer.Option(Path("report"), help="Output folder for the static site."),
) -> None:
    """Build the static HTML report (opens from disk, no network)."""
    from .report.html import build_report

    dirs: list[Path] = []
    for d in run_dirs:
        if not d.exists():
            raise ConfigError(f"run folder '{d}' does not exist")
        if (d / "run.json").exists() or (d / "eval.json").exists():
            dirs.append(d)
        else:
            subs = sorted(p.parent for p in d.glob("*/run.json"))
            dirs.extend(subs or [d])
    index = build_report(dirs, out)
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


def main() -> None:
    try:
        app(standalone_mode=True)
    except SparsetraceError as e:
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
