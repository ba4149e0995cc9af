"""CLT training-step throughput and peak memory: sparsetrace vs decode-clt (PyPI 0.0.1).

    bash bench/peers/setup_declt_venv.sh            # once: bench/.venv-declt with decode-clt
    nice -n 10 python bench/bench_clt_peer.py       # 30 layers x d 576 (SmolLM2-135M), F 1152, B 1024
    nice -n 10 python bench/bench_clt_peer.py --activation topk --batch 4096 --steps 3

Both sides train a cross-layer transcoder of SmolLM2-135M's shapes (``--layers`` 30, ``--d-model`` 576,
``--features`` per layer, untied decoders: one per (source, target) pair with target >= source) on the
same seeded random MLP inputs and outputs (bench/common.py ``random_activations``, one stream per layer,
identical in both processes since both run torch 2.13.0). Nothing is downloaded: no model, no data set.
Each side runs in its own process (ours with this python, decode-clt with ``bench/.venv-declt/bin/python``)
so peak RSS (``ru_maxrss``) is each side's own. By default one side runs at a time (a fresh process each,
the order alternating over ``--reps``): at SmolLM2's size each side holds 6-9 GB, too much for both at
once on a shared 24 GB box; ``--interleave`` keeps both alive and alternates single steps instead. A side
starts only when /proc/meminfo shows room for it (``--wait-memory``), and every worker sets its own
``oom_score_adj`` to 1000 so that, if memory still runs out, the kernel ends the benchmark and not
someone else's job.

What one step is on each side:

- decode-clt: its own ``CLTTrainer.train()`` loop, unchanged. The trainer is built by its constructor with
  ``activation_source="local_manifest"``; only the factory that would open an on-disk activation manifest
  (``clt.training.trainer.create_activation_store``) is replaced by an in-memory iterator that hands it the
  batches. A step is timed from one batch fetch to the next, so it holds everything ``train()`` does per
  step: feature activations, ``LossManager.compute_total_loss`` (its forward, MSE per target layer,
  tanh sparsity penalty with decoder norms, pre-activation loss), dead-feature counters, backward,
  gradient clipping, the optimizer and LR-scheduler steps, its progress bar and metric logging.
  Its evaluation falls on step 0 (untimed warm-up) only; no checkpoint falls in the measured steps.
- ours: see ``worker_ours`` (the CLT trainer step when ``sparsetrace.train`` has one, otherwise a
  clearly labelled placeholder: a dense autograd step on ``sparsetrace.dictionary.clt``).

Activations are matched as its API allows (``--l0`` per layer, default 32):
- ``jumprelu``: both sides start with thresholds that give ``--l0`` active features per layer and token on
  the first batch. Ours: its trainer's own per-feature initialisation with ``init_l0_factor=1`` (each
  feature fires on L0/F of the tokens). decode-clt: its config takes one scalar threshold, so its
  ``log_threshold`` parameter is written after construction, one value per layer (``common.l0_shift``).
  Ours holds its thresholds and λ for the first 10% of its steps; decode-clt ramps λ linearly from 0.
- ``topk``: ours keeps ``k = --l0`` per layer and token; decode-clt's TopK (and BatchTopK) select over the
  concatenation of all layers (``topk_mode="global"``; its ``"per_layer"`` mode routes through ``encode``,
  which handles only ReLU/JumpReLU and returns zeros), so it gets ``k = --l0 * --layers`` per token:
  the same total L0, not the same per-layer L0.

Both use fp32, Adam at the same learning rate, gradient clipping at norm 1, a pre-activation loss of
weight 3e-6 (decode-clt's default), a 1000-step schedule. The table gives tokens/s (batch
over the median step wall time), CPU seconds per step (user + system of that process), peak RSS and the
mean L0 per layer (ours: the trainer's own L0 of its last timed step; decode-clt: on the first pool batch
after the timed steps). The last line is ours tokens/s over decode-clt's (each the batch over its median
step wall time).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH,
    READY,
    STEP,
    Served,
    emit,
    fmt,
    l0_shift,
    machine_line,
    median,
    peak_rss_mb,
    random_activations,
    table,
)

DECLT_PYTHON = BENCH / ".venv-declt" / "bin" / "python"
POOL = 2  # distinct batches cycled through
LR = 2e-4
PREACT = 3e-6  # decode-clt's default pre-activation loss weight; ours is given the same


# ------------------------------------------------------------------------------------------ data
def _data(a):
    """``POOL`` batches, each a list over layers of (mlp_in [B, d], mlp_out [B, d])."""
    ins = [random_activations(POOL, a.batch, a.d_model, seed=1000 + layer) for layer in range(a.layers)]
    outs = [random_activations(POOL, a.batch, a.d_model, seed=5000 + layer) for layer in range(a.layers)]
    return [([ins[i][p] for i in range(a.layers)], [outs[i][p] for i in range(a.layers)]) for p in range(POOL)]


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _need_gb(a) -> float:
    """Rough resident need of one side: parameters, gradients and two Adam moments in fp32, the batches
    and the dense [B, F] codes per layer, plus 1 GB of interpreter and library."""
    n_dec = a.layers * (a.layers + 1) // 2
    params = (a.layers + n_dec) * a.features * a.d_model
    acts = POOL * 2 * a.layers * a.batch * a.d_model + 4 * a.layers * a.batch * a.features
    return (4 * params + acts) * 4 / 2**30 + 1.0


def _wait_for_memory(need: float, wait_s: float) -> None:
    """The box is shared: start a side only when it fits in what is free (else the kernel's OOM killer
    picks a victim, maybe someone else's process)."""
    t0 = time.perf_counter()
    while (free := _mem_available_gb()) < need:
        if time.perf_counter() - t0 > wait_s:
            raise SystemExit(f"error: {free:.1f} GB available after waiting {wait_s:.0f}s; a side needs about "
                             f"{need:.1f} GB (lower --features/--batch or free memory)")
        print(f"  waiting for memory: {free:.1f} GB available, about {need:.1f} GB needed", flush=True)
        time.sleep(20)


def _first_to_go() -> None:
    """Make this worker the kernel's first choice if the shared box runs out of memory, so that the
    OOM killer ends this benchmark rather than someone else's job (Linux; best effort)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------------------ ours
def worker_ours(a):
    """Our CLT training step. Returns (step(i), l0_after(), label)."""
    import torch

    pool = _data(a)
    try:
        from sparsetrace.train.clt import CLTTrainer
    except ImportError:  # before the CLT trainer is on this branch
        return _ours_placeholder(a, pool, torch)
    from sparsetrace.train.config import TrainConfig

    act = a.activation
    tcfg = TrainConfig(kind="clt", layers=list(range(a.layers)), activation=act, n_features=a.features,
                       target_l0=float(a.l0), k=a.l0 if act == "topk" else None, batch_size=a.batch,
                       n_tokens=1000 * a.batch, epochs=1.0, lr=LR, init_l0_factor=1.0, preact_coef=PREACT,
                       seed=0).validate()
    tr = CLTTrainer(tcfg, n_layers=a.layers, d_model=a.d_model, model_id="random-smollm2-shapes",
                    in_scales=[1.0] * a.layers, out_scales=[1.0] * a.layers)
    hp_in, hp_out = tcfg.hookpoints
    batches = [{**{f"{hp_in}.{i}": x for i, x in enumerate(xs)}, **{f"{hp_out}.{i}": y for i, y in enumerate(ys)}}
               for xs, ys in pool]

    def step(i):
        tr.train_step(batches[i % POOL])

    def l0_after():
        return sum(tr.last_l0) / a.layers if tr.last_l0 else float("nan")

    return step, l0_after, "ours (sparsetrace.train.clt.CLTTrainer.train_step)"


def _ours_placeholder(a, pool, torch):
    """PLACEHOLDER, not our trainer: a dense autograd step on ``sparsetrace.dictionary.clt``
    (encode every layer, ``decode_all``, per-layer MSE + tanh(c * f * ||W_dec||) penalty, backward,
    clip, Adam). It decodes densely, as decode-clt does; the real trainer decodes sparsely."""
    import torch.nn.functional as F

    from sparsetrace.dictionary.clt import CLTConfig, CrossLayerTranscoder

    act = a.activation
    cfg = CLTConfig(n_layers=a.layers, d_model=a.d_model, n_features=a.features, activation=act,
                    k=a.l0 if act == "topk" else None)
    clt = CrossLayerTranscoder(cfg, seed=0)
    xs0 = pool[0][0]
    if act == "jumprelu":
        with torch.no_grad():
            for layer, x in enumerate(xs0):
                clt.log_threshold[layer].fill_(math.log(max(l0_shift(clt.pre_activations(layer, x), a.l0), 1e-6)))
    opt = torch.optim.Adam(clt.parameters(), lr=LR)
    lam, c = 1e-3, 1.0

    def step(i):
        xs, ys = pool[i % POOL]
        opt.zero_grad(set_to_none=True)
        feats = [clt.encode(layer, x) for layer, x in enumerate(xs)]
        outs = clt.decode_all(feats)
        mse = sum(F.mse_loss(o, y) for o, y in zip(outs, ys, strict=True))
        norms = clt.decoder_norms()
        sparsity = sum(torch.tanh(c * f * norms[layer]).sum() for layer, f in enumerate(feats)) / a.batch
        loss = mse + lam * sparsity
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clt.parameters(), 1.0)
        opt.step()

    def l0_after():
        with torch.no_grad():
            xs = pool[0][0]
            return sum(float((clt.encode(layer, x) != 0).sum(-1).float().mean()) for layer, x in enumerate(xs)) / a.layers

    return step, l0_after, "ours (PLACEHOLDER: dense autograd on dictionary/clt.py, not the CLT trainer)"


# ------------------------------------------------------------------------------------------ decode-clt
def serve_peer(a) -> None:
    """decode-clt's own ``CLTTrainer.train()``, fed from memory, driven one step per ``step`` command.

    The store's ``__next__`` is where the loop comes back for each batch: it reports the time since the
    previous fetch (one full step of ``train()``), then waits for the driver's next command."""
    import logging
    import shutil
    import tempfile

    import torch

    logging.disable(logging.WARNING)  # its INFO/DEBUG chatter; warnings and errors still show
    import clt.training.trainer as trainer_mod
    from clt.config import CLTConfig, TrainingConfig

    pool = _data(a)
    act = a.activation
    total_k = a.l0 * a.layers
    ccfg = CLTConfig(num_features=a.features, num_layers=a.layers, d_model=a.d_model, activation_fn=act,
                     topk_k=float(total_k) if act == "topk" else None, normalization_method="none")
    log_dir = tempfile.mkdtemp(prefix="declt_bench_")
    tcfg = TrainingConfig(learning_rate=LR, training_steps=1000, train_batch_size_tokens=a.batch,
                          activation_source="local_manifest", activation_path=log_dir,
                          normalization_method="none", optimizer="adam", gradient_clip_val=1.0, preactivation_coef=PREACT,
                          eval_interval=10**9, checkpoint_interval=10**9, enable_wandb=False,
                          activation_dtype="float32")
    state = {"t": None, "cpu": None, "times": [], "cpus": [], "trainer": None}

    class Store:
        def __iter__(self):
            return self

        def __next__(self):
            now, cpu = time.perf_counter(), _cpu_s()
            if state["t"] is None:
                print(READY, flush=True)
            else:
                dt = now - state["t"]
                state["times"].append(dt)
                state["cpus"].append(cpu - state["cpu"])
                print(f"{STEP}{dt}", flush=True)
            cmd = sys.stdin.readline().strip()
            if cmd != "step":
                finish()
            xs, ys = pool[len(state["times"]) % POOL]
            state["t"], state["cpu"] = time.perf_counter(), _cpu_s()
            return dict(enumerate(xs)), dict(enumerate(ys))

    def finish():
        tr = state["trainer"]
        model = tr.model
        with torch.no_grad():
            feats = model.get_feature_activations(dict(enumerate(pool[0][0])))
            l0 = sum(float((f != 0).sum(-1).float().mean()) for f in feats.values()) / a.layers
        times, cpus = state["times"][a.warmup:], state["cpus"][a.warmup:]
        emit(_result("decode-clt", a, times, cpus, l0, torch))
        sys.stdout.flush()
        shutil.rmtree(log_dir, ignore_errors=True)
        os._exit(0)  # leave train() here: nothing after the timed steps is measured

    trainer_mod.create_activation_store = lambda **kw: Store()
    tr = trainer_mod.CLTTrainer(ccfg, tcfg, log_dir=log_dir, device="cpu")
    state["trainer"] = tr
    if act == "jumprelu":
        with torch.no_grad():
            for layer, x in enumerate(pool[0][0]):
                pre = tr.model.get_preactivations(x, layer)
                tr.model.theta_manager.log_threshold[layer].fill_(math.log(max(l0_shift(pre, a.l0), 1e-6)))
    tr.train(eval_every=10**9)
    finish()  # the loop ended by itself (it should not before "done")


# ------------------------------------------------------------------------------------------ workers
def _result(who, a, times, cpus, l0, torch) -> dict:
    step_s = median(times)
    return dict(worker=who, step_s=step_s, step_times=times, cpu_s=median(cpus), cpu_times=cpus,
                tokens_per_s=a.batch / step_s if times else float("nan"), peak_rss_mb=peak_rss_mb(), l0=l0,
                torch=torch.__version__, threads=torch.get_num_threads())


def serve_ours(a) -> None:
    import torch

    step, l0_after, label = worker_ours(a)
    print(READY, flush=True)
    times, cpus, i = [], [], 0
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t, c = time.perf_counter(), _cpu_s()
        step(i)
        dt = time.perf_counter() - t
        times.append(dt)
        cpus.append(_cpu_s() - c)
        i += 1
        print(f"{STEP}{dt}", flush=True)
    res = _result("ours", a, times[a.warmup:], cpus[a.warmup:], l0_after(), torch)
    res["label"] = label
    emit(res)


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--features", type=int, default=1152, help="features per layer")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step")
    p.add_argument("--l0", type=int, default=32, help="target active features per layer and token")
    p.add_argument("--activation", choices=["jumprelu", "topk"], default="jumprelu")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--reps", type=int, default=1, help="fresh processes per side (order alternates)")
    p.add_argument("--interleave", action="store_true",
                   help="run both sides at once, alternating single steps (both sides' memory at once)")
    p.add_argument("--wait-memory", type=float, default=1800,
                   help="seconds to wait for enough free memory before starting a side")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side (default: torch's)")
    p.add_argument("--sides", default="ours,decode-clt", help="comma list of sides to run")
    p.add_argument("--ours-src", default=None,
                   help="src folder our side imports sparsetrace from (default: this checkout's src)")
    p.add_argument("--worker", choices=["ours", "decode-clt"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if min(a.layers, a.features, a.batch, a.l0, a.steps, a.reps) < 1 or a.warmup < 0:
        p.error("--layers, --features, --batch, --l0, --steps and --reps must be >= 1, --warmup >= 0")
    if a.l0 > a.features:
        p.error(f"--l0 {a.l0} is larger than --features {a.features}")

    if a.worker is not None:
        _first_to_go()
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        (serve_ours if a.worker == "ours" else serve_peer)(a)
        return

    here = Path(__file__).resolve()
    common = ["--layers", str(a.layers), "--d-model", str(a.d_model), "--features", str(a.features),
              "--batch", str(a.batch), "--l0", str(a.l0), "--activation", a.activation,
              "--warmup", str(a.warmup), "--steps", str(a.steps), "--threads", str(a.threads)]
    want = [w.strip() for w in a.sides.split(",") if w.strip()]
    if not want or set(want) - {"ours", "decode-clt"}:
        p.error(f"--sides '{a.sides}' is invalid; expected a comma list of ours, decode-clt")
    src = a.ours_src or str(Path(__file__).resolve().parent.parent / "src")
    if not (Path(src) / "sparsetrace").is_dir():
        p.error(f"--ours-src '{src}' holds no sparsetrace package; expected a src folder")
    sides = []
    if "ours" in want:
        sides.append(("ours", sys.executable, {"PYTHONPATH": src}))
    if "decode-clt" in want:
        if not DECLT_PYTHON.exists():
            raise SystemExit(f"error: decode-clt venv missing: {DECLT_PYTHON} "
                             "(create it with: bash bench/peers/setup_declt_venv.sh)")
        sides.append(("decode-clt", str(DECLT_PYTHON), {}))

    print(f"# bench_clt_peer: {a.layers} layers x d_model {a.d_model}, {a.features} features/layer, batch "
          f"{a.batch}, {a.activation}, L0 {a.l0}/layer, warmup {a.warmup}, steps {a.steps}; {machine_line()}",
          flush=True)
    steps: dict[str, list[float]] = {who: [] for who, _, _ in sides}
    reps: dict[str, list[dict]] = {who: [] for who, _, _ in sides}

    # decode-clt keeps more alive per step (dense [B, d] outputs of all L(L+1)/2 decoders for backward,
    # three encoder passes): its first run peaked at 8.3 GB where the estimate says 6.7
    need = {"ours": _need_gb(a), "decode-clt": 1.3 * _need_gb(a)}

    def start(who, py, env):
        _wait_for_memory(sum(need.values()) if a.interleave else need[who], a.wait_memory)
        t = time.perf_counter()
        proc = Served(py, here, [*common, "--worker", who], env=env)
        ok = proc.wait_ready()
        print(f"  {who}: set up in {time.perf_counter() - t:.1f}s" + ("" if ok else f" FAILED {proc.error}"),
              flush=True)
        return proc

    def one_step(i, who, proc):
        dt = proc.step()
        tag = "warm-up" if i < a.warmup else "timed"
        print(f"  step {i} {tag:7s} {who:10s}: " + (f"{dt:.2f}s" if dt is not None else f"FAILED {proc.error}"),
              flush=True)
        if dt is not None and i >= a.warmup:
            steps[who].append(dt)

    for rep in range(a.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        if a.interleave:  # both alive at once, single steps alternate (needs both sides' memory at once)
            procs = {who: start(who, py, env) for who, py, env in order}
            for i in range(a.warmup + a.steps):
                for who, proc in procs.items():
                    one_step(i, who, proc)
            for who, proc in procs.items():
                reps[who].append(proc.finish(timeout=600))
        else:  # one side at a time, fresh process each, order alternating over reps
            for who, py, env in order:
                proc = start(who, py, env)
                for i in range(a.warmup + a.steps):
                    one_step(i, who, proc)
                reps[who].append(proc.finish(timeout=600))
    results = {}
    for who, rs in reps.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results[who] = rs[0]
            continue
        times = [t for r in ok for t in r["step_times"]]
        cpus = [c for r in ok for c in r["cpu_times"]]
        results[who] = dict(ok[-1], step_times=times, cpu_times=cpus, step_s=median(times), cpu_s=median(cpus),
                            tokens_per_s=a.batch / median(times), peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
                            l0=median([r["l0"] for r in ok]))

    rows = []
    for who, r in results.items():
        if "error" in r:
            rows.append([who, f"FAILED: {str(r['error'])[:80]}", "", "", "", "", ""])
            continue
        rows.append([r.get("label", who), fmt(r["tokens_per_s"]), fmt(r["step_s"], 2), fmt(r["cpu_s"], 2),
                     fmt(r["cpu_s"] / r["step_s"], 2), fmt(r["peak_rss_mb"]), fmt(r["l0"], 1)])
    print()
    print(table(["side", "tokens/s", "wall s/step", "CPU s/step", "CPU/wall", "peak RSS MB", "L0/layer"], rows))
    for who, r in results.items():
        if "error" not in r:
            print(f"  {who}: step wall times " + ", ".join(f"{t:.2f}" for t in r["step_times"])
                  + f"; torch {r['torch']}, {r['threads']} threads")
    ours, peer = results.get("ours"), results.get("decode-clt")
    if ours is None or peer is None:
        print("ratio ours/decode-clt tokens/s: n/a (one side only)")
        return
    if "error" in ours or "error" in peer:
        print("ratio ours/decode-clt tokens/s: n/a (a side failed)")
        return
    mem = ours["peak_rss_mb"] / peer["peak_rss_mb"]
    ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
    print(f"ratio ours/decode-clt tokens/s: {ratio:.2f}x (peak RSS ours/decode-clt {mem:.2f})")


if __name__ == "__main__":
    main()
