"""`sparsetrace export --to circuit-tracer` of a cross-layer transcoder, loaded by circuit-tracer 0.5.0's own
CLT loader and compared with ours (the CLT companion of check_circuit_tracer_export.py, which does a PLT set).

    bench/.venv-peers/bin/python bench/peers/check_circuit_tracer_clt.py [--run RUN | --random-clt]
        [--n-features 1152] [--l0 32] [--seed 0] [--max-feature-nodes 3000] [--peer-batch-size 32]
        [--threads 2] [--ours-python python3] [--ours-src DIR] [--json bench/out/circuit_tracer_clt.json] [--keep]

RUN: a run with a JumpReLU or ReLU CLT on SmolLM2-135M (``RUN/clt``, from ``sparsetrace train --kind clt``).
``--random-clt`` instead builds a seeded random JumpReLU CLT on every layer of SmolLM2 (``--n-features`` per
layer) whose per-feature thresholds are set, on calibration text (``bench_attribute.CALIBRATION``, not the
prompt), to fire about ``--l0`` features per layer and token, and whose decoders are scaled so each layer's
reconstruction has the RMS of that MLP's output (``b_dec`` = its mean): realistic sparsity and scale, no
training. It is saved as RUN/clt and exported like any run. Steps:

1. ours (a python with sparsetrace and transformers 5): ``export_run(RUN, "circuit-tracer", ...)``; on
   ``bench_attribute.PROMPT`` it records every layer's ``mlp_in`` and ``mlp_out``, our CLT features per layer
   and our reconstruction of every MLP output; and, when sparsetrace's attribution takes a CLT
   (``sparsetrace.attribute.clt_sites``), our full (unpruned) attribution graph.
2. circuit-tracer (the peer venv): ``load_transcoders_from_cache`` reads the export (config.yaml, W_enc_{i},
   W_dec_{i}; its lazy-decoder default) with ``load_clt``; the replacement model is built by hand with
   ``TransformerLensReplacementModel.from_config`` (``bench_attribute_peer.build_peer_model``), and it computes
   (a) ``encode_layer`` on OUR ``mlp_in`` (the file format alone), (b) its own feature activations on the
   prompt (``get_activations``: its model forward + the export), (c) its reconstruction (``decode``) of
   every MLP output from the features of (a), (d) its attribution graph (``circuit_tracer.attribute``).
3. compared: (a), (b) to 1e-5 max abs (position 0 excluded in (b): circuit-tracer zeroes BOS); (c) max abs
   difference relative to the largest |reconstruction|, to 1e-5; (d) edge by edge as
   ``bench_attribute_peer.compare`` does, ``max |a - b| / largest |w| into the same target`` to 1e-4, when
   our side has a graph (else reported as pending). Also reported: the CLT's L0 per layer on the prompt and
   its reconstruction FVU against the real MLP outputs (a random CLT's FVU is not meaningful).
Exits non-zero when a check misses its tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from bench_attribute_peer import KIND, compare, node_codes, ours_python  # noqa: E402
from common import emit, peer_python, run_worker  # noqa: E402

FEATURE_TOL, RECON_TOL, EDGE_TOL = 1e-5, 1e-5, 1e-4
CACHE_NAME = "export"


def random_clt(lm, n_features: int, l0: float, seed: int):
    """A seeded random JumpReLU CLT with per-feature thresholds for ~``l0`` active features per layer and
    token on the calibration text, and decoders scaled to each MLP output's RMS."""
    import torch
    from bench_attribute import CALIBRATION

    from sparsetrace.dictionary.clt import CLTConfig, CrossLayerTranscoder
    from sparsetrace.model.hookpoints import Hookpoint

    L = lm.n_layers
    hps = [Hookpoint(k, i) for i in range(L) for k in ("mlp_in", "mlp_out")]
    xs, ys = [[] for _ in range(L)], [[] for _ in range(L)]
    for text in CALIBRATION:
        out = lm.run(lm.tokenize(text), read=hps)
        for i in range(L):
            xs[i].append(out.acts[Hookpoint("mlp_in", i)][0, 1:].float())  # BOS skipped
            ys[i].append(out.acts[Hookpoint("mlp_out", i)][0, 1:].float())
    xs, ys = [torch.cat(x) for x in xs], [torch.cat(y) for y in ys]
    cfg = CLTConfig(n_layers=L, d_model=lm.d_model, n_features=n_features, activation="jumprelu",
                    model_id=lm.model_id)
    clt = CrossLayerTranscoder(cfg, seed=seed)
    with torch.no_grad():
        for i in range(L):
            pre = xs[i] @ clt.W_enc[i].t()
            thr = torch.quantile(pre, 1 - l0 / n_features, dim=0).clamp_min(1e-3)
            clt.log_threshold[i].copy_(thr.log())
        feats = [clt.encode(i, xs[i]) for i in range(L)]
        recon = clt.decode_all(feats)  # b_dec = 0 still
        for j in range(L):
            scale = (ys[j] - ys[j].mean(0)).pow(2).mean().sqrt() / recon[j].pow(2).mean().sqrt().clamp_min(1e-12)
            for src in range(j + 1):
                clt.W_dec[src][:, j - src].mul_(scale)
            clt.b_dec[j].copy_(ys[j].mean(0))
    return clt.eval()


def worker_ours(a) -> None:
    import numpy as np
    import torch
    from bench_attribute import PROMPT
    from safetensors.torch import save_file

    from sparsetrace.dictionary.clt import find_clt, load_clt, save_clt
    from sparsetrace.dictionary.export import export_run
    from sparsetrace.model.adapter import LanguageModel
    from sparsetrace.model.hookpoints import Hookpoint

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    if a.random_clt:
        lm = LanguageModel.load("smollm2-135m")
        run = work / "run"
        save_clt(random_clt(lm, a.n_features, a.l0, a.seed), run / "clt")
    else:
        run = Path(a.run)
        if find_clt(run) is None:
            raise SystemExit(f"{run} holds no CLT (RUN/clt); pass --random-clt or a run trained with --kind clt")
    clt = load_clt(run)  # what was saved, as a user would load it
    if not a.random_clt:
        lm = LanguageModel.load(clt.cfg.model_id or "smollm2-135m")
    dest = work / "ct_cache" / CACHE_NAME
    export_run(run, "circuit-tracer", dest, overwrite=True)
    ids = lm.tokenize(PROMPT)
    L = clt.n_layers
    hps = [Hookpoint(k, i) for i in range(L) for k in ("mlp_in", "mlp_out")]
    out = lm.run(ids, read=hps)
    t = {"ids": ids[0].clone(), "clean_logits": out.logits[0, -1].float().contiguous()}
    with torch.no_grad():
        feats = []
        for i in range(L):
            x = out.acts[Hookpoint("mlp_in", i)][0].float()
            t[f"mlp_in_L{i}"] = x.contiguous()
            t[f"mlp_out_L{i}"] = out.acts[Hookpoint("mlp_out", i)][0].float().contiguous()
            feats.append(clt.encode(i, x))
            t[f"feat_L{i}"] = feats[-1].contiguous()
        for j, r in enumerate(clt.decode_all(feats)):
            t[f"recon_L{j}"] = r.contiguous()
    save_file(t, str(work / "inputs.safetensors"))
    l0 = [float((t[f"feat_L{i}"][1:] != 0).sum(-1).float().mean()) for i in range(L)]
    fvu = [float((t[f"recon_L{i}"][1:] - t[f"mlp_out_L{i}"][1:]).pow(2).sum()
                 / (t[f"mlp_out_L{i}"][1:] - t[f"mlp_out_L{i}"][1:].mean(0)).pow(2).sum()) for i in range(L)]
    res = {"clt": "random (seeded, calibrated thresholds)" if a.random_clt else str(run),
           "n_layers": L, "n_features": clt.n_features, "activation": clt.cfg.activation,
           "n_tokens": int(ids.shape[1]), "l0_per_layer_pos1plus": l0, "fvu_per_layer_pos1plus": fvu,
           "export_files": len(list(dest.iterdir())),
           "export_mb": sum(p.stat().st_size for p in dest.iterdir()) / 2**20}
    try:
        import sparsetrace.attribute.clt_sites  # noqa: F401  (attribution over a CLT, issue 12 section 4)
    except ImportError:
        res["graph"] = "pending: sparsetrace's attribution does not take a CLT in this checkout"
        emit(res)
        return
    from sparsetrace.attribute import attribute

    g = attribute(lm, ids, clt, max_feature_nodes=a.max_feature_nodes, prune=False)
    nodes = g.nodes
    codes = node_codes([KIND[n.kind] for n in nodes], [n.layer for n in nodes], [n.position for n in nodes],
                       [(n.token_id if n.kind == "logit" else n.feature) or 0 for n in nodes])
    src, dst, w = g.edges.numpy()
    np.savez(work / "edges_ours.npz", nodes=codes, src=codes[src], dst=codes[dst], w=w.astype(np.float32))
    res.update(graph="ours", n_active=g.metadata["n_active_features"], n_edges=len(g.edges),
               targets=[x["token"] for x in g.metadata["targets"]])
    emit(res)


def worker_peer(a) -> None:
    from importlib.metadata import version

    import numpy as np
    import torch
    from bench_attribute_peer import build_peer_model
    from circuit_tracer import attribute
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    clt, config = load_transcoders_from_cache(CACHE_NAME, cache_dir=work / "ct_cache", device=torch.device("cpu"),
                                              dtype=torch.float32)
    assert isinstance(clt, CrossLayerTranscoder), type(clt)
    model, t = build_peer_model(work, transcoders=clt)
    ids = t["ids"].long()
    L = clt.n_layers
    res = {"config": {k: config[k] for k in ("model_kind", "feature_input_hook", "feature_output_hook")},
           "loaded": {"n_layers": L, "d_transcoder": clt.d_transcoder, "d_model": clt.d_model,
                      "activation": type(clt.activation_function).__name__}, "per_layer": []}
    with torch.no_grad():
        logits, acts = model.get_activations(ids[None])
        acts = acts.to_dense() if acts.is_sparse else acts
        res["logit_max_abs_diff_vs_ours"] = float((logits[0, -1] - t["clean_logits"]).abs().max())
        enc = torch.stack([clt.encode_layer(t[f"mlp_in_L{i}"], i) for i in range(L)])  # (a)
        recon = clt.decode(enc.to_sparse())  # (c): [L, n_pos_with_features, d]
        for i in range(L):
            ours = t[f"feat_L{i}"]
            n_pos = recon.shape[1]
            r_ours = t[f"recon_L{i}"][:n_pos]
            res["per_layer"].append({
                "layer": i, "max_abs_feature": float(ours.abs().max()),
                "encode_max_abs_diff": float((enc[i] - ours).abs().max()),
                "e2e_max_abs_diff_pos1plus": float((acts[i, 1:] - ours[1:]).abs().max()),
                "active_ours_pos1plus": int((ours[1:] != 0).sum()),
                "active_set_mismatches": int(((ours[1:] != 0) != (acts[i, 1:] != 0)).sum()),
                "recon_rel_max_abs_diff": float((recon[i] - r_ours).abs().max() / r_ours.abs().max()),
            })
    res["recon_positions"] = int(recon.shape[1])
    if a.graph:
        g = attribute(ids, model, max_feature_nodes=a.max_feature_nodes, batch_size=a.peer_batch_size)
        A = g.adjacency_matrix
        n_pos, n_layers = len(g.input_tokens), g.cfg.n_layers
        sel = g.active_features[g.selected_features]  # (layer, pos, feature)
        logit_ids = [lt.vocab_idx for lt in g.logit_targets]
        kind = [1] * sel.shape[0] + [2] * (n_layers * n_pos) + [0] * n_pos + [3] * len(logit_ids)
        layer = (sel[:, 0].tolist() + [i // n_pos for i in range(n_layers * n_pos)] + [-1] * n_pos
                 + [n_layers] * len(logit_ids))
        pos = (sel[:, 1].tolist() + [i % n_pos for i in range(n_layers * n_pos)] + list(range(n_pos))
               + [n_pos - 1] * len(logit_ids))
        idx = sel[:, 2].tolist() + [0] * (n_layers * n_pos + n_pos) + logit_ids
        codes = node_codes(kind, layer, pos, idx)
        r, c = A.nonzero(as_tuple=True)
        np.savez(work / "edges_peer.npz", nodes=codes, src=codes[c.numpy()], dst=codes[r.numpy()],
                 w=A[r, c].numpy().astype(np.float32))
        res.update(n_active=int(g.active_features.shape[0]), n_edges=int(r.numel()),
                   targets=[lt.token_str for lt in g.logit_targets])
    res["versions"] = {k: version(k) for k in ("circuit-tracer", "transformer-lens", "torch")}
    emit(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None, help="a run with RUN/clt (JumpReLU or ReLU)")
    src.add_argument("--random-clt", action="store_true", help="a seeded random CLT calibrated on SmolLM2")
    ap.add_argument("--n-features", type=int, default=1152, help="--random-clt: features per layer")
    ap.add_argument("--l0", type=float, default=32.0, help="--random-clt: target active features per layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-feature-nodes", type=int, default=3000)
    ap.add_argument("--peer-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-python", default=None, help="python with sparsetrace (default: python3 on PATH)")
    ap.add_argument("--ours-src", default=None, help="sparsetrace sources to use on our side (default: this "
                    "checkout's src/), e.g. another branch's src exported with git archive")
    ap.add_argument("--json", default=str(BENCH / "out" / "circuit_tracer_clt.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (export, inputs, edges)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--graph", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker == "ours":
        worker_ours(a)
        return 0
    if a.worker == "peer":
        worker_peer(a)
        return 0

    work = Path(tempfile.mkdtemp(prefix="ct_clt_"))
    common = ["--workdir", str(work), "--threads", str(a.threads), "--max-feature-nodes", str(a.max_feature_nodes),
              "--peer-batch-size", str(a.peer_batch_size), "--n-features", str(a.n_features), "--l0", str(a.l0),
              "--seed", str(a.seed)]
    common += ["--random-clt"] if a.random_clt else ["--run", str(Path(a.run).resolve())]
    here = Path(__file__).resolve()
    env = {"PYTHONPATH": os.pathsep.join([str(Path(a.ours_src).resolve() if a.ours_src else ROOT / "src"), str(BENCH)])}
    ours = run_worker(ours_python(a.ours_python), here, ["--worker", "ours", *common], env=env, timeout=3600)
    print("ours:", json.dumps({k: v for k, v in ours.items() if not isinstance(v, list)}), flush=True)
    with_graph = ours.get("graph") == "ours"
    peer = (run_worker(peer_python(), here, ["--worker", "peer", *common, *(["--graph"] if with_graph else [])],
                       env={"PYTHONPATH": str(BENCH)}, timeout=3600)
            if "error" not in ours else {"error": "skipped"})
    print("circuit-tracer:", json.dumps({k: v for k, v in peer.items() if k != "per_layer"}), flush=True)
    report = {"run": a.run or "random CLT", "ours": ours, "circuit-tracer": peer, "feature_tol": FEATURE_TOL,
              "recon_tol": RECON_TOL, "edge_tol": EDGE_TOL}
    ok = "error" not in ours and "error" not in peer
    if ok:
        pl = peer["per_layer"]
        checks = [
            ("encode on our mlp_in, all layers: max |df|", max(r["encode_max_abs_diff"] for r in pl), FEATURE_TOL),
            ("circuit-tracer forward (pos>=1), all layers: max |df|", max(r["e2e_max_abs_diff_pos1plus"] for r in pl),
             FEATURE_TOL),
            ("reconstruction, all layers: max |dy| / max |y|", max(r["recon_rel_max_abs_diff"] for r in pl),
             RECON_TOL),
        ]
        if with_graph:
            report["edges"] = g = compare(work, "ours", "peer")
            checks.append(("graph edges: max |a-b| / largest |w| into the target", g["max_row_rel_diff"], EDGE_TOL))
        for name, v, tol in checks:
            print(f"{'ok ' if v <= tol else 'BAD'} {name:<60} {v:.2e} (tol {tol:.0e})")
            ok &= v <= tol
        l0 = ours["l0_per_layer_pos1plus"]
        print(f"CLT: {ours['n_layers']} layers x {ours['n_features']} features ({ours['activation']}), L0 on the "
              f"prompt {min(l0):.1f}..{max(l0):.1f} per layer; active-set mismatches "
              f"{sum(r['active_set_mismatches'] for r in pl)}; logits vs ours max abs "
              f"{peer['logit_max_abs_diff_vs_ours']:.1e}; export {ours['export_mb']:.0f} MB, "
              f"{ours['export_files']} files")
        if with_graph:
            print(f"graph: {g['edges_compared']} edges compared, feature nodes common/ours/peer "
                  f"{g['common_feature_nodes']}/{g['first_feature_nodes']}/{g['second_feature_nodes']}, "
                  f"only ours/peer {g['only_first']}/{g['only_second']}")
        else:
            print(f"graph edges: {ours.get('graph')}")
        report["checks"] = [{"name": n, "value": v, "tol": t} for n, v, t in checks]
    report["ok"] = ok
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1))
    if a.keep:
        print(f"work folder kept: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
