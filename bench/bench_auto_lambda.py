"""Does each activation reach --target-l0 through training? Trains one layer per (activation, target) with
`sparsetrace train` and reports, from run.json, the controller's own L0 at the end of training (before the
final bias calibration) and the calibration's shift, then the held-out figures from
`sparsetrace evaluate --json` (L0, FVU before and after calibration, CE recovered vs zero / mean, KL).

Usage: python bench/bench_auto_lambda.py [--activations relu,jumprelu,topk,batchtopk] [--targets 32]
       [--layer 6] [--n-tokens 100000] [--out bench/out/lambda] [--extra "--epochs 2"] [--reuse]
Last line: the worst relative L0 error before calibration across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_one(args, act: str, target: float) -> dict:
    out = Path(args.out) / f"L{args.layer}_{act}_t{target:g}"
    env = {**os.environ, "SPARSETRACE_NO_PROGRESS": "1"}
    t0 = time.time()
    if args.reuse and (out / "run.json").exists():
        return _collect(args, act, target, out, None)
    cmd = [sys.executable, "-m", "sparsetrace.cli", "train", "--model", args.model, "--layers", str(args.layer),
           "--kind", args.kind, "--activation", act, "--target-l0", str(target), "--n-tokens", str(args.n_tokens),
           "--out", str(out), *args.extra.split()]
    subprocess.run(cmd, check=True, env=env)
    return _collect(args, act, target, out, time.time() - t0)


def _collect(args, act: str, target: float, out: Path, train_s: float | None) -> dict:
    """run.json's sparsity record and the held-out evaluation (eval.json when --reuse finds one)."""
    env = {**os.environ, "SPARSETRACE_NO_PROGRESS": "1"}
    info = json.loads((out / "run.json").read_text())
    rec = info["sparsity"][str(args.layer)]
    if args.reuse and (out / "eval.json").exists():
        ev = json.loads((out / "eval.json").read_text())
        m, warnings = ev["dictionaries"][0], [f"warning: {w}" for w in ev.get("warnings", [])]
    else:
        res = subprocess.run([sys.executable, "-m", "sparsetrace.cli", "evaluate", str(out), "--json",
                              "--n-windows", str(args.n_windows)],
                             check=True, capture_output=True, text=True, env=env)
        m = json.loads(res.stdout.splitlines()[0])
        warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    if train_s is None:
        train_s = float(info.get("seconds_total", float("nan")))
    return {"act": act, "target": target, "ctrl_l0": rec["l0_before_calibration"], "shift": rec["calibration_shift"],
            "l0": m["l0"], "fvu": m["fvu"], "fvu_pre": m.get("fvu_before_calibration", m["fvu"]),
            "rec0": m["ce_recovered_vs_zero"], "recm": m["ce_recovered_vs_mean"], "kl": m["kl"],
            "n_warn": len(warnings), "sec": train_s, "warnings": warnings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--activations", default="relu,jumprelu,topk,batchtopk")
    ap.add_argument("--targets", default="32")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--kind", default="transcoder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument("--n-windows", type=int, default=64)
    ap.add_argument("--out", default="bench/out/lambda")
    ap.add_argument("--extra", default="", help="extra flags for `sparsetrace train`")
    ap.add_argument("--reuse", action="store_true",
                    help="keep runs already in --out (run.json; eval.json if there) instead of training again")
    args = ap.parse_args()
    rows = [run_one(args, act, float(t)) for t in args.targets.split(",") for act in args.activations.split(",")]
    print(f"{'activation':>10} {'target':>6} {'L0 ctrl':>8} {'err':>7} {'shift':>8} {'L0 eval':>8} {'FVU pre':>8} "
          f"{'FVU':>6} {'rec0':>6} {'recM':>6} {'KL':>7} {'warn':>4} {'sec':>5}")
    worst = 0.0
    for r in rows:
        err = (r["ctrl_l0"] - r["target"]) / r["target"]
        worst = max(worst, abs(err))
        shift = "-" if r["shift"] is None else f"{r['shift']:+.3f}"
        print(f"{r['act']:>10} {r['target']:6.0f} {r['ctrl_l0']:8.1f} {err:+7.1%} {shift:>8} {r['l0']:8.1f} "
              f"{r['fvu_pre']:8.3f} {r['fvu']:6.3f} {r['rec0']:6.1%} {r['recm']:6.1%} {r['kl']:7.4f} "
              f"{r['n_warn']:4d} {r['sec']:5.0f}")
    for r in rows:
        for w in r["warnings"]:
            print(f"  {r['act']}: {w}")
    print(f"worst relative L0 error before calibration: {worst:.1%}")


if __name__ == "__main__":
    main()
