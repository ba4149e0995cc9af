"""Attribution on long prompts: sparsetrace vs circuit-tracer 0.5.0, time and memory against prompt length.

    python bench/bench_attribution_scaling.py --run RUN [--lengths 32,128,512,1024] [--tools ours,circuit-tracer]
        [--mem-cap-gb 16] [--time-limit-s 1800] [--force] [--max-feature-nodes 3000] [--batch-size N]
        [--peer-batch-size 32] [--threads 2] [--out bench/out/attribution_scaling.json] [--overwrite]
    python bench/bench_attribution_scaling.py --random ...      # seeded random transcoders on all 30 layers

Weights: ``--run`` a run folder of ``sparsetrace run`` holding one ReLU per-layer transcoder for every
layer of SmolLM2-135M (default ``runs/default``, i.e. the repository's ``runs/default``; the main job's
30-layer run is the intended input), or ``--random``: ``bench_attribute.random_transcoders`` (4608 features
per layer, ~32 active per token, seeded). Both tools get the same weights: a prep process writes them
(folded ``W_enc``/``b_enc``/``W_dec``/``b_dec``) with the token ids to a work folder; circuit-tracer's
``TranscoderSet`` is built from them in memory, ours loads the run with ``load_mlp_replacement`` (or,
with ``--random``, the same saved tensors). The circuit-tracer model is built as in
``bench_attribute_peer.py`` (see its docstring for why its own loaders cannot be used offline here).

Prompts: real text from the held-out corpus source (``--corpus``, default ``heldout``: the CIA World
Factbook passages that no training mix contains), its first documents joined by blank lines and
tokenised once with BOS; the prompt of length n is the first n token ids, the same ids for both tools.

Each (tool, length) runs in its own fresh process, lengths in increasing order, the two tools alternating
who goes first. Limits per process: ``--time-limit-s`` wall seconds from spawn, and ``--mem-cap-gb`` of
resident memory, enforced by a watchdog in the driver that reads the child's RSS from /proc every 20 ms
and kills it (SIGKILL) once it passes the cap (RLIMIT_AS is not used: address-space limits count
virtual reservations of torch, OpenMP and mapped files rather than memory used). A side that hits a
limit records it as its result ("> limit" / "OOM at cap") and its larger lengths are not run
("not run: hit limit at N tokens") unless ``--force``.

Same settings for both: ``max_feature_nodes``, the target rule (top logits covering 95% of the
probability, at most 10), threads (``--threads``, dropping to 1 when the 1-minute load average exceeds
1.5 x CPUs: ours's ``auto_threads``, applied to the peer too). Batch: ours its default
(``auto_batch_size``: about 3072 / n_tokens targets per backward, within 8..256) unless ``--batch-size``;
circuit-tracer ``--peer-batch-size`` (32, its fastest in ``bench_attribute_peer``'s sweep on 24 tokens).
Timed: ours ``attribute(lm, ids, rep, prune=False)`` (replacement model with its clean and recorded
forwards, all rows, nodes, influence and graph scores), circuit-tracer ``attribute(ids, model)``.
Recorded per run: the attribution call's wall time, the process's wall time (spawn to exit, including
imports and model loading), peak RSS during the call (sampled every 5 ms in the worker) and its rise
over the RSS before the call, ``ru_maxrss``, the watchdog's peak, active features, rows, edges (ours:
stored edges; circuit-tracer: non-zero entries of its dense adjacency).

Output: a table, per tool the growth with prompt length (time and peak-RSS ratio per step, and the
exponent of a least-squares power-law fit), a JSON file (``--out``; an existing file is not replaced
without ``--overwrite``), and a last line comparing both at 512 tokens with ours's memory at 1024.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULT_TAG, emit, fmt, machine_line, peer_python, table  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TOOLS = ("ours", "circuit-tracer")


# ------------------------------------------------------------------------------------------ workers
def worker_prep(a) -> None:
    """Token ids (the longest prompt) and the transcoder weights both tools use, to ``workdir``."""
    import torch
    from safetensors.torch import save_file

    from sparsetrace.data.corpus import load_corpus
    from sparsetrace.model.adapter import LanguageModel

    torch.set_num_threads(a.threads)
    lm = LanguageModel.load("smollm2-135m")
    n_max = max(a.lengths_list)
    texts, ids = load_corpus(a.corpus).texts, None
    for k in range(1, len(texts) + 1):
        text = "\n\n".join(texts[:k])
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + 1 >= n_max:
            break
    bos = lm.tokenizer.bos_token_id
    ids = torch.tensor(([bos] if bos is not None else []) + ids)[:n_max]
    if ids.numel() < n_max:
        raise SystemExit(f"corpus '{a.corpus}' has only {ids.numel()} tokens; the longest prompt needs {n_max}")
    dicts = _dictionaries(a, lm)
    tensors = {"ids": ids.clone()}
    for d in dicts:
        c = d.cfg
        if c.kind != "transcoder" or c.activation != "relu" or (c.hookpoint_in, c.hookpoint_out) != ("mlp_in", "mlp_out"):
            raise SystemExit(f"layer {c.layer}: {c.kind}/{c.activation} {c.hookpoint_in}->{c.hookpoint_out}; this "
                             "benchmark gives circuit-tracer plain ReLU transcoders mlp_in -> mlp_out only")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            tensors[f"L{c.layer}.{name}"] = getattr(d, name).detach().float().contiguous().clone()
    layers = sorted(d.cfg.layer for d in dicts)
    if layers != list(range(lm.n_layers)):
        raise SystemExit(f"{a.run}: transcoders for layers {layers}; this benchmark needs one for every layer "
                         f"0..{lm.n_layers - 1} (the full replacement)")
    with torch.no_grad():  # causal model: the logits at n - 1 are the length-n prompt's next-token logits
        logits = lm.model(ids[None]).logits[0].float()
    for n in a.lengths_list:
        tensors[f"clean_logits_{n}"] = logits[n - 1].contiguous()
    save_file(tensors, str(Path(a.workdir) / "inputs.safetensors"))
    emit({"n_tokens": int(ids.numel()), "layers": len(layers), "n_features": int(dicts[0].cfg.n_features),
          "text_head": lm.tokenizer.decode(ids[1:40].tolist())})


def _dictionaries(a, lm):
    if a.random:
        from bench_attribute import random_transcoders

        return random_transcoders(lm)
    from sparsetrace.attribute.scores import load_mlp_replacement

    return list(load_mlp_replacement(a.run, "plt").by_layer.values())


def _saved_dictionaries(work: Path, lm):
    """The transcoders as saved by the prep worker (used by ours with ``--random``)."""
    import torch
    from safetensors.torch import load_file

    from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary

    t = load_file(str(work / "inputs.safetensors"))
    dicts = []
    for layer in sorted(int(k[1:].split(".")[0]) for k in t if k.endswith(".W_enc")):
        w = {k: t[f"L{layer}.{k}"] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        n, d = w["W_enc"].shape
        sd = SparseDictionary(DictionaryConfig(kind="transcoder", d_in=d, d_out=w["W_dec"].shape[1], n_features=n,
                                               layer=layer, model_id=lm.model_id))
        with torch.no_grad():
            for k, v in w.items():
                getattr(sd, k).copy_(v)
        dicts.append(sd.eval())
    return dicts


def _timed(call):
    """Run ``call()`` with the RSS sampler; returns (result, seconds, peak bytes, rise bytes)."""
    import gc

    from bench_attribute_peer import RssSampler

    gc.collect()
    with RssSampler() as s:
        t = time.perf_counter()
        out = call()
        dt = time.perf_counter() - t
    return out, dt, s.peak, s.peak - s.start


def worker_ours(a) -> None:
    import torch
    from safetensors.torch import load_file

    from sparsetrace.attribute import attribute
    from sparsetrace.model.adapter import LanguageModel

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    lm = LanguageModel.load("smollm2-135m")
    t = load_file(str(work / "inputs.safetensors"))
    ids = t["ids"][: a.n_tokens].long()[None]
    if a.random:
        rep = _saved_dictionaries(work, lm)
    else:
        from sparsetrace.attribute.scores import load_mlp_replacement

        rep = load_mlp_replacement(a.run, "plt")
    del t
    g, dt, peak, rise = _timed(lambda: attribute(lm, ids, rep, max_feature_nodes=a.max_feature_nodes,
                                                 batch_size=a.batch_size or None, prune=False))
    m = g.metadata
    emit({"attribution_s": dt, "peak_rss_call": peak, "rss_rise_call": rise,
          "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "n_active": m["n_active_features"], "rows": m["n_feature_rows"] + len(m["targets"]),
          "n_logits": len(m["targets"]), "edges": len(g.edges), "nodes": len(g.nodes), "threads": m["num_threads"],
          "batch_size": m["batch_size"], "timings": m["timings"], "exactness": m["exactness"],
          "targets": [x["token"] for x in m["targets"]], "scores": m["scores"], "torch": torch.__version__})


def worker_peer(a) -> None:
    from importlib.metadata import version

    import torch
    from bench_attribute_peer import auto_threads, build_peer_model
    from circuit_tracer import attribute

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    model, t = build_peer_model(work)
    ids = t["ids"][: a.n_tokens].long()
    clean = t[f"clean_logits_{a.n_tokens}"]
    del t
    with torch.no_grad():
        logit_diff = float((model(ids[None])[0, -1] - clean).abs().max())
    n = auto_threads(a.threads)
    torch.set_num_threads(n)
    g, dt, peak, rise = _timed(lambda: attribute(ids, model, max_feature_nodes=a.max_feature_nodes,
                                                 batch_size=a.peer_batch_size))
    A = g.adjacency_matrix
    edges = sum(int(torch.count_nonzero(A[i:i + 1024])) for i in range(0, A.shape[0], 1024))
    emit({"attribution_s": dt, "peak_rss_call": peak, "rss_rise_call": rise,
          "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "n_active": int(g.active_features.shape[0]), "rows": int(g.selected_features.numel()) + len(g.logit_targets),
          "n_logits": len(g.logit_targets), "edges": edges, "nodes": int(A.shape[0]), "threads": n,
          "batch_size": a.peer_batch_size, "dense_adjacency_bytes": A.numel() * A.element_size(),
          "targets": [lt.token_str for lt in g.logit_targets], "logit_max_abs_diff_vs_ours": logit_diff,
          "versions": {k: version(k) for k in ("circuit-tracer", "transformer-lens", "transformers", "torch")}})


# ------------------------------------------------------------------------------------------ driver
def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def launch(python: str, args: list[str], *, cap_bytes: int, time_limit: float, env: dict | None = None,
           nice: int = 0) -> dict:
    """Run one worker under the watchdog: RESULT dict, plus ``process_s`` and ``watchdog_peak``; on a
    limit, ``limit`` is ``"time"`` or ``"memory"``; on a crash, ``error``."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    out = tempfile.TemporaryFile(mode="w+")
    err = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), *args], stdout=out, stderr=err, env=e,
                            cwd=str(ROOT), preexec_fn=(lambda: os.nice(nice)) if nice else None)
    peak, limit = 0, None
    while proc.poll() is None:
        rss = _rss(proc.pid)
        peak = max(peak, rss)
        if rss > cap_bytes:
            limit = "memory"
        elif time.perf_counter() - t0 > time_limit:
            limit = "time"
        if limit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.02)
    res: dict = {}
    out.seek(0)
    for line in reversed(out.read().splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            break
    if limit:
        res = {"limit": limit}
    elif not res:
        err.seek(0)
        tail = err.read().strip().splitlines()[-6:]
        res = {"error": f"rc={proc.returncode}: " + " | ".join(tail)}
    res.update(process_s=time.perf_counter() - t0, watchdog_peak=peak)
    out.close()
    err.close()
    return res


def gb(x: float | None) -> float | None:
    return None if x is None else x / 1e9


def peak_of(r: dict) -> float | None:
    """A completed run's peak memory: the largest of the worker's sampled peak, ru_maxrss, the watchdog's."""
    if "attribution_s" not in r:
        return None
    return max(r["peak_rss_call"], r["ru_maxrss"], r.get("watchdog_peak", 0))


def status(r: dict, a) -> str:
    if "skipped" in r:
        return r["skipped"]
    if r.get("limit") == "time":
        return f"> limit ({a.time_limit_s:.0f} s)"
    if r.get("limit") == "memory":
        return f"OOM at cap ({a.mem_cap_gb:g} GB)"
    if "error" in r:
        return "error: " + r["error"][:80]
    return "ok"


def growth(points: list[tuple[int, float]]) -> dict:
    """Per step (n1 -> n2): ratio and exponent log(ratio)/log(n2/n1); least-squares exponent over all."""
    steps = []
    for (n1, y1), (n2, y2) in zip(points, points[1:], strict=False):
        steps.append({"from": n1, "to": n2, "ratio": y2 / y1, "exponent": math.log(y2 / y1) / math.log(n2 / n1)})
    fit = None
    if len(points) >= 2:
        xs = [math.log(n) for n, _ in points]
        ys = [math.log(y) for _, y in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"steps": steps, "fitted_exponent": fit, "per_4x_tokens": None if fit is None else 4 ** fit}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "default"),
                    help="run folder with a ReLU transcoder on every layer (default: runs/default)")
    ap.add_argument("--random", action="store_true", help="seeded random transcoders on all 30 layers instead")
    ap.add_argument("--lengths", default="32,128,512,1024")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--corpus", default="heldout", help="prompt text source (a sparsetrace --corpus value)")
    ap.add_argument("--max-feature-nodes", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=0, help="ours (default: its auto_batch_size)")
    ap.add_argument("--peer-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gb", type=float, default=16.0)
    ap.add_argument("--time-limit-s", type=float, default=1800.0)
    ap.add_argument("--force", action="store_true", help="run larger lengths even after a side hit a limit")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the worker processes")
    ap.add_argument("--ours-python", default=None, help="python with sparsetrace (default: this one, or python3)")
    ap.add_argument("--out", default=str(BENCH / "out" / "attribution_scaling.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-tokens", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        a.lengths_list = sorted({int(x) for x in a.lengths.split(",") if x.strip()})
    except ValueError:
        a.lengths_list = []
    if a.worker == "prep":
        worker_prep(a)
        return 0
    if a.worker == "ours":
        worker_ours(a)
        return 0
    if a.worker == "peer":
        worker_peer(a)
        return 0

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not a.lengths_list or min(a.lengths_list) < 2 or max(a.lengths_list) > 2048:
        return fail(f"--lengths '{a.lengths}' is invalid; expected comma-separated token counts in 2..2048")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    if not tools or any(t not in TOOLS for t in tools):
        return fail(f"--tools '{a.tools}' is invalid; expected a comma list of {', '.join(TOOLS)}")
    if not a.random and not Path(a.run).is_dir():
        return fail(f"--run '{a.run}' is not a folder; expected a run folder of `sparsetrace run` with a ReLU "
                    "transcoder on every layer (or pass --random)")
    for name in ("mem_cap_gb", "time_limit_s"):
        if getattr(a, name) <= 0:
            return fail(f"--{name.replace('_', '-')} {getattr(a, name)} is invalid; expected a positive number")
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        return fail(f"--out '{out}' exists; pass --overwrite to replace it or choose another --out")
    from bench_attribute_peer import ours_python

    py_ours = ours_python(a.ours_python)
    py_peer = str(peer_python()) if "circuit-tracer" in tools else None
    cap = int(a.mem_cap_gb * 1e9)
    weights = "random (bench_attribute.random_transcoders)" if a.random else str(Path(a.run).resolve())
    print(f"# bench_attribution_scaling: lengths {a.lengths_list}, tools {tools}, weights {weights}, "
          f"max_feature_nodes {a.max_feature_nodes}, cap {a.mem_cap_gb:g} GB, time limit {a.time_limit_s:.0f} s "
          f"({machine_line()})", flush=True)
    common = ["--workdir", "", "--max-feature-nodes", str(a.max_feature_nodes), "--threads", str(a.threads),
              "--lengths", ",".join(map(str, a.lengths_list)), "--corpus", a.corpus, "--run", a.run]
    if a.random:
        common.append("--random")
    results: dict[str, dict[int, dict]] = {t: {} for t in tools}
    with tempfile.TemporaryDirectory(prefix="attr_scaling_") as work:
        common[1] = work
        prep = launch(py_ours, ["--worker", "prep", *common], cap_bytes=cap, time_limit=max(a.time_limit_s, 900),
                      nice=a.nice)
        if "n_tokens" not in prep:
            return fail(f"preparing prompts and weights failed: {prep.get('error') or prep.get('limit')}")
        print(f"  prompt: {prep['n_tokens']} tokens from '{a.corpus}' ({prep['text_head']!r}...); "
              f"{prep['layers']} transcoders x {prep['n_features']} features", flush=True)
        hit: dict[str, int] = {}
        for i, n in enumerate(a.lengths_list):
            for tool in (tools if i % 2 == 0 else tools[::-1]):
                if tool in hit and not a.force:
                    results[tool][n] = {"skipped": f"not run: hit limit at {hit[tool]} tokens"}
                    continue
                if tool == "ours":
                    r = launch(py_ours, ["--worker", "ours", *common, "--n-tokens", str(n),
                                         "--batch-size", str(a.batch_size)],
                               cap_bytes=cap, time_limit=a.time_limit_s, nice=a.nice)
                else:
                    r = launch(py_peer, ["--worker", "peer", *common, "--n-tokens", str(n),
                                         "--peer-batch-size", str(a.peer_batch_size)],
                               cap_bytes=cap, time_limit=a.time_limit_s, nice=a.nice, env={"PYTHONPATH": ""})
                r["load_avg"] = os.getloadavg()[0]
                results[tool][n] = r
                if "limit" in r or "error" in r:
                    hit.setdefault(tool, n)
                st = status(r, a)
                what = (f"{r['attribution_s']:.1f} s, peak {gb(peak_of(r)):.2f} GB" if st == "ok" else st)
                print(f"  {n:>5} tokens {tool:>14}: {what} (process {r['process_s']:.0f} s, load "
                      f"{r['load_avg']:.1f})", flush=True)
    return report(a, tools, results, prep, weights, out)


def report(a, tools, results, prep, weights, out: Path) -> int:
    rows, growths = [], {}
    for tool in tools:
        for n in a.lengths_list:
            r = results[tool].get(n, {"skipped": "not run"})
            st = status(r, a)
            ok = st == "ok"
            rows.append([str(n), tool, st if not ok else "ok",
                         fmt(r.get("attribution_s"), 1) if ok else "-", fmt(r.get("process_s"), 0),
                         fmt(gb(peak_of(r)), 2) if ok else fmt(gb(r.get("watchdog_peak")), 2) + " (at kill)"
                         if "limit" in r else "-",
                         fmt(gb(r.get("rss_rise_call")), 2) if ok else "-",
                         fmt(r.get("n_active")) if ok else "-", fmt(r.get("rows")) if ok else "-",
                         fmt(r.get("edges")) if ok else "-", str(r.get("batch_size", "-")), str(r.get("threads", "-"))])
        done = [(n, results[tool][n]) for n in a.lengths_list if status(results[tool].get(n, {"skipped": ""}), a) == "ok"]
        growths[tool] = {"attribution_s": growth([(n, r["attribution_s"]) for n, r in done]),
                         "peak_rss": growth([(n, peak_of(r)) for n, r in done]),
                         "rss_rise": growth([(n, max(r["rss_rise_call"], 1)) for n, r in done]),
                         "edges": growth([(n, max(r["edges"], 1)) for n, r in done])}
    print()
    print(table(["tokens", "tool", "result", "attribution s", "process s", "peak RSS GB", "rise GB",
                 "active feats", "rows", "edges", "batch", "threads"], rows))
    print()
    for tool in tools:
        g = growths[tool]
        for key, label in (("attribution_s", "time"), ("peak_rss", "peak RSS"), ("rss_rise", "RSS rise")):
            steps = ", ".join(f"{s['from']}->{s['to']}: x{s['ratio']:.2f} (n^{s['exponent']:.2f})" for s in g[key]["steps"])
            fit = g[key]["fitted_exponent"]
            print(f"  {tool:>14} {label:>9}: {steps or 'n/a'}; fit n^{fit:.2f} = x{g[key]['per_4x_tokens']:.1f} per 4x tokens"
                  if fit is not None else f"  {tool:>14} {label:>9}: n/a (fewer than 2 lengths ran)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not a.overwrite:  # appeared while running: keep both
        out = out.with_name(f"{out.stem}_{time.strftime('%Y%m%d_%H%M%S')}{out.suffix}")
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k not in ("worker", "workdir", "n_tokens")},
                               "weights": weights, "prompt": prep, "machine": machine_line(),
                               "results": {t: {str(n): r for n, r in rs.items()} for t, rs in results.items()},
                               "growth": growths}, indent=1))
    print(f"  written: {out}")
    print(last_line(a, results))
    return 0


def last_line(a, results) -> str:
    def side(tool: str, n: int) -> str:
        r = results.get(tool, {}).get(n)
        if r is None:
            return "n/a"
        st = status(r, a)
        return f"{r['attribution_s']:.1f} s / {gb(peak_of(r)):.2f} GB" if st == "ok" else st

    o, p = results.get("ours", {}).get(512), results.get("circuit-tracer", {}).get(512)
    ratio = "n/a"
    if o and p and status(o, a) == "ok" and status(p, a) == "ok":
        ratio = (f"speed-up {p['attribution_s'] / o['attribution_s']:.1f}x, memory ratio "
                 f"{peak_of(o) / peak_of(p):.2f}x")
    elif o and p and status(o, a) == "ok" and "limit" in p:
        ratio = f"speed-up > {a.time_limit_s / o['attribution_s']:.1f}x" if p["limit"] == "time" else \
            f"memory ratio < {peak_of(o) / (a.mem_cap_gb * 1e9):.2f}x"
    r1024 = results.get("ours", {}).get(1024)
    z = (f"{gb(peak_of(r1024)):.2f} GB" if r1024 and status(r1024, a) == "ok" else
         (status(r1024, a) if r1024 else "n/a"))
    return (f"at 512 tokens: ours {side('ours', 512)} vs circuit-tracer {side('circuit-tracer', 512)}: {ratio}; "
            f"ours at 1024 tokens: {z}")


if __name__ == "__main__":
    sys.exit(main())
