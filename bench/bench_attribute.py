"""Attribution benchmark on SmolLM2-135M: exactness, finite-difference checks, seconds per graph.

    python bench/bench_attribute.py [--trained /tmp/exp_relu] [--cases trained,all30] [--repeat 3]
                                    [--out bench/out/attribute.json]

Reports the fastest of ``--repeat`` runs (the machine is shared; the load average is recorded).

Case "trained": the trained transcoders found under ``--trained`` (e.g. layers 3 and 6).
Case "all30": random-weight transcoders (4608 features) on all 30 layers, with ``b_enc`` set per layer so
that about 32 features fire per token on a few calibration sentences (measures the cost of the
"transcoders on every layer" case; the graph itself is meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from sparsetrace.attribute import attribute, check_edges
from sparsetrace.dictionary.io import find_dictionaries
from sparsetrace.dictionary.load import load_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.model.adapter import LanguageModel
from sparsetrace.model.hookpoints import Hookpoint

PROMPT = "The Eiffel Tower is in Paris, the capital of France, and the Colosseum is in the city of"
CALIBRATION = [
    "Once upon a time there was a little fox who lived in the woods near a river.",
    "The quick brown fox jumps over the lazy dog, and then it runs far away home.",
    "In 1732 the war began, and it lasted until the year 1748 when peace returned.",
]


def random_transcoders(lm: LanguageModel, n_features: int = 4608, l0: float = 32.0, seed: int = 0):
    ids = [lm.tokenize(t) for t in CALIBRATION]
    layers = list(range(lm.n_layers))
    xs = {L: [] for L in layers}
    for i in ids:
        out = lm.run(i, read=[Hookpoint("mlp_in", L) for L in layers])
        for L in layers:
            xs[L].append(out.acts[Hookpoint("mlp_in", L)][0, 1:])  # skip BOS
    dicts = []
    for L in layers:
        cfg = DictionaryConfig(kind="transcoder", d_in=lm.d_model, d_out=lm.d_model, n_features=n_features,
                               layer=L, model_id=lm.model_id)
        d = SparseDictionary(cfg, seed=seed + L)
        x = torch.cat(xs[L])
        with torch.no_grad():
            pre = x @ d.W_enc.t()
            thr = torch.quantile(pre.flatten()[::7], 1 - l0 / n_features)
            d.b_enc.fill_(-float(thr))
            d.W_dec.mul_(x.norm(dim=-1).mean() / 8)
        dicts.append(d.eval())
    return dicts


def run_case(lm, dicts, name, *, k_check: int, batch_size: int | None, max_feature_nodes: int, repeat: int = 1):
    ids = lm.tokenize(PROMPT)
    walls, cpus, loads = [], [], []
    for _ in range(repeat):
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        g = attribute(lm, PROMPT, dicts, batch_size=batch_size, max_feature_nodes=max_feature_nodes)
        walls.append(round(time.perf_counter() - t0, 2))
        cpus.append(round(time.process_time() - c0, 2))
        loads.append(round((load0 + os.getloadavg()[0]) / 2, 2))
    full = g.unpruned
    res = {
        "case": name,
        "n_tokens": int(ids.shape[1]),
        "n_dictionaries": len(dicts),
        "seconds_per_graph": min(walls),
        "cpu_seconds": min(cpus),
        "runs": {"wall_s": walls, "cpu_s": cpus, "load_avg": loads, "os_cpu_count": os.cpu_count(),
                 "torch_threads": torch.get_num_threads()},
        "timings": full.metadata["timings"],
        "threads_used": full.metadata.get("num_threads"),
        "batch_size": full.metadata.get("batch_size"),
        "exactness_max_abs_logit_diff": full.metadata["exactness"],
        "n_active_features": full.metadata["n_active_features"],
        "n_feature_rows": full.metadata["n_feature_rows"],
        "full_graph": {"nodes": len(full.nodes), "edges": len(full.edges), "edge_bytes": full.edges.nbytes},
        "pruned_graph": {"nodes": len(g.nodes), "edges": len(g.edges)},
        "scores": full.scores,
        "pruned_scores": g.metadata.get("pruned_scores"),
        "targets": full.metadata["targets"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if k_check:
        t1 = time.perf_counter()
        chk = check_edges(full, k=k_check)
        res["edge_check"] = {"k": chk["n"], "eps": chk["eps"], "frozen": chk["frozen"],
                             "causal_agreement": chk.get("causal_agreement"),
                             "seconds": round(time.perf_counter() - t1, 2)}
    print(json.dumps(res, indent=1), flush=True)
    return res, g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trained", default="/tmp/exp_relu")
    ap.add_argument("--cases", default="trained,all30")
    ap.add_argument("--k-check", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-feature-nodes", type=int, default=3000)
    ap.add_argument("--out", default="bench/out/attribute.json")
    ap.add_argument("--save-graph", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    lm = LanguageModel.load("smollm2-135m")
    results = []
    cases = args.cases.split(",")
    if "trained" in cases:
        dicts = [load_dictionary(p) for p in find_dictionaries(args.trained)]
        r, g = run_case(lm, dicts, "trained", k_check=args.k_check, batch_size=args.batch_size,
                        max_feature_nodes=args.max_feature_nodes, repeat=args.repeat)
        results.append(r)
        if args.save_graph:
            g.save(args.save_graph)
    if "all30" in cases:
        dicts = random_transcoders(lm)
        r, _ = run_case(lm, dicts, "all30", k_check=args.k_check, batch_size=args.batch_size,
                        max_feature_nodes=args.max_feature_nodes, repeat=args.repeat)
        results.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
