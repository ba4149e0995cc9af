"""`sparsetrace run`: the main job on the embedded default, end to end.

train transcoders (automatic λ per layer) -> evaluate -> trace + verify a circuit -> explain features
-> HTML report. Each stage writes its artifacts into the run folder as it finishes, so a stage that
fails leaves the earlier ones usable.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .dictionary.io import atomic_write_text
from .errors import ConfigError, DataError
from .model.adapter import LanguageModel


@dataclass
class Preset:
    layers: list[int]
    n_tokens: int
    epochs: float
    eval_windows: int
    dashboard_features: int
    dashboard_tokens: int
    circuit_prompts: int = 32
    graph_prompts: int = 4
    spearman_features: int = 30


PRESETS = {
    # <= 20 minutes on 2 CPU cores (measured 8 min 19 s, harvest + training 3.7 min of it); the same token
    # budget as `sparsetrace train`'s default
    "default": Preset(layers=[3, 6], n_tokens=300_000, epochs=3.0, eval_windows=24, dashboard_features=30,
                      dashboard_tokens=40_000, circuit_prompts=24, graph_prompts=2, spearman_features=20),
    "quick": Preset(layers=[3], n_tokens=40_000, epochs=2.0, eval_windows=6, dashboard_features=24, dashboard_tokens=8_000,
                    circuit_prompts=8, graph_prompts=2, spearman_features=10),
}


def _say(msg: str) -> None:
    import sys

    print(f"[sparsetrace] {msg}", file=sys.stderr, flush=True)


def run_main_job(
    out: Path, *, preset: str = "default", model: str = "smollm2-135m", corpus: str = "default",
    device: str = "cpu", progress: bool = True, max_memory_gb: float | None = None,
) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"--preset '{preset}' is unknown; expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    t0 = time.time()
    timings: dict[str, float] = {}

    _say(f"loading model {model}")
    lm = LanguageModel.load(model, device=device)
    layers = [layer for layer in p.layers if layer < lm.n_layers] or [lm.n_layers // 2]

    from .train.config import TrainConfig
    from .train.pipeline import run_training

    tcfg = TrainConfig(
        model=model, layers=layers, kind="transcoder", activation="relu", target_l0=32.0,
        corpus=corpus, n_tokens=p.n_tokens, epochs=p.epochs, device=device, max_memory_gb=max_memory_gb,
    )
    _say(f"stage 1/5: training transcoders on layers {layers} ({p.n_tokens:,} tokens, target L0 32, automatic λ)")
    t = time.time()
    run_training(tcfg, out, lm=lm, progress=progress)
    timings["train"] = time.time() - t

    _say("stage 2/5: evaluating against the real model")
    from .evaluate.job import evaluate_run, format_table

    t = time.time()
    result = evaluate_run(out, n_windows=p.eval_windows, lm=lm, progress=progress)
    timings["evaluate"] = time.time() - t
    table = format_table(result)

    stages_done = ["train", "evaluate"]
    extra = _circuit_stage(out, lm, p, progress, timings)
    if extra:
        stages_done.append("circuit")
    explained = _explain_stage(out, lm, p, progress, timings)
    if explained:
        stages_done.append("explain")

    _say("stage 5/5: writing the HTML report")
    from .report.html import build_report

    t = time.time()
    index = build_report([out], out / "report")
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    summary = {"stages": stages_done, "seconds": {k: round(v, 1) for k, v in timings.items()}, "report": str(index),
               "peak_rss_mb": _peak_rss_mb()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    lines = [table]
    for part in (extra, explained):
        if part:
            lines += ["", part]
    lines += ["", f"report: {index}", f"total time: {timings['total']:.0f} s, peak RSS {summary['peak_rss_mb']:.0f} MB"]
    text = "\n".join(lines)
    atomic_write_text(out / "summary.txt", text + "\n")
    return text


def _circuit_stage(out: Path, lm: LanguageModel, p: Preset, progress: bool, timings: dict) -> str | None:
    """Trace the IOI circuit through the trained transcoders and verify it causally (circuits/ioi/)."""
    from .intervene.circuit_job import (
        TraceConfig,
        format_verify,
        load_dictionaries,
        trace_circuit,
        verify_trace,
    )

    _say("stage 3/5: tracing the IOI circuit (attribution graphs) and verifying it by ablation")
    t = time.time()
    dicts = load_dictionaries(out, lm)
    cfg = TraceConfig(task="ioi", n_prompts=p.circuit_prompts, n_graph_prompts=p.graph_prompts,
                      max_features=20, n_spearman=p.spearman_features)
    folder = out / "circuits" / "ioi"
    try:
        doc = trace_circuit(lm, dicts, cfg, folder, log=_say)
    except DataError as e:  # e.g. a tokenizer whose names are not single tokens: skip, keep the rest
        _say(f"circuit stage skipped: {e}")
        return None
    res = verify_trace(lm, dicts, folder, log=_say)
    timings["circuit"] = time.time() - t
    gs = doc.get("graph_scores") or {}
    head = (f"IOI circuit ({len(doc['circuit'])} features; clean logit diff {doc['baseline']:.2f}; graph replacement "
            f"score {gs.get('replacement', float('nan')):.2f}, exactness {doc.get('exactness', float('nan')):.1e})")
    return head + "\n" + format_verify(res)


def _explain_stage(out: Path, lm: LanguageModel, p: Preset, progress: bool, timings: dict) -> str | None:
    """Dashboards, built-in labels and causal verdicts for random live features of each trained layer, plus
    the traced circuit's features (so that every circuit node in the report opens a dashboard)."""
    from .interpret.explain_job import explain_layer, format_explain

    circuit = _circuit_features(out / "circuits" / "ioi" / "circuit.json")
    _say(f"stage 4/5: feature dashboards + labels + causal label checks ({p.dashboard_features} random live "
         f"features per layer and the circuit's, {p.dashboard_tokens:,} tokens)")
    t = time.time()
    lines = []
    for layer in _trained_layers(out):
        summary = explain_layer(lm, out, layer, f"random:{p.dashboard_features}", n_tokens=p.dashboard_tokens,
                                extra=circuit.get(layer, []), progress=progress, log=_say)
        lines.append(format_explain(summary))
    timings["explain"] = time.time() - t
    return "\n".join(lines) if lines else None


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
