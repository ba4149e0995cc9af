"""QK attribution benchmark: exactness of the bilinear decomposition and causal checks of key-side features.

    python bench/bench_qk.py --dictionaries RUN_OR_DICT_FOLDER [--model smollm2-135m] \
        [--tasks ioi,greater-than,sva,facts] [--prompts 2] [--edges 7] [--layers 7,8,9] [--checks 2] \
        [--seed 1] [--dtype float64] [--float32-norms] [--out bench/out/qk.json]

Without ``--dictionaries``: tiny-llama with random transcoders on layers 0 and 2 (a smoke run).

For each task prompt (made with ``--seed``; the dictionaries never saw them), the attention edges are the
``--edges`` (layer, head, key position) triples at the last position with the largest attention
probability, over ``--layers``, keys after BOS that hold an active feature of an earlier layer. For each
edge: the QK decomposition (:func:`sparsetrace.attribute.qk.qk_terms`), its exactness against the real
model's score, and ``--checks`` key-side features ablated (:func:`check_qk`): measured with norms and
earlier patterns frozen (relative error against the prediction), live (sign agreement) and in the real
model with every MLP recomputed (sign agreement, a harder test). The last line prints the headline figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsetrace.attribute import ReplacementModel
from sparsetrace.attribute.heads import _patterns
from sparsetrace.attribute.qk import check_qk, qk_terms
from sparsetrace.model.adapter import LanguageModel
from sparsetrace.tasks import get_task


def _dictionaries(args, lm):
    if args.dictionaries:
        from sparsetrace.intervene.circuit_job import load_dictionaries

        return load_dictionaries([Path(p) for p in args.dictionaries], lm)
    from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary

    out = []
    for layer in (0, 2):
        cfg = DictionaryConfig(kind="transcoder", d_in=lm.d_model, d_out=lm.d_model, n_features=128, layer=layer,
                               hookpoint_in="mlp_in", hookpoint_out="mlp_out")
        d = SparseDictionary(cfg, seed=layer)
        with torch.no_grad():
            d.b_enc.fill_(-0.05)
        out.append(d.eval())
    return out


def _float64_rms_norms(lm) -> int:
    """Make Llama-style RMSNorms compute in the model's dtype: transformers' upcasts to float32 even in a
    float64 model, which puts float32 rounding (~1e-7 of the score) into every check. Same function, more
    digits. Returns how many norms were changed."""
    n = 0
    for m in lm.model.modules():
        if type(m).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") and hasattr(m, "variance_epsilon"):
            def fwd(x, m=m):
                return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            m.forward = fwd
            n += 1
    return n


def _edges(rm: ReplacementModel, layers: list[int], n: int) -> list[tuple[int, int, int, int]]:
    q = rm.n_pos - 1
    pats = _patterns(rm)
    feat_pos: dict[int, set[int]] = {}
    for s in rm.dictionary_sites:
        feat_pos[s.layer] = feat_pos.get(s.layer, set()) | set(s.pos.tolist())
    cands = []
    for L in layers:
        ok = set().union(*[p for lay, p in feat_pos.items() if lay < L]) if feat_pos else set()
        A = pats[L]
        for h in range(A.shape[0]):
            for k in range(1, q):
                if k in ok:
                    cands.append((float(A[h, q, k]), L, h, q, k))
    cands.sort(reverse=True)
    return [(L, h, qq, k) for _, L, h, qq, k in cands[:n]]


def _summary(rows: list[dict], edges_out: list[dict], head: dict) -> dict:
    pred = np.array([r["predicted"] for r in rows])
    rel = np.array([r["rel_err_frozen"] for r in rows])
    live = np.array([r["live"] for r in rows])
    real = np.array([r["real"] for r in rows])
    exact = np.array([e["abs_err"] for e in edges_out])
    scale = np.array([max(abs(e["score"]), 1.0) for e in edges_out])
    big = np.abs(pred) >= 0.01  # ablations predicted to move the score by at least 0.01 (chosen before measuring)
    return {
        **head, "tasks": sorted({e["task"] for e in edges_out}), "n_edges": len(edges_out), "n_checks": len(rows),
        "exactness_max_abs": float(exact.max()), "exactness_max_rel": float((exact / scale).max()),
        "frozen_max_rel_err": float(rel.max()), "frozen_median_rel_err": float(np.median(rel)),
        "frozen_max_abs_err": float(np.max([abs(r["frozen"] - r["predicted"]) for r in rows])),
        "frozen_max_rel_err_pred_ge_0.01": float(rel[big].max()) if big.any() else None,
        "live_sign_agreement": float(np.mean(np.sign(live) == np.sign(pred))),
        "real_sign_agreement": float(np.mean(np.sign(real) == np.sign(pred))),
        "n_checks_pred_ge_0.01": int(big.sum()),
        "live_sign_agreement_pred_ge_0.01": float(np.mean(np.sign(live[big]) == np.sign(pred[big]))) if big.any() else None,
        "real_sign_agreement_pred_ge_0.01": float(np.mean(np.sign(real[big]) == np.sign(pred[big]))) if big.any() else None,
        "live_pearson": float(np.corrcoef(pred, live)[0, 1]) if len(rows) > 1 else None,
        "median_seconds_per_edge": float(np.median([e["seconds"] for e in edges_out])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dictionaries", nargs="*", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default="ioi,greater-than,sva,facts")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--edges", type=int, default=7)
    ap.add_argument("--layers", default=None, help="attention layers (default: the 3 after the deepest dictionary)")
    ap.add_argument("--checks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                    help="model dtype (float64: the frozen check is not limited by float32 rounding of the score)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--float32-norms", action="store_true",
                    help="keep transformers' float32 RMSNorm inside a float64 model (default: norms in float64)")
    ap.add_argument("--summarise", default=None, help="only re-print the summary of a JSON written by --out")
    args = ap.parse_args()
    if args.summarise:
        doc = json.loads(Path(args.summarise).read_text())
        rows = [{"task": e["task"], **c} for e in doc["edges"] for c in e["checks"]]
        keep = ("model", "dtype", "float64_rms_norms", "dictionaries", "seed", "layers", "total_seconds")
        _print(_summary(rows, doc["edges"], {k: doc["summary"].get(k) for k in keep}))
        return
    torch.set_num_threads(args.threads)
    name = args.model or ("smollm2-135m" if args.dictionaries else "tiny-llama")
    lm = LanguageModel.load(name, dtype=getattr(torch, args.dtype))
    n_norms = _float64_rms_norms(lm) if args.dtype == "float64" and not args.float32_norms else 0
    dicts = _dictionaries(args, lm)
    deepest = max(d.cfg.layer for d in dicts)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else \
        [L for L in range(deepest + 1, deepest + 4) if L < lm.n_layers]
    rows, edges_out = [], []
    t_start = time.perf_counter()
    for task_name in args.tasks.split(","):
        batch = get_task(task_name).prompts(lm, n=args.prompts, seed=args.seed)
        for i in range(min(args.prompts, len(batch))):
            ids = batch.clean[i: i + 1, : int(batch.last_pos[i]) + 1]
            rm = ReplacementModel(lm, ids, dicts)
            for L, h, q, k in _edges(rm, layers, args.edges):
                t0 = time.perf_counter()
                t = qk_terms(rm, L, h, q, k)
                secs = time.perf_counter() - t0
                checks = check_qk(rm, t, k=args.checks)
                edges_out.append({"task": task_name, "prompt": batch.prompts[i], "layer": L, "head": h, "q": q, "k": k,
                                  "score": t.score, "sum_of_terms": t.total, "pattern": t.pattern,
                                  "abs_err": t.exactness, "seconds": round(secs, 2),
                                  "top_pairs": t.top_pairs(3), "checks": checks})
                for c in checks:
                    rows.append({"task": task_name, **c})
                print(f"{task_name:12s} L{L} h{h} q{q} k{k}: score {t.score:+.4f} sum {t.total:+.4f} "
                      f"(|err| {t.exactness:.1e}, p={t.pattern:.2f}, {secs:.1f}s); checks: " +
                      ", ".join(f"{c['node']} pred {c['predicted']:+.3g} frozen {c['frozen']:+.3g} "
                                f"live {c['live']:+.3g} real {c.get('real', float('nan')):+.3g}" for c in checks),
                      file=sys.stderr, flush=True)
    summary = _summary(rows, edges_out, {"model": lm.model_id, "dtype": args.dtype, "float64_rms_norms": n_norms,
                                         "dictionaries": args.dictionaries,
                                         "seed": args.seed, "layers": layers})
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "edges": edges_out}, indent=1) + "\n")
    _print(summary)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _print(summary: dict) -> None:
    print(json.dumps(summary))
    print(f"QK: {summary['n_edges']} attention edges over {len(summary['tasks'])} tasks, {summary['n_checks']} ablations: "
          f"sign agreement (norms live) {summary['live_sign_agreement']:.1%}, real model {summary['real_sign_agreement']:.1%}; "
          f"max relative error (norms frozen) {summary['frozen_max_rel_err']:.2e}; "
          f"(predicted |change| >= 0.01: {summary['n_checks_pred_ge_0.01']} ablations, sign agreement live "
          f"{_pct(summary['live_sign_agreement_pred_ge_0.01'])}, real {_pct(summary['real_sign_agreement_pred_ge_0.01'])}); "
          f"decomposition max |sum - score| {summary['exactness_max_abs']:.1e}")


if __name__ == "__main__":
    main()
