"""`sparsetrace run`: the main job on the embedded default, end to end.

train transcoders (automatic λ per layer) -> evaluate -> trace + verify a circuit -> explain features
-> HTML report. Each stage writes its artifacts into the run folder as it finishes, so a stage that
fails leaves the earlier ones usable.

Re-running the job on the same folder resumes it. A finished stage leaves a marker ``.job/STAGE.json`` holding
the key of its inputs (the job's settings and the markers of the stages it reads) and the sha256 of every file
it wrote; a stage whose marker is valid is skipped, and interrupted training continues from its last
checkpoint. A folder that holds a run of other settings is refused unless ``overwrite`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .dictionary.io import atomic_write_text
from .errors import ConfigError, DataError
from .model.adapter import LanguageModel
from .util.hashing import sha256_bytes, sha256_file


@dataclass
class Preset:
    layers: list[int] | str  # "all": a transcoder on every layer (the full replacement)
    n_tokens: int
    epochs: float
    eval_windows: int
    dashboard_features: int
    dashboard_tokens: int
    circuit_prompts: int = 32
    graph_prompts: int = 4
    spearman_features: int = 30
    circuit_features: int = 20
    verify_labels: bool = True
    checkpoint_every: int = 200
    batch_size: int = 512
    expansion: int = 8
    edge_checks: int = 100  # finite-difference checks of the strongest graph edges
    promoted: str = "steered"  # labels' promoted outputs: steered (measured) | direct (decoder row, cheaper)
    upstream_seconds: float = 60.0  # the report's upstream panel: time budget per run (0: none)
    explain_layers: int = 3  # dashboards for the circuit's layers (the ones holding most circuit features), at most this many


PRESETS = {
    # the full replacement: a transcoder on every MLP of the model, trained from one streamed pass, evaluated
    # all at once, and the IOI circuit traced through it; <= 20 minutes on 2 CPU cores (README gives the measured time)
    "default": Preset(layers="all", n_tokens=200_000, epochs=1.0, eval_windows=64, dashboard_features=20,
                      dashboard_tokens=30_000, circuit_prompts=24, graph_prompts=2, spearman_features=20,
                      expansion=2, batch_size=256),
    # the earlier default: transcoders on two layers, three epochs over 300k tokens (the other MLPs stay as
    # error nodes in every graph)
    "two-layer": Preset(layers=[3, 6], n_tokens=300_000, epochs=3.0, eval_windows=64, dashboard_features=30,
                        dashboard_tokens=40_000, circuit_prompts=24, graph_prompts=2, spearman_features=20),
    # a taste of every stage in <= 2 minutes: one layer, half the dictionary width, 1/15 of the tokens seen
    # once, a small circuit verified on few prompts, a few dashboards whose labels are neither steered nor
    # causally checked
    "quick": Preset(layers=[3], n_tokens=20_000, epochs=1.0, eval_windows=3, dashboard_features=8,
                    dashboard_tokens=4_000, circuit_prompts=4, graph_prompts=1, spearman_features=3,
                    circuit_features=8, verify_labels=False, batch_size=256, expansion=4, edge_checks=10,
                    promoted="direct", upstream_seconds=10.0),
}

STAGES = ("train", "evaluate", "circuit", "explain", "report")
_MARKERS = ".job"
# test hook: SIGKILL this process in the middle of the named stage (tests/test_resume_run.py)
_KILL_ENV = "SPARSETRACE_TEST_KILL_IN"


def _say(msg: str) -> None:
    from .util.cache import log

    log(msg)


# ------------------------------------------------------------------------------------------ stage markers
def _marker(out: Path, stage: str) -> Path:
    return out / _MARKERS / f"{stage}.json"


def _files_under(out: Path, rels: list[str]) -> dict[str, str]:
    """{relative path: sha256} of the files ``rels`` name (a folder: every file under it)."""
    found: dict[str, str] = {}
    for rel in rels:
        p = out / rel
        paths = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for x in paths:
            found[x.relative_to(out).as_posix()] = sha256_file(x)
    return found


def _stage_done(out: Path, stage: str, key: str) -> dict | None:
    """The stage's marker when it finished with inputs ``key`` and every file it wrote is unchanged."""
    try:
        meta = json.loads(_marker(out, stage).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("files"), dict):
        return None
    for rel, digest in meta["files"].items():
        p = out / rel
        try:
            if not p.is_file() or sha256_file(p) != digest:
                return None
        except OSError:
            return None
    return meta


def _finish(out: Path, stage: str, key: str, rels: list[str], **extra) -> dict:
    meta = {"stage": stage, "key": key, "files": _files_under(out, rels), **extra}
    meta["digest"] = sha256_bytes(json.dumps(meta["files"], sort_keys=True).encode())
    _marker(out, stage).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_marker(out, stage), json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def _key(*parts) -> str:
    return sha256_bytes(json.dumps(parts, sort_keys=True, default=str).encode())


def _test_kill(stage: str) -> None:
    if os.environ.get(_KILL_ENV) == stage:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------ the job
def _settings(preset: str, p: Preset, model: str, corpus: str) -> dict:
    return {"preset": preset, **asdict(p), "model": model, "corpus": corpus}


def _claim_folder(out: Path, settings: dict, overwrite: bool) -> bool:
    """Prepare ``out``; True when it holds an earlier run of the same settings (resumed)."""
    path = out / _MARKERS / "settings.json"
    if overwrite and out.exists():
        _say(f"--overwrite: removing {out} and starting over")
        shutil.rmtree(out)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            saved = None
        started = [x for x in out.iterdir() if x.name != _MARKERS] or [x for x in path.parent.iterdir() if x != path]
        if saved != settings and not started:  # an earlier attempt stopped before writing anything: start anew
            atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")
            return False
        if saved != settings:
            raise ConfigError(f"'{out}' holds a run with other settings ({path}); pass --overwrite to start over "
                              f"or choose another --out")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"'{out}' is not empty and holds no `sparsetrace run`; pass --overwrite to replace it "
                          f"or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return False


def run_main_job(
    out: Path, *, preset: str = "default", model: str = "smollm2-135m", corpus: str = "default",
    device: str = "cpu", progress: bool = True, max_memory_gb: float | None = None, overwrite: bool = False,
    model_dtype: str = "float32",
) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"--preset '{preset}' is unknown; expected one of {', '.join(PRESETS)}")
    if model_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--model-dtype '{model_dtype}' is unknown; expected float32 or bfloat16")
    p = PRESETS[preset]
    out = Path(out)
    settings = _settings(preset, p, model, corpus)
    if model_dtype != "float32":  # (absent for float32, so runs made before the option still resume)
        settings["model_dtype"] = model_dtype
    if _claim_folder(out, settings, overwrite):
        done = [s for s in STAGES if _marker(out, s).is_file()]
        _say(f"resuming the run in {out} (finished earlier: {', '.join(done) or 'no stage'}); "
             f"--overwrite starts over")
    t0 = time.time()
    timings: dict[str, float] = {}
    ran: list[str] = []

    _say(f"loading model {model}")
    lm = LanguageModel.load(model, device=device)
    if p.layers == "all":
        layers = list(range(lm.n_layers))
    else:
        layers = [layer for layer in p.layers if layer < lm.n_layers] or [lm.n_layers // 2]
    ctx = _Ctx(out, lm, p, progress, timings, ran)

    train = ctx.stage("train", _key(settings, layers), lambda: _train_stage(ctx, layers, model, corpus, device,
                                                                           max_memory_gb, model_dtype))
    ev = ctx.stage("evaluate", _key(train["digest"], p.eval_windows), lambda: _evaluate_stage(ctx))
    circ = ctx.stage("circuit", _key(train["digest"], settings), lambda: _circuit_stage(ctx))
    expl = ctx.stage("explain", _key(train["digest"], circ["digest"], settings), lambda: _explain_stage(ctx))
    ctx.stage("report", _key(train["digest"], ev["digest"], circ["digest"], expl["digest"]),
              lambda: _report_stage(ctx))
    timings["total"] = time.time() - t0
    index = out / "report" / "index.html"
    stages_done = ["train", "evaluate"] + (["circuit"] if circ.get("ok") else []) + (
        ["explain"] if expl.get("ok") else [])
    ctx.cpu["total"] = time.process_time()
    summary = {"stages": stages_done, "ran": ran, "seconds": {k: round(v, 1) for k, v in timings.items()},
               "cpu_seconds": {k: round(v, 1) for k, v in ctx.cpu.items()},
               "report": str(index), "peak_rss_mb": _peak_rss_mb()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    lines = [_table(out)]
    for part in (_circuit_text(out) if circ.get("ok") else None, _explain_text(out) if expl.get("ok") else None):
        if part:
            lines += ["", part]
    lines += ["", f"report: {index}", f"total time: {timings['total']:.0f} s, peak RSS {summary['peak_rss_mb']:.0f} MB"]
    text = "\n".join(lines)
    atomic_write_text(out / "summary.txt", text + "\n")
    return text


@dataclass
class _Ctx:
    out: Path
    lm: LanguageModel
    p: Preset
    progress: bool
    timings: dict
    ran: list
    cpu: dict = field(default_factory=dict)  # CPU seconds (all threads) per stage

    def stage(self, name: str, key: str, body) -> dict:
        """Run ``body`` (returning (files written, extra marker fields)) unless the stage finished with ``key``."""
        n = STAGES.index(name) + 1
        meta = _stage_done(self.out, name, key)
        if meta is not None:
            _say(f"stage {n}/5 ({name}): finished earlier with the same inputs, skipped")
            return meta
        _marker(self.out, name).unlink(missing_ok=True)
        t, cpu = time.time(), time.process_time()
        rels, extra = body()
        self.timings[name] = time.time() - t
        self.cpu[name] = time.process_time() - cpu
        self.ran.append(name)
        return _finish(self.out, name, key, rels, **extra)


def _train_stage(ctx: _Ctx, layers: list[int], model: str, corpus: str, device: str, max_memory_gb,
                 model_dtype: str = "float32") -> tuple:
    """Train the transcoders. ``model_dtype`` bfloat16: harvest from a bf16 copy of the model (loaded by the
    training pipeline); every later stage measures against the float32 model."""
    from .train.config import TrainConfig
    from .train.pipeline import run_training

    p, out = ctx.p, ctx.out
    tcfg = TrainConfig(
        model=model, layers=layers, kind="transcoder", activation="relu", target_l0=32.0, corpus=corpus,
        n_tokens=p.n_tokens, epochs=p.epochs, device=device, max_memory_gb=max_memory_gb,
        checkpoint_every=p.checkpoint_every, batch_size=p.batch_size, expansion=p.expansion, model_dtype=model_dtype,
    )
    lm = ctx.lm if model_dtype == "float32" else None
    resume = (out / "train_config.json").is_file()
    how = "resuming from its last checkpoint" if resume else "automatic λ"
    where = f"every layer (0-{layers[-1]})" if p.layers == "all" else f"layers {layers}"
    _say(f"stage 1/5: training transcoders on {where} ({p.n_tokens:,} tokens, target L0 32, {how})")
    if os.environ.get(_KILL_ENV) == "train":  # test hook: stop after half the steps, as a kill would
        run_training(tcfg, out, lm=lm, progress=ctx.progress, resume=resume,
                     stop_at_step=max(1, tcfg.total_steps // 2))
        _test_kill("train")
    run_training(tcfg, out, lm=lm, progress=ctx.progress, resume=resume)
    from .dictionary.io import find_dictionaries

    rels = ["train_config.json", "run.json", "heldout_tokens.safetensors"]
    rels += [f.relative_to(out).as_posix() for f in find_dictionaries(out)]
    return rels, {}


def _evaluate_stage(ctx: _Ctx) -> tuple:
    from .dictionary.io import find_dictionaries
    from .evaluate.job import evaluate_run

    _say("stage 2/5: evaluating against the real model")
    _test_kill("evaluate")
    evaluate_run(ctx.out, n_windows=ctx.p.eval_windows, lm=ctx.lm, progress=ctx.progress)
    return ["eval.json"] + [(f / "metrics.json").relative_to(ctx.out).as_posix() for f in find_dictionaries(ctx.out)], {}


def _circuit_stage(ctx: _Ctx) -> tuple:
    """Trace the IOI circuit through the trained transcoders and verify it causally (circuits/ioi/)."""
    from .intervene.circuit_job import TraceConfig, load_dictionaries, trace_circuit, verify_trace

    p = ctx.p
    _say("stage 3/5: tracing the IOI circuit (attribution graphs) and verifying it by ablation")
    dicts = load_dictionaries(ctx.out, ctx.lm)
    cfg = TraceConfig(task="ioi", n_prompts=p.circuit_prompts, n_graph_prompts=p.graph_prompts,
                      max_features=p.circuit_features, n_spearman=p.spearman_features, n_edge_checks=p.edge_checks)
    folder = ctx.out / "circuits" / "ioi"
    try:
        trace_circuit(ctx.lm, dicts, cfg, folder, log=_say)
    except DataError as e:  # e.g. a tokenizer whose names are not single tokens: skip, keep the rest
        _say(f"circuit stage skipped: {e}")
        return [], {"ok": False, "skipped": str(e)}
    _test_kill("circuit")
    verify_trace(ctx.lm, dicts, folder, max_edge_checks=min(20, p.edge_checks), log=_say)
    return ["circuits/ioi"], {"ok": True}


def _circuit_text(out: Path) -> str | None:
    from .intervene.circuit_job import format_verify

    try:
        doc = json.loads((out / "circuits" / "ioi" / "circuit.json").read_text(encoding="utf-8"))
        res = json.loads((out / "circuits" / "ioi" / "verify.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    gs = doc.get("graph_scores") or {}
    head = (f"IOI circuit ({len(doc['circuit'])} features; clean logit diff {doc['baseline']:.2f}; graph replacement "
            f"score {gs.get('replacement', float('nan')):.2f}, exactness {doc.get('exactness', float('nan')):.1e})")
    return head + "\n" + format_verify(res)


def _explain_stage(ctx: _Ctx) -> tuple:
    """Dashboards, built-in labels and causal verdicts for random live features of each trained layer, plus
    the traced circuit's features (so that every circuit node in the report opens a dashboard)."""
    from .interpret.explain_job import explain_layer

    p, out = ctx.p, ctx.out
    circuit = _circuit_features(out / "circuits" / "ioi" / "circuit.json")
    checks = "labels + causal label checks" if p.verify_labels else "labels (not causally checked)"
    _say(f"stage 4/5: feature dashboards + {checks} ({p.dashboard_features} random live features per layer and "
         f"the circuit's, {p.dashboard_tokens:,} tokens)")
    layers = _explain_layers(_trained_layers(out), circuit, p.explain_layers)
    shutil.rmtree(out / "features", ignore_errors=True)  # a half-written earlier attempt
    for i, layer in enumerate(layers):
        explain_layer(ctx.lm, out, layer, f"random:{p.dashboard_features}", n_tokens=p.dashboard_tokens,
                      extra=circuit.get(layer, []), verify=p.verify_labels, promoted=p.promoted,
                      progress=ctx.progress, log=_say)
        if i == 0:
            _test_kill("explain")
    return ["features"], {"ok": bool(layers)}


def _explain_text(out: Path) -> str | None:
    from .interpret.explain_job import format_explain

    lines = []
    for layer in _trained_layers(out):
        try:
            lines.append(format_explain(json.loads(
                (out / "features" / f"L{layer:02d}" / "summary.json").read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return "\n".join(lines) or None


def _report_stage(ctx: _Ctx) -> tuple:
    from .report.html import build_report

    _say("stage 5/5: writing the HTML report")
    up = ctx.p.upstream_seconds
    build_report([ctx.out], ctx.out / "report", upstream=up > 0, upstream_budget_s=up)
    _test_kill("report")
    return ["report"], {}


def _table(out: Path) -> str:
    from .evaluate.job import format_table

    return format_table(json.loads((out / "eval.json").read_text(encoding="utf-8")))


def _circuit_features(path: Path) -> dict[int, list[int]]:
    """{layer: [feature]} of a circuit.json (empty when there is none)."""
    from .intervene.features import parse_node_id

    try:
        nodes = json.loads(path.read_text(encoding="utf-8")).get("circuit") or []
    except (OSError, ValueError, AttributeError):
        return {}
    out: dict[int, list[int]] = {}
    for n in nodes:
        try:
            node = parse_node_id(str(n))
        except DataError:
            continue
        out.setdefault(node.layer, []).append(node.feature)
    return out


def _explain_layers(trained: list[int], circuit: dict[int, list[int]], most: int) -> list[int]:
    """Every trained layer when there are few; else the layers holding most circuit features (then the middle)."""
    if len(trained) <= most:
        return trained
    ranked = sorted((layer for layer in circuit if layer in trained), key=lambda x: (-len(circuit[x]), x))[:most]
    if not ranked:
        ranked = [trained[len(trained) // 2]]
    return sorted(ranked)


def _trained_layers(out: Path) -> list[int]:
    from .dictionary.io import find_dictionaries
    from .interpret.explain_job import _layer_of

    return sorted({x for x in (_layer_of(f) for f in find_dictionaries(out)) if x is not None})


def _peak_rss_mb() -> float:
    """This process's peak resident set size so far (MB)."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux
