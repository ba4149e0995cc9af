"""One-call GPU benchmark suite: training steps, bf16 matmul ceilings and attribution, one JSON file.

    bash bench/gpu.sh                          # CUDA, bf16 autocast, SmolLM2-135M shapes, ~6 min budget
    bash bench/gpu.sh --device cpu --tiny      # smoke test of the whole path on CPU (tiny shapes, ~1 min)
    python bench/gpu_suite.py --help           # the same, without the shell wrapper's checks

Written for the ``device`` tool's machine (one H200, no network, one command of at most 10 minutes), so:

- nothing is downloaded: the language model is a *random-weight* ``LlamaForCausalLM`` with SmolLM2-135M's
  shapes (:data:`SMOLLM2_SHAPE`), built locally with transformers; training data are seeded random
  activations (``bench/common.py``); attribution prompts are seeded random token ids. Speed does not
  depend on the weights' values except through how many features fire, which is set explicitly
  (``l0``) for the random transcoders, as ``bench_attribute.py``'s ``all30`` case does;
- each part runs in its own subprocess with a timeout taken from one overall budget (``--budget-s``),
  so a hang or a CUDA error in one part is recorded as that part's error and the rest still run;
- the results go to ONE JSON file: ``$OUT/gpu_results.json`` when ``$OUT`` is set (the device tool's
  output folder), else ``bench/out/gpu-<device>-<UTC time>.json``; an existing file is never overwritten.

Parts (``--parts``, default all):

``ceiling``    the bf16 (CUDA) / fp32 (CPU) dense matmul rate of this machine: the median of timed
               N x N x N ``torch.mm`` on random data (N 8192 on CUDA).
``train``      ``bench_train.py``'s own workers (``worker_ours``: ``LayerTrainer.train_step`` with
               everything in it), with ``bench_train``'s bf16 autocast on CUDA, per configuration in
               :data:`TRAIN_CONFIGS`; for dense ReLU steps the same process also times the five matmuls
               such a step cannot avoid (``bench_ceiling.py``'s ceiling) in the autocast dtype, and
               reports our step's fraction of it. The peers (sae-lens, sparsify) run too, through their
               own ``bench_train`` workers, only where ``bench/.venv-peers`` exists.
``attribute``  ``sparsetrace.attribute.attribute`` on the random SmolLM2-shaped model with random
               transcoders on all 30 layers (4608 features, about 32 active per token), at several
               prompt lengths, in float32 and under bf16 autocast; seconds per graph (best of
               ``repeat``), peak device memory, replacement exactness, graph sizes.

The summary's last line is the headline: our dense ReLU step's fraction of the bf16 matmul ceiling and its
tokens/s, the TopK step's tokens/s, and the attribution time at 128 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEER_PYTHON, RESULT_TAG, emit, fmt, median, peak_rss_mb, sync, table  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = ROOT / "src"

# SmolLM2-135M(-Instruct) as in its config.json (tests/test_gpu_bench.py compares with the cached copy).
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)

# (name, kind, activation, regime, d_model, expansion, batch); k = 32 (tiny: 8)
TRAIN_CONFIGS = [
    ("sae-relu-dense-576x32-b4096", "sae", "relu", "init", 576, 32, 4096),
    ("sae-relu-dense-576x32-b16384", "sae", "relu", "init", 576, 32, 16384),
    ("sae-relu-trainedL0-576x32-b4096", "sae", "relu", "trained", 576, 32, 4096),
    ("sae-topk-576x32-b4096", "sae", "topk", "init", 576, 32, 4096),
    ("transcoder-topk-576x32-b4096", "transcoder", "topk", "init", 576, 32, 4096),
    ("sae-relu-dense-768x32-b4096", "sae", "relu", "init", 768, 32, 4096),
]
TINY_TRAIN_CONFIGS = [
    ("sae-relu-dense-64x16-b256", "sae", "relu", "init", 64, 16, 256),
    ("sae-relu-trainedL0-64x16-b256", "sae", "relu", "trained", 64, 16, 256),
    ("sae-topk-64x16-b256", "sae", "topk", "init", 64, 16, 256),
]
# attribution precision modes: float32 model; float32 model under bf16 autocast; a bf16 copy of the model
# and transcoders (every tensor of the replacement model in bf16)
MODES = ("fp32", "bf16-autocast", "bf16-weights")
HEADLINE_TRAIN = ("sae-relu-dense-576x32-b4096", "sae-topk-576x32-b4096")
TINY_HEADLINE_TRAIN = ("sae-relu-dense-64x16-b256", "sae-topk-64x16-b256")


def _profile(a) -> dict:
    """All sizes and counts of one run; ``--tiny`` shrinks everything so a CPU finishes in about a minute."""
    if a.tiny:
        return dict(shape=TINY_SHAPE, train=TINY_TRAIN_CONFIGS, headline=TINY_HEADLINE_TRAIN, k=8,
                    warmup=1, steps=3, ceiling_n=256, ceiling_reps=3, mm_reps=3, n_features=256, l0=8.0,
                    cases=[(16, m, 1) for m in MODES], max_feature_nodes=64, headline_len=16, budget=300.0)
    return dict(shape=SMOLLM2_SHAPE, train=TRAIN_CONFIGS, headline=HEADLINE_TRAIN, k=32, warmup=10, steps=50,
                ceiling_n=8192, ceiling_reps=10, mm_reps=20, n_features=4608, l0=32.0,
                cases=[*((32, m, 2) for m in MODES), *((128, m, 2) for m in MODES), (512, "fp32", 1),
                       (512, "bf16-autocast", 1), (1024, "fp32", 1)],
                max_feature_nodes=3000, headline_len=128, budget=360.0)


# ================================================================================================ workers
def _bf16(device: str) -> bool:
    return device.startswith("cuda")


def _cpu_autocast(a):
    """On CPU with ``--cpu-autocast``: the same bf16 autocast the CUDA run uses, so that the smoke test
    goes through the autocast code paths (slow: CPU bf16 matmuls are emulated on most CPUs)."""
    import torch

    if not a.device.startswith("cuda") and a.cpu_autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mm_rate(n: int, reps: int, device: str, dtype) -> dict:
    """Median time of an n x n x n ``torch.mm`` on random data (never zeros) and its TFLOP/s."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    inner = 5 if device.startswith("cuda") else 1  # products per timed region (launch and sync overhead)
    for _ in range(3):
        torch.mm(xs[0], xs[1], out=out)
    sync(device)
    times = []
    for i in range(reps):
        t = time.perf_counter()
        for j in range(inner):
            torch.mm(xs[(i + j) % 2], xs[(i + j + 1) % 2], out=out)
        sync(device)
        times.append((time.perf_counter() - t) / inner)
    s = median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_s": s, "tflops": 2 * n**3 / s / 1e12,
            "reps": reps, "products_per_rep": inner}


def five_mm_ceiling(B: int, d: int, n: int, reps: int, device: str, dtype) -> dict:
    """``bench_ceiling.py``'s ceiling: the five matmuls of a dense ReLU step, bare, same layouts."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):  # on the device (a [16384, 18432] tensor drawn on the CPU would take seconds)
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x, w_enc, w_dec, f, dy = rnd(B, d), rnd(n, d), rnd(n, d), rnd(B, n), rnd(B, d)
    out_bn = torch.empty(B, n, device=device, dtype=dtype)
    out_bd = torch.empty(B, d, device=device, dtype=dtype)
    out_nd = torch.empty(n, d, device=device, dtype=dtype)

    inner = 10 if device.startswith("cuda") else 1  # steps' worth of matmuls per timed region

    def once() -> float:
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(x, w_enc.t(), out=out_bn)
            torch.mm(f, w_dec, out=out_bd)
            torch.mm(dy, w_dec.t(), out=out_bn)
            torch.mm(f.t(), dy, out=out_nd)
            torch.mm(f.t(), x, out=out_nd)
        sync(device)
        return (time.perf_counter() - t) / inner

    for _ in range(3):
        once()
    s = median([once() for _ in range(reps)])
    flops = 5 * 2 * B * d * n
    return {"dtype": str(dtype).replace("torch.", ""), "median_s": s, "tflops": flops / s / 1e12,
            "tokens_per_s": B / s, "flops_per_step": flops}


def worker_ceiling(a) -> None:
    import torch

    p = _profile(a)
    dtype = torch.bfloat16 if _bf16(a.device) else torch.float32
    emit({"part": "ceiling", **mm_rate(p["ceiling_n"], p["ceiling_reps"], a.device, dtype)})


def worker_train(a) -> None:
    """One training configuration through ``bench_train.worker_ours`` (its autocast on CUDA)."""
    import bench_train
    import torch

    p = _profile(a)
    name, kind, act, regime, d, e, B = next(c for c in p["train"] if c[0] == a.config)
    ns = argparse.Namespace(kind=kind, activation=act, regime=regime, d_model=d, expansion=e, batch=B, k=p["k"],
                            device=a.device, autocast=True, warmup=p["warmup"], steps=p["steps"])
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step, info = bench_train.worker_ours(ns)
    ac = _cpu_autocast(a)

    def run(i):
        with ac:
            step(i)

    times = _time(run, p["warmup"], p["steps"], a.device)
    res = {"part": "train", "config": name, "kind": kind, "activation": act, "regime": regime, "d_model": d,
           "n_features": d * e, "batch": B, "k": p["k"], **info(), "step_s": median(times),
           "best_step_s": min(times), "tokens_per_s": B / median(times), "n_steps": len(times),
           "autocast": "bf16" if (_bf16(a.device) or a.cpu_autocast) else "none",
           "peak_rss_mb": peak_rss_mb()}
    if a.device.startswith("cuda"):
        res["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if act == "relu" and regime == "init":
        dtype = torch.bfloat16 if _bf16(a.device) else torch.float32
        c = five_mm_ceiling(B, d, d * e, p["mm_reps"], a.device, dtype)
        res["ceiling"] = c
        res["fraction_of_ceiling"] = c["median_s"] / res["step_s"]
        res["step_tflops"] = c["flops_per_step"] / res["step_s"] / 1e12
    emit(res)


def _time(fn, warmup: int, steps: int, device: str) -> list[float]:
    for i in range(warmup):
        fn(i)
    sync(device)
    out = []
    for i in range(steps):
        t = time.perf_counter()
        fn(warmup + i)
        sync(device)
        out.append(time.perf_counter() - t)
    return out


class _IdTokenizer:
    """Stand-in tokenizer for a random-weight model: prompts are token ids; a token prints as ``<id>``."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [3 + (ord(ch) % 200) for ch in text]}

    def decode(self, ids, **_):
        ids = [ids] if isinstance(ids, int) else list(ids)
        return "".join(f"<{int(i)}>" for i in ids)


def random_smollm2(shape: dict, device: str, seed: int = 0):
    """A ``LanguageModel`` around a random-weight ``LlamaForCausalLM`` of the given shape (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsetrace.model.adapter import LanguageModel

    s = dict(shape)
    rope = s.pop("rope_theta")
    cfg = LlamaConfig(**s, hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": rope})
    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialised on the device: fast on a GPU
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return LanguageModel(model, _IdTokenizer(), "random-smollm2-shape")


def random_transcoders(lm, n_features: int, l0: float, device: str, seed: int = 0):
    """Random transcoders on every layer, ``b_enc`` set so about ``l0`` features fire per token on random
    calibration ids (as ``bench_attribute.random_transcoders``, without a tokenizer)."""
    import torch

    from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
    from sparsetrace.model.hookpoints import Hookpoint

    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, lm.vocab_size, (2, 48), generator=g).to(lm.device)
    ids[:, 0] = 1
    layers = list(range(lm.n_layers))
    out = lm.run(ids, read=[Hookpoint("mlp_in", L) for L in layers])
    dicts = []
    for L in layers:
        cfg = DictionaryConfig(kind="transcoder", d_in=lm.d_model, d_out=lm.d_model, n_features=n_features,
                               layer=L, model_id=lm.model_id)
        d = SparseDictionary(cfg, seed=seed + L).to(device)
        x = out.acts[Hookpoint("mlp_in", L)][:, 1:].reshape(-1, lm.d_model).float()
        with torch.no_grad():
            pre = x @ d.W_enc.t()
            thr = torch.quantile(pre.flatten()[::7].float().cpu(), 1 - l0 / n_features)
            d.b_enc.fill_(-float(thr))
            d.W_dec.mul_(x.norm(dim=-1).mean() / 8)
        dicts.append(d.eval())
    return dicts


def worker_attribute(a) -> None:
    """Attribution for each planned (prompt length, precision mode, repeat); one RESULT line per case, printed
    as it finishes, so that a timeout keeps the cases done so far."""
    import copy

    import torch

    from sparsetrace.attribute import attribute
    from sparsetrace.model.adapter import LanguageModel

    p = _profile(a)
    t0 = time.perf_counter()
    lm = random_smollm2(p["shape"], a.device)
    dicts = random_transcoders(lm, p["n_features"], p["l0"], a.device)
    variants = {"fp32": (lm, dicts)}
    if any(m == "bf16-weights" for _, m, _ in p["cases"]):
        lm16 = LanguageModel(copy.deepcopy(lm.model).to(torch.bfloat16), lm.tokenizer, lm.model_id)
        variants["bf16-weights"] = (lm16, [copy.deepcopy(d).to(torch.bfloat16) for d in dicts])
    variants["bf16-autocast"] = variants["fp32"]
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(7)
    ids_by_len = {}
    for n_tok, mode, repeat in p["cases"]:
        if n_tok not in ids_by_len:
            ids = torch.randint(3, lm.vocab_size, (1, n_tok), generator=g)
            ids[0, 0] = 1
            ids_by_len[n_tok] = ids
        ids = ids_by_len[n_tok]
        model, dd = variants[mode]
        if mode == "bf16-autocast":
            ac = torch.autocast("cuda" if a.device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
        else:
            ac = contextlib.nullcontext()
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        walls, g_full = [], None
        try:
            for _ in range(repeat):
                sync(a.device)
                t = time.perf_counter()
                with ac:
                    g_full = attribute(model, ids, dd, max_feature_nodes=p["max_feature_nodes"], prune=False)
                sync(a.device)
                walls.append(time.perf_counter() - t)
        except Exception as exc:  # recorded, and the next case still runs
            emit({"part": "attribute", "n_tokens": n_tok, "mode": mode,
                  "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        md = g_full.metadata
        res = {"part": "attribute", "n_tokens": n_tok, "mode": mode, "n_layers": lm.n_layers,
               "n_features_per_layer": p["n_features"], "seconds_per_graph": min(walls), "runs_s": walls,
               "setup_s": setup_s, "timings": md.get("timings"), "batch_size": md.get("batch_size"),
               "exactness_max_abs_logit_diff": md.get("exactness"), "targets": len(md.get("targets") or []),
               "n_active_features": md.get("n_active_features"), "n_feature_rows": md.get("n_feature_rows"),
               "nodes": len(g_full.nodes), "edges": len(g_full.edges), "peak_rss_mb": peak_rss_mb()}
        if a.device.startswith("cuda"):
            res["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
        emit(res)


WORKERS = {"ceiling": worker_ceiling, "train": worker_train, "attribute": worker_attribute}


# ================================================================================================ driver
def run_part(args: list[str], timeout: float, python: str | None = None, script: Path | None = None,
             env: dict | None = None) -> list[dict]:
    """Run a worker; return every RESULT line it printed (also those printed before a timeout)."""
    import tempfile

    if timeout <= 5:
        return [{"error": "skipped: overall time budget spent"}]
    e = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{BENCH}", "HF_HUB_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [python or sys.executable, str(script or Path(__file__).resolve()), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=e, cwd=str(ROOT))
        try:
            rc = proc.wait(timeout=timeout)
            note = None if rc == 0 else f"rc={rc}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            note = f"timeout after {timeout:.0f}s"
        out.seek(0)
        err.seek(0)
        res = [json.loads(line[len(RESULT_TAG):]) for line in out.read().splitlines() if line.startswith(RESULT_TAG)]
        if note:
            tail = " | ".join(err.read().strip().splitlines()[-4:])[-600:]
            res.append({"error": f"{note}: {tail}" if tail else note})
    return res


def environment(device: str) -> dict:
    import platform

    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpu_count": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        prop = torch.cuda.get_device_properties(torch.device(device))
        env.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, gpu=prop.name, capability=f"{prop.major}.{prop.minor}", gpu_memory_gb=prop.total_memory / 2**30,
                   multiprocessors=prop.multi_processor_count, cuda=torch.version.cuda,
                   bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            q = "name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw"
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=20).stdout.strip()
    return env


def check_prerequisites(device: str) -> str | None:
    """None if this machine can run the suite on ``device``, else the error line to print."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        return (f"error: python package missing: {exc.name}; the suite needs torch and transformers "
                f"(carry missing ones as wheels in .whl/, see bench/README.md)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return (f"error: --device {device} asked, but torch {torch.__version__} sees no CUDA device "
                    f"(torch.version.cuda={torch.version.cuda}); use --device cpu")
        idx = torch.device(device).index or 0
        if idx >= torch.cuda.device_count():
            return f"error: --device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
        if not torch.cuda.is_bf16_supported():
            return f"error: --device {device}: this GPU does not support bf16, which the suite measures"
    elif device != "cpu":
        return f"error: --device {device!r} is not supported; expected 'cuda', 'cuda:N' or 'cpu'"
    try:
        sys.path.insert(0, str(SRC))
        import sparsetrace  # noqa: F401
    except ImportError as exc:
        return f"error: cannot import sparsetrace from {SRC}: {exc}"
    return None


def out_path(a) -> Path:
    if a.out:
        return Path(a.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_results.json"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return BENCH / "out" / f"gpu-{a.device.replace(':', '')}-{'tiny-' if a.tiny else ''}{stamp}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of the whole path")
    p.add_argument("--parts", default="ceiling,train,attribute", help="comma list of ceiling, train, attribute")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall wall budget in seconds for all parts (default 360; --tiny 300)")
    p.add_argument("--out", default=None, help="results JSON (default $OUT/gpu_results.json or bench/out/)")
    p.add_argument("--cpu-autocast", action="store_true",
                   help="on CPU, train under bf16 autocast too (attribution always has a bf16-autocast mode)")
    p.add_argument("--worker", choices=list(WORKERS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    t_start = time.perf_counter()

    if a.worker:
        sys.path.insert(0, str(SRC))
        WORKERS[a.worker](a)
        return 0

    parts = [x for x in a.parts.split(",") if x]
    bad = [x for x in parts if x not in WORKERS]
    if bad or not parts:
        print(f"error: --parts {a.parts!r}: expected a comma list of {', '.join(WORKERS)}", file=sys.stderr)
        return 2
    err = check_prerequisites(a.device)
    if err:
        print(err, file=sys.stderr)
        return 2
    prof = _profile(a)
    budget = a.budget_s if a.budget_s is not None else prof["budget"]
    if budget <= 0:
        print(f"error: --budget-s {budget}: expected a positive number of seconds", file=sys.stderr)
        return 2
    dest = out_path(a)
    if dest.exists():
        print(f"error: {dest} exists; earlier results are not overwritten (pass another --out)", file=sys.stderr)
        return 2
    dest.parent.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    common = ["--device", a.device] + (["--tiny"] if a.tiny else []) + (["--cpu-autocast"] if a.cpu_autocast else [])
    results: dict = {"suite": "sparsetrace gpu_suite", "created_utc": datetime.now(timezone.utc).isoformat(),
                     "argv": sys.argv[1:], "tiny": a.tiny, "budget_s": budget, "environment": environment(a.device),
                     "model": {"kind": "random-weight LlamaForCausalLM", "shape": prof["shape"]},
                     "ceiling": None, "train": [], "attribute": []}
    print(f"# gpu_suite on {a.device}{' (tiny)' if a.tiny else ''}, budget {budget:.0f}s: "
          f"{json.dumps(results['environment'])}", flush=True)

    # shares of the budget: each part is capped so that the later ones keep time
    if "ceiling" in parts:
        r = run_part(["--worker", "ceiling", *common], timeout=min(60.0, left() * 0.15))
        results["ceiling"] = r[0] if r else {"error": "no result"}
        print(f"  ceiling: {_short(results['ceiling'])}", flush=True)
    peers = PEER_PYTHON.exists() and not a.tiny
    if "train" in parts:
        configs = prof["train"]
        share = left() * (0.45 if "attribute" in parts else 0.95)
        t_train = time.perf_counter()
        for i, c in enumerate(configs):
            remaining = share - (time.perf_counter() - t_train)
            each = remaining / (len(configs) - i) * (1.5 if i < len(configs) - 1 else 1.0)
            r = run_part(["--worker", "train", "--config", c[0], *common], timeout=min(each, remaining))
            rec = r[0] if r else {"error": "no result"}
            rec.setdefault("config", c[0])
            results["train"].append(rec)
            print(f"  train {c[0]}: {_short(rec)}", flush=True)
            if peers:
                results["train"].extend(_peers(c, prof, a, timeout=min(each, share - (time.perf_counter() - t_train))))
    if "attribute" in parts:
        r = run_part(["--worker", "attribute", *common], timeout=left() - 10)
        done = {(x.get("n_tokens"), x.get("mode")) for x in r}
        r += [{"part": "attribute", "n_tokens": n, "mode": m, "error": "not reached within the time budget"}
              for n, m, _ in prof["cases"] if (n, m) not in done]
        results["attribute"] = r
        for rec in r:
            print(f"  attribute {rec.get('n_tokens', '?')} tok {rec.get('mode', '')}: {_short(rec)}", flush=True)

    results["wall_s"] = time.perf_counter() - t_start
    results["headline"] = headline(results, prof)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(dest)
    print()
    print(summary_table(results))
    print(f"results: {dest} ({results['wall_s']:.0f}s)")
    print(results["headline"])
    return 0


def _peers(c, prof, a, timeout: float, python: Path = PEER_PYTHON) -> list[dict]:
    """sae-lens (ReLU SAE) / sparsify (TopK) through their own bench_train workers, when the venv exists."""
    name, kind, act, regime, d, e, B = c
    peer = "sae-lens" if (act == "relu" and kind == "sae") else ("sparsify" if act == "topk" else None)
    if peer is None:
        return []
    args = ["--worker", peer, "--kind", kind, "--activation", act, "--d-model", str(d), "--expansion", str(e),
            "--batch", str(B), "--k", str(prof["k"]), "--warmup", str(prof["warmup"]), "--steps",
            str(prof["steps"]), "--device", a.device, "--regime", regime]
    r = run_part(args, timeout, python=str(python), script=BENCH / "bench_train.py",
                 env={"PYTHONPATH": "", "SPARSIFY_DISABLE_TRITON": "1"})
    rec = r[0] if r else {"error": "no result"}
    rec.update(part="train-peer", peer=peer, config=name)
    print(f"  train {name} [{peer}]: {_short(rec)}", flush=True)
    return [rec]


def _short(r: dict) -> str:
    if not r:
        return "n/a"
    if "error" in r:
        return "ERROR " + str(r["error"])[:200]
    if r.get("part") == "ceiling":
        return f"{r['n']}^3 {r['dtype']} mm: {r['tflops']:.3g} TFLOP/s"
    if r.get("part") in ("train", "train-peer"):
        s = f"{fmt(r.get('tokens_per_s'))} tok/s, step {r.get('step_s', float('nan')) * 1e3:.2f} ms"
        if "fraction_of_ceiling" in r:
            s += f", {r['fraction_of_ceiling']:.2f} of the 5-matmul ceiling"
        return s
    if r.get("part") == "attribute":
        return (f"{r['seconds_per_graph']:.2f} s/graph, exactness {r.get('exactness_max_abs_logit_diff')}, "
                f"{r.get('edges')} edges, peak dev MB {fmt(r.get('peak_device_mb'))}")
    return json.dumps(r)[:200]


def summary_table(res: dict) -> str:
    rows = []
    for r in res["train"]:
        who = r.get("peer", "ours")
        rows.append([r.get("config", "?"), who, fmt(r.get("tokens_per_s")),
                     fmt(r.get("step_s", float("nan")) * 1e3, 2) if "step_s" in r else "n/a",
                     f"{r['fraction_of_ceiling']:.2f}" if "fraction_of_ceiling" in r else "-",
                     fmt(r.get("peak_device_mb")), "error" if "error" in r else "ok"])
    t1 = table(["train config", "who", "tok/s", "step ms", "frac. ceiling", "peak dev MB", ""], rows)
    rows = []
    for r in res["attribute"]:
        rows.append([str(r.get("n_tokens", "?")), r.get("mode", "?"),
                     fmt(r.get("seconds_per_graph"), 2), fmt(r.get("n_feature_rows")), fmt(r.get("edges")),
                     f"{r['exactness_max_abs_logit_diff']:.2e}" if r.get("exactness_max_abs_logit_diff") is not None
                     else "n/a", fmt(r.get("peak_device_mb")), "error" if "error" in r else "ok"])
    t2 = table(["attr tokens", "mode", "s/graph", "rows", "edges", "exactness", "peak dev MB", ""], rows)
    c = res.get("ceiling") or {}
    line = f"matmul rate: {_short(c)}" if c else "matmul rate: not measured"
    return "\n\n".join([line, t1, t2])


def headline(res: dict, prof: dict) -> str:
    by = {r.get("config"): r for r in res["train"] if r.get("part") == "train" and "error" not in r}
    dense, topk = (by.get(n) for n in prof["headline"])
    parts = []
    if dense:
        parts.append(f"dense ReLU step {dense['tokens_per_s']:,.0f} tok/s = {dense['fraction_of_ceiling']:.2f} of the "
                     f"{dense['ceiling']['dtype']} matmul ceiling ({dense['step_tflops']:.3g} TFLOP/s)")
    else:
        parts.append("dense ReLU step: n/a")
    parts.append(f"TopK step {topk['tokens_per_s']:,.0f} tok/s" if topk else "TopK step: n/a")
    c = res.get("ceiling") or {}
    if "tflops" in c:
        parts.append(f"{c['n']}^3 mm {c['tflops']:.3g} TFLOP/s")
    att = [r for r in res["attribute"] if r.get("n_tokens") == prof["headline_len"] and "error" not in r]
    if att:
        parts.append("attribution " + ", ".join(f"{r['mode']} {r['seconds_per_graph']:.2f} s" for r in att)
                     + f" at {prof['headline_len']} tokens")
    else:
        parts.append("attribution: n/a")
    n_err = sum("error" in r for r in [*res["train"], *res["attribute"], c] if r)
    return f"gpu headline ({res['environment']['device']}): " + "; ".join(parts) + f"; errors {n_err}"


if __name__ == "__main__":
    sys.exit(main())
