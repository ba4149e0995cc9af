"""Graph scores of two full replacements side by side: a per-layer transcoder set (PLT) vs a CLT.

    PYTHONPATH=src python bench/bench_graph_scores.py --plt RUN_A --clt RUN_B [--prompts FILE]
        [--max-feature-nodes 3000] [--n-prompts N] [--threads N] [--check-edges K]
        [--out bench/out/graph_scores.json]

For each of the 20 packaged prompts (``sparsetrace/attribute/data/score_prompts.txt``, or ``--prompts``)
the unpruned attribution graph is built over each replacement (``sparsetrace graph-scores``'s function),
and the replacement score and graph completeness are printed per prompt and averaged, beside Circuit
Tracing's published figures (Ameisen et al. 2025: PLT 0.37 / 0.78, CLT 0.61 / 0.80). The last line is the
ratio CLT / PLT of the mean scores.

``--clt diag:RUN`` builds, in memory, a CLT whose diagonal blocks are RUN's per-layer transcoders
(ReLU/JumpReLU/TopK, same activation on every layer) and whose off-diagonal decoders are zero. Its graphs
equal the PLT's (tests/test_attribute_clt.py): it checks the CLT code path at SmolLM2 scale (time,
memory), it is not a CLT result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sparsetrace.attribute import attribute, check_edges  # noqa: E402
from sparsetrace.attribute.scores import graph_scores_over_prompts, load_mlp_replacement, score_prompts  # noqa: E402
from sparsetrace.dictionary.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from sparsetrace.dictionary.replacement_set import CLTReplacement, PLTSet  # noqa: E402
from sparsetrace.model.adapter import LanguageModel  # noqa: E402

PUBLISHED = {"plt": (0.37, 0.78), "clt": (0.61, 0.80)}


def diagonal_clt(plts: PLTSet) -> CLTReplacement:
    """A CLT with transcoder l as layer l's encoder and same-layer decoder, zero writes to later layers."""
    ds = plts.by_layer
    L = max(ds) + 1
    if sorted(ds) != list(range(L)):
        raise SystemExit(f"diag: needs a transcoder on every layer 0..{L - 1}; the run has {sorted(ds)}")
    first = ds[0]
    acts = {d.cfg.activation for d in ds.values()}
    widths = {d.n_features for d in ds.values()}
    if len(acts) != 1 or len(widths) != 1 or any(d.W_skip is not None for d in ds.values()):
        raise SystemExit("diag: needs plain transcoders of one width and one activation")
    act = acts.pop()
    if act not in ("relu", "jumprelu", "topk"):
        raise SystemExit(f"diag: activation {act} has no CLT counterpart")
    cfg = CLTConfig(n_layers=L, d_model=first.cfg.d_in, n_features=widths.pop(), activation=act,
                    k=first.cfg.k if act == "topk" else None, model_id=first.cfg.model_id)
    clt = CrossLayerTranscoder(cfg, seed=0)
    with torch.no_grad():
        for layer, d in ds.items():
            clt.W_enc[layer].copy_(d.W_enc)
            clt.b_enc[layer].copy_(d.b_enc)
            clt.b_dec[layer].copy_(d.b_dec)
            clt.W_dec[layer].zero_()
            clt.W_dec[layer][:, 0].copy_(d.W_dec)
            if act == "jumprelu":
                clt.log_threshold[layer].copy_(d.log_threshold)
    return CLTReplacement(clt.eval())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plt", required=True, help="run with a transcoder on every layer")
    ap.add_argument("--clt", required=True, help="run with a CLT (RUN/clt/), or diag:RUN (see the docstring)")
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--n-prompts", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--max-feature-nodes", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write both results as JSON here")
    ap.add_argument("--check-edges", type=int, default=0, metavar="K",
                    help="also check the K strongest edges of the first prompt's graph by finite differences")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = score_prompts(a.prompts)[: a.n_prompts]
    plt = load_mlp_replacement(a.plt, "plt")
    if a.clt.startswith("diag:"):
        src = load_mlp_replacement(a.clt[5:], "plt")
        clt, clt_label = diagonal_clt(src), f"diagonal CLT from {a.clt[5:]} (code-path check, not a CLT result)"
    else:
        clt, clt_label = load_mlp_replacement(a.clt, "clt"), f"CLT {a.clt}"
    totals = {name: sum(rep.n_features.values()) for name, rep in (("plt", plt), ("clt", clt))}
    if totals["plt"] != totals["clt"]:
        print(f"note: total features differ (PLT {totals['plt']}, CLT {totals['clt']}); the comparison is not at "
              "matched total features")
    lm = LanguageModel.load(plt.model_id or clt.model_id)
    res = {}
    for name, rep in (("plt", plt), ("clt", clt)):
        t0 = time.perf_counter()
        res[name] = graph_scores_over_prompts(lm, rep, prompts, max_feature_nodes=a.max_feature_nodes, progress=True)
        res[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        if a.check_edges:
            g = attribute(lm, prompts[0], rep, max_feature_nodes=a.max_feature_nodes, prune=False)
            chk = check_edges(g, k=a.check_edges)
            res[name]["edge_check"] = {k: v for k, v in chk.items() if k != "edges"}
            del g
    res["plt"]["run"], res["clt"]["run"] = a.plt, a.clt
    res["clt"]["label"] = clt_label

    print(f"{'#':>2} {'tok':>3} | {'PLT repl':>8} {'compl':>6} {'s':>5} | {'CLT repl':>8} {'compl':>6} {'s':>5} | prompt")
    for i, (p, c) in enumerate(zip(res["plt"]["prompts"], res["clt"]["prompts"], strict=True), 1):
        print(f"{i:>2} {p['n_tokens']:>3} | {p['replacement']:>8.3f} {p['graph_completeness']:>6.3f} {p['seconds']:>5.1f} | "
              f"{c['replacement']:>8.3f} {c['graph_completeness']:>6.3f} {c['seconds']:>5.1f} | {p['prompt'][:50]}")
    print()
    print("| replacement | graph replacement score | graph completeness | s / graph | prompts |")
    print("|---|---|---|---|---|")
    for name, label in (("plt", f"ours: PLT {a.plt}"), ("clt", f"ours: {clt_label}")):
        m = res[name]["mean"]
        print(f"| {label} | {m['replacement']:.3f} | {m['graph_completeness']:.3f} | {m['seconds']:.1f} | "
              f"{res[name]['n_prompts']} |")
    for name in ("plt", "clt"):
        r, c = PUBLISHED[name]
        print(f"| Circuit Tracing (published), {name.upper()} | {r:.2f} | {c:.2f} | | |")
    for name in ("plt", "clt"):
        ec = res[name].get("edge_check")
        if ec:
            print(f"edge check {name.upper()} (prompt 1, {ec['n']} strongest edges, finite differences): max rel err "
                  f"{ec['frozen']['max_rel_err']:.2e} frozen, sign agreement {ec['frozen']['sign_agreement']:.0%}; "
                  f"live attention/norms: sign agreement {ec['causal_agreement']['sign_agreement']:.0%}, median rel "
                  f"err {ec['causal_agreement']['median_rel_err']:.2e}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    mp, mc = res["plt"]["mean"], res["clt"]["mean"]
    print(f"ratio CLT / PLT: replacement score {mc['replacement'] / mp['replacement']:.3f}, graph completeness "
          f"{mc['graph_completeness'] / mp['graph_completeness']:.3f} (Circuit Tracing: "
          f"{0.61 / 0.37:.3f}, {0.80 / 0.78:.3f})")


if __name__ == "__main__":
    main()
