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
from .errors import ConfigError
from .model.adapter import LanguageModel


@dataclass
class Preset:
    layers: list[int]
    n_tokens: int
    epochs: float
    eval_windows: int
    dashboard_features: int
    dashboard_tokens: int


PRESETS = {
    "default": Preset(layers=[3, 6], n_tokens=300_000, epochs=3.0, eval_windows=24, dashboard_features=120, dashboard_tokens=60_000),
    "quick": Preset(layers=[3], n_tokens=40_000, epochs=2.0, eval_windows=6, dashboard_features=24, dashboard_tokens=8_000),
}


def _say(msg: str) -> None:
    import sys

    print(f"[sparsetrace] {msg}", file=sys.stderr, flush=True)


def run_main_job(
    out: Path, *, preset: str = "default", model: str = "smollm2-135m", corpus: str = "default",
    device: str = "cpu", progress: bool = True,
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
        corpus=corpus, n_tokens=p.n_tokens, epochs=p.epochs, device=device,
    )
    _say(f"stage 1/4: training transcoders on layers {layers} ({p.n_tokens:,} tokens, target L0 32, automatic λ)")
    t = time.time()
    run_training(tcfg, out, lm=lm, progress=progress)
    timings["train"] = time.time() - t

    _say("stage 2/4: evaluating against the real model")
    from .evaluate.job import evaluate_run, format_table

    t = time.time()
    result = evaluate_run(out, n_windows=p.eval_windows, lm=lm, progress=progress)
    timings["evaluate"] = time.time() - t
    table = format_table(result)

    stages_done = ["train", "evaluate"]
    extra = _circuit_stage(out, lm, progress, timings)
    if extra:
        stages_done.append("circuit")
    if _explain_stage(out, lm, p, timings):
        stages_done.append("explain")

    _say("stage 4/4: writing the HTML report")
    from .report.html import build_report

    t = time.time()
    index = build_report([out], out / "report")
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    summary = {"stages": stages_done, "seconds": {k: round(v, 1) for k, v in timings.items()}, "report": str(index)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    lines = [table]
    if extra:
        lines += ["", extra]
    lines += ["", f"report: {index}", f"total time: {timings['total']:.0f} s"]
    text = "\n".join(lines)
    atomic_write_text(out / "summary.txt", text + "\n")
    return text


def _circuit_stage(out: Path, lm: LanguageModel, progress: bool, timings: dict) -> str | None:
    """Trace and verify the IOI circuit (filled in when attribution and intervention are available)."""
    return None


def _explain_stage(out: Path, lm: LanguageModel, p: Preset, timings: dict) -> bool:
    return False
