"""Does the automatic λ land on --target-l0? Trains one layer at several targets with no other flag
and reports the held-out L0 (via `sparsetrace train` / `sparsetrace evaluate --json`).

Usage: python bench/bench_auto_lambda.py [--layer 6] [--targets 16,32,64] [--out bench/out/lambda]
Last line: the worst relative L0 error across targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--targets", default="16,32,64")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="bench/out/lambda")
    ap.add_argument("--extra", default="", help="extra flags for `sparsetrace train`")
    args = ap.parse_args()
    rows = []
    for target in [float(t) for t in args.targets.split(",")]:
        out = f"{args.out}/L{args.layer}_t{int(target)}"
        t0 = time.time()
        cmd = [sys.executable, "-m", "sparsetrace.cli", "train", "--model", args.model, "--layers", str(args.layer),
               "--target-l0", str(target), "--out", out, *args.extra.split()]
        subprocess.run(cmd, check=True, env={**__import__("os").environ, "SPARSETRACE_NO_PROGRESS": "1"})
        res = subprocess.run([sys.executable, "-m", "sparsetrace.cli", "evaluate", out, "--json"],
                             check=True, capture_output=True, text=True)
        m = json.loads(res.stdout.splitlines()[0])
        rows.append((target, m["l0"], m["fvu"], m["ce_recovered_vs_zero"], time.time() - t0))
    print(f"{'target':>7} {'L0':>7} {'err':>7} {'FVU':>6} {'CErec0':>7} {'sec':>6}")
    worst = 0.0
    for target, l0, fvu, rec, sec in rows:
        err = (l0 - target) / target
        worst = max(worst, abs(err))
        print(f"{target:7.0f} {l0:7.1f} {err:+7.1%} {fvu:6.3f} {rec:7.1%} {sec:6.0f}")
    print(f"worst relative L0 error: {worst:.1%}")


if __name__ == "__main__":
    main()
