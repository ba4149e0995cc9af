"""`sparsetrace export --to circuit-tracer`, loaded by circuit-tracer 0.5.0's own loader and compared with ours.

    bench/.venv-peers/bin/python bench/peers/check_circuit_tracer_export.py --run RUN
        [--max-feature-nodes 3000] [--peer-batch-size 32] [--threads 2] [--ours-python python3]
        [--json bench/out/circuit_tracer_export.json] [--keep]

RUN: a run of transcoders (mlp_in -> mlp_out) on SmolLM2-135M (``smollm2-135m``), e.g. ``sparsetrace train
--layers 3,6``. Steps:

1. ours (a python with sparsetrace and transformers 5): ``sparsetrace.dictionary.export.export_run(RUN,
   "circuit-tracer", ...)`` writes the export; on ``bench_attribute.PROMPT`` it records each trained layer's
   ``mlp_in`` activations and our feature activations, the clean logits, and our full (unpruned)
   attribution graph.
2. circuit-tracer (the peer venv): ``circuit_tracer.utils.caching.load_transcoders_from_cache`` reads the
   export (config.yaml + layer_{i}.safetensors; its lazy-decoder default), the replacement model is built
   by hand with ``TransformerLensReplacementModel.from_config`` (``bench_attribute_peer.build_peer_model``:
   circuit-tracer's model loaders cannot build SmolLM2 offline), and it computes
   (a) ``transcoder.encode`` on OUR ``mlp_in`` activations (the file format alone),
   (b) its own feature activations on the prompt (``get_activations``: its model forward + the export),
   (c) its attribution graph (``circuit_tracer.attribute``), same max_feature_nodes, same target rule.
3. compared: (a) and (b) against our features, to 1e-5 (max abs; position 0 excluded in (b) because
   circuit-tracer zeroes BOS activations, and every zero layer checked to stay silent); (c) edge by edge as
   ``bench_attribute_peer.compare`` does (matched by node identity, BOS error sources excluded), headline
   ``max |a - b| / largest |w| into the same target`` to 1e-4.
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

FEATURE_TOL, EDGE_TOL = 1e-5, 1e-4
CACHE_NAME = "export"  # the export lives at WORK/ct_cache/export: circuit-tracer's cache layout


def worker_ours(a) -> None:
    import numpy as np
    import torch
    from bench_attribute import PROMPT
    from safetensors.torch import save_file

    from sparsetrace.attribute import attribute
    from sparsetrace.dictionary.export import export_run
    from sparsetrace.dictionary.io import find_dictionaries
    from sparsetrace.dictionary.load import load_dictionary
    from sparsetrace.model.adapter import LanguageModel
    from sparsetrace.model.hookpoints import Hookpoint

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    export_run(a.run, "circuit-tracer", work / "ct_cache" / CACHE_NAME, overwrite=True)
    dicts = [load_dictionary(p) for p in find_dictionaries(a.run)]
    lm = LanguageModel.load(dicts[0].cfg.model_id or "smollm2-135m")
    ids = lm.tokenize(PROMPT)
    hps = [Hookpoint("mlp_in", d.cfg.layer) for d in dicts]
    out = lm.run(ids, read=hps)
    t = {"ids": ids[0].clone(), "clean_logits": out.logits[0, -1].float().contiguous()}
    with torch.no_grad():
        for d, hp in zip(dicts, hps, strict=True):
            x = out.acts[hp][0].float()
            t[f"mlp_in_L{d.cfg.layer}"] = x.contiguous()
            t[f"feat_L{d.cfg.layer}"] = d.features(x).contiguous()
    save_file(t, str(work / "inputs.safetensors"))
    g = attribute(lm, ids, dicts, max_feature_nodes=a.max_feature_nodes, prune=False)
    nodes = g.nodes
    codes = node_codes([KIND[n.kind] for n in nodes], [n.layer for n in nodes], [n.position for n in nodes],
                       [(n.token_id if n.kind == "logit" else n.feature) or 0 for n in nodes])
    src, dst, w = g.edges.numpy()
    np.savez(work / "edges_ours.npz", nodes=codes, src=codes[src], dst=codes[dst], w=w.astype(np.float32))
    emit({"layers": [d.cfg.layer for d in dicts], "activations": [d.cfg.activation for d in dicts],
          "n_features": [d.cfg.n_features for d in dicts], "n_tokens": int(ids.shape[1]),
          "n_active": g.metadata["n_active_features"], "n_edges": len(g.edges),
          "targets": [x["token"] for x in g.metadata["targets"]],
          "export_files": sorted(p.name for p in (work / "ct_cache" / CACHE_NAME).iterdir()),
          "export_mb": sum(p.stat().st_size for p in (work / "ct_cache" / CACHE_NAME).iterdir()) / 2**20})


def worker_peer(a) -> None:
    from importlib.metadata import version

    import numpy as np
    import torch
    from bench_attribute_peer import build_peer_model
    from circuit_tracer import attribute
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    ts, config = load_transcoders_from_cache(CACHE_NAME, cache_dir=work / "ct_cache", device=torch.device("cpu"),
                                             dtype=torch.float32)
    model, t = build_peer_model(work, transcoders=ts)
    ids = t["ids"].long()
    layers = sorted(int(k.split("_L")[1]) for k in t if k.startswith("feat_L"))
    res = {"config": {k: config[k] for k in ("model_kind", "feature_input_hook", "feature_output_hook")},
           "n_transcoders": len(ts), "d_transcoder": ts.d_transcoder, "per_layer": []}
    with torch.no_grad():
        logits, acts = model.get_activations(ids[None])
        res["logit_max_abs_diff_vs_ours"] = float((logits[0, -1] - t["clean_logits"]).abs().max())
        acts = acts.to_dense() if acts.is_sparse else acts
        for L in layers:
            ours = t[f"feat_L{L}"]
            n = ours.shape[1]
            enc = ts[L].encode(t[f"mlp_in_L{L}"])  # (a) the exported weights on our exact inputs
            e2e = acts[L, :, :n]  # (b) circuit-tracer's model forward + the export
            res["per_layer"].append({
                "layer": L, "max_abs_feature": float(ours.abs().max()),
                "encode_max_abs_diff": float((enc[:, :n] - ours).abs().max()),
                "encode_padding_max": float(enc[:, n:].abs().max()) if enc.shape[1] > n else 0.0,
                "e2e_max_abs_diff_pos1plus": float((e2e[1:] - ours[1:]).abs().max()),
                "active_ours_pos1plus": int((ours[1:] != 0).sum()), "active_peer_pos1plus": int((e2e[1:] != 0).sum()),
                "active_set_mismatches": int(((ours[1:] != 0) != (e2e[1:] != 0)).sum()),
            })
        others = [i for i in range(acts.shape[0]) if i not in layers]
        res["zero_layers_max_activation"] = float(acts[others].abs().max()) if others else 0.0
    g = attribute(ids, model, max_feature_nodes=a.max_feature_nodes, batch_size=a.peer_batch_size)
    A = g.adjacency_matrix
    n_pos, n_layers = len(g.input_tokens), g.cfg.n_layers
    sel = g.active_features[g.selected_features]  # (layer, pos, feature)
    logit_ids = [lt.vocab_idx for lt in g.logit_targets]
    kind = [1] * sel.shape[0] + [2] * (n_layers * n_pos) + [0] * n_pos + [3] * len(logit_ids)
    layer = sel[:, 0].tolist() + [i // n_pos for i in range(n_layers * n_pos)] + [-1] * n_pos + [n_layers] * len(logit_ids)
    pos = sel[:, 1].tolist() + [i % n_pos for i in range(n_layers * n_pos)] + list(range(n_pos)) + [n_pos - 1] * len(logit_ids)
    idx = sel[:, 2].tolist() + [0] * (n_layers * n_pos + n_pos) + logit_ids
    codes = node_codes(kind, layer, pos, idx)
    r, c = A.nonzero(as_tuple=True)
    np.savez(work / "edges_peer.npz", nodes=codes, src=codes[c.numpy()], dst=codes[r.numpy()],
             w=A[r, c].numpy().astype(np.float32))
    res.update(n_active=int(g.active_features.shape[0]), n_edges=int(r.numel()),
               targets=[lt.token_str for lt in g.logit_targets],
               versions={k: version(k) for k in ("circuit-tracer", "transformer-lens", "torch")})
    emit(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "default"))
    ap.add_argument("--max-feature-nodes", type=int, default=3000)
    ap.add_argument("--peer-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-python", default=None, help="python with sparsetrace (default: python3 on PATH)")
    ap.add_argument("--json", default=str(BENCH / "out" / "circuit_tracer_export.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (export, inputs, edges)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker == "ours":
        worker_ours(a)
        return 0
    if a.worker == "peer":
        worker_peer(a)
        return 0

    work = Path(tempfile.mkdtemp(prefix="ct_export_"))
    common = ["--run", str(Path(a.run).resolve()), "--workdir", str(work), "--threads", str(a.threads),
              "--max-feature-nodes", str(a.max_feature_nodes), "--peer-batch-size", str(a.peer_batch_size)]
    here = Path(__file__).resolve()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(BENCH)])}
    ours = run_worker(ours_python(a.ours_python), here, ["--worker", "ours", *common], env=env, timeout=1800)
    print("ours:", json.dumps(ours), flush=True)
    peer = run_worker(peer_python(), here, ["--worker", "peer", *common], env={"PYTHONPATH": str(BENCH)},
                      timeout=1800) if "error" not in ours else {"error": "skipped"}
    print("circuit-tracer:", json.dumps(peer), flush=True)
    report = {"run": a.run, "ours": ours, "circuit-tracer": peer, "feature_tol": FEATURE_TOL, "edge_tol": EDGE_TOL}
    ok = "error" not in ours and "error" not in peer
    if ok:
        report["edges"] = g = compare(work, "ours", "peer")
        checks = []
        for r in peer["per_layer"]:
            checks.append((f"L{r['layer']} encode on our mlp_in: max |df|", r["encode_max_abs_diff"], FEATURE_TOL))
            checks.append((f"L{r['layer']} circuit-tracer forward (pos>=1): max |df|", r["e2e_max_abs_diff_pos1plus"],
                           FEATURE_TOL))
        checks.append(("zero layers: max activation", peer["zero_layers_max_activation"], 0.0))
        checks.append(("graph edges: max |a-b| / largest |w| into the target", g["max_row_rel_diff"], EDGE_TOL))
        for name, v, tol in checks:
            print(f"{'ok ' if v <= tol else 'BAD'} {name:<60} {v:.2e} (tol {tol:.0e})")
            ok &= v <= tol
        print(f"graph: {g['edges_compared']} edges compared, feature nodes common/ours/peer "
              f"{g['common_feature_nodes']}/{g['first_feature_nodes']}/{g['second_feature_nodes']}, "
              f"only ours/peer {g['only_first']}/{g['only_second']}; logits vs ours max abs "
              f"{peer['logit_max_abs_diff_vs_ours']:.1e}; export {ours['export_mb']:.0f} MB, "
              f"{len(ours['export_files'])} files")
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
