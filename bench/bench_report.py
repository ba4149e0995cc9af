"""Report benchmark on SmolLM2-135M: seconds to build a report with and without the feature pages'
upstream panel (weight-only attribution, report/upstream.py).

    python bench/bench_report.py [--layers 3,6] [--features 50] [--budget 60]

The run folder is synthetic: random-weight transcoders (4608 features, SmolLM2's width) at ``--layers``
and ``--features`` minimal dashboards per layer, so the panel's numbers are meaningless; only its cost
is measured (it does not depend on the weights' values). The model comes from the sparsetrace cache.
The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sparsetrace.dictionary.io import save_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.report.html import build_report


def synthetic_run(root: Path, layers: list[int], n_dash: int, n_features: int = 4608) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": "smollm2-135m", "layers": layers}))
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        cfg = DictionaryConfig(kind="transcoder", d_in=576, d_out=576, n_features=n_features, layer=layer,
                               model_id="smollm2-135m")
        save_dictionary(SparseDictionary(cfg, seed=layer), run / f"L{layer:02d}_transcoder")
        fdir = run / "features" / f"L{layer:02d}"
        fdir.mkdir(parents=True)
        feats = torch.randperm(n_features, generator=gen)[:n_dash].tolist()
        for f in feats:
            (fdir / f"f{f}.json").write_text(json.dumps({"layer": layer, "feature": f, "label": f"feature {f}"}))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="3,6")
    ap.add_argument("--features", type=int, default=50, help="dashboards per layer")
    ap.add_argument("--budget", type=float, default=60.0, help="upstream time budget (s)")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_report_"))
    try:
        run = synthetic_run(tmp, layers, args.features)
        t = time.perf_counter()
        build_report([run], tmp / "plain", upstream=False)
        plain = time.perf_counter() - t
        t = time.perf_counter()
        build_report([run], tmp / "up", upstream=True, upstream_budget_s=args.budget)
        up = time.perf_counter() - t
        data = (tmp / "up" / "data" / "report-data.js").read_text()
        warnings = json.loads(data[len("window.SPARSETRACE_DATA="):].rstrip().rstrip(";"))["runs"][0]["warnings"]
        n_panels = sum(f.read_text().count('"n_sources"') for f in (tmp / "up" / "data" / "r0").glob("*.js"))
        print(f"report without upstream panel: {plain:.1f} s")
        print(f"report with upstream panel:    {up:.1f} s ({n_panels} of {len(layers) * args.features} "
              f"feature pages, budget {args.budget:g} s)")
        for w in warnings:
            print("warning:", w)
        print(json.dumps({"layers": layers, "features_per_layer": args.features, "seconds_plain": round(plain, 2),
                          "seconds_upstream": round(up, 2), "panels": n_panels, "threads": torch.get_num_threads(),
                          "load": os.getloadavg()[0]}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
