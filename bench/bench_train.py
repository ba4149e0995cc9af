"""Training-step throughput: sparsetrace vs SAELens (ReLU + L1) and sparsify (TopK).

    python bench/bench_train.py                                  # all shapes, relu + topk, sae
    python bench/bench_train.py --kind sae --activation topk --d-model 576 --expansion 32 --batch 4096
    python bench/bench_train.py --device cuda                    # GPU: bf16 autocast, 20 warm + 50 timed
    python bench/bench_train.py --cpu-bf16                       # CPU, bf16 matmuls on every side

Every configuration runs in a fresh subprocess (peers with ``bench/.venv-peers/bin/python``, ours with
this python) on the same seeded random activations, same shapes and batch. Reps interleave ours and
the peers (ours, peer, ours, peer, ...) so that load from other processes hits both alike; the ratio
per shape is the median of the per-rep ratios. Each side runs its own complete training step:

- ours:     ``LayerTrainer.train_step`` (forward + loss inside ``_Objective``, backward, decoder-grad
            projection, grad clipping, Adam, decoder renormalisation, dead-feature and L0/FVU stats).
- sae-lens: ``SAETrainer.step`` on a ``StandardTrainingSAE`` (ReLU + L1; its training forward pass,
            backward, grad clipping, Adam, LR and coefficient schedulers, firing statistics), plus
            ``maybe_reset_sparsity`` as ``SAETrainer.fit`` calls it every step.
- sparsify: the per-batch body of ``sparsify.Trainer.fit`` for ``loss_fn="fvu"`` on a ``SparseCoder``
            (decoder renormalisation, forward with total variance, did-fire mask, ``float(fvu)``,
            backward, parallel-gradient removal, its default optimizer ScheduleFree(SignSGD) or
            ``--sparsify-optimizer adam``, dead-feature counters). Its trainer is welded to a model
            forward, so the loop is reproduced here with its own objects and calls.

SAELens has no trainable transcoder class, so ``--kind transcoder`` compares with sparsify only.
The last line is the geometric mean over the measured shapes of the per-shape median ratios.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    READY,
    STEP,
    Served,
    emit,
    fmt,
    l0_shift,
    machine_line,
    median,
    peak_device_mb,
    peak_rss_mb,
    peer_python,
    random_activations,
    sync,
    table,
    time_loop,
)

SHAPES = [(576, 8), (576, 32), (768, 32)]
POOL = 4  # distinct batches cycled through


# ------------------------------------------------------------------------------------------ workers
def _data(a, device):
    xs = random_activations(POOL, a.batch, a.d_model, seed=1234, device=device)
    if a.kind == "sae":
        return xs, xs
    return xs, random_activations(POOL, a.batch, a.d_model, seed=4321, device=device)


def _autocast(a):
    import contextlib

    import torch

    if a.device.startswith("cuda") and a.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if a.device == "cpu" and getattr(a, "cpu_bf16", False):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def worker_ours(a) -> dict:
    import torch

    from sparsetrace.train.config import TrainConfig
    from sparsetrace.train.trainer import LayerTrainer

    torch.manual_seed(0)
    n = a.d_model * a.expansion
    tc = TrainConfig(layers=[0], kind=a.kind, activation=a.activation, n_features=n, batch_size=a.batch,
                     target_l0=float(a.k), k=a.k if a.activation in ("topk", "batchtopk") else None,
                     n_tokens=10**9, epochs=1.0, device=a.device,
                     compute_dtype="bfloat16" if getattr(a, "cpu_bf16", False) else "float32")
    tr = LayerTrainer(tc, 0, a.d_model, "bench", 1.0, 1.0)
    xs, ys = _data(a, a.device)
    if a.regime == "trained" and a.activation == "relu":
        with torch.no_grad():
            d = tr.dictionary
            d.b_enc.sub_(l0_shift(xs[0] @ d.W_enc.t() + d.b_enc, a.k))
    stats = []

    def step(i):
        with _autocast(a):
            stats.append(tr.train_step(xs[i % POOL], ys[i % POOL]))

    return step, lambda: {"l0": stats[-1].l0, "fvu": stats[-1].fvu}


def worker_saelens(a) -> dict:
    import itertools

    import torch
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if a.kind != "sae":
        raise SystemExit("sae-lens has no trainable transcoder")
    torch.manual_seed(0)
    n = a.d_model * a.expansion
    cfg = StandardTrainingSAEConfig(d_in=a.d_model, d_sae=n, l1_coefficient=5.0, device=a.device)
    sae = StandardTrainingSAE(cfg)
    total = a.batch * (a.warmup + a.steps + 2)
    tcfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=a.batch, lr=3e-4, lr_end=3e-4,
                            device=a.device, autocast=(a.device.startswith("cuda") and a.autocast) or getattr(a, "cpu_bf16", False))
    xs, _ = _data(a, a.device)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=itertools.cycle(xs))
    sae.to(a.device)
    if a.regime == "trained":
        with torch.no_grad():
            sae.b_enc.sub_(l0_shift((xs[0] - sae.b_dec) @ sae.W_enc + sae.b_enc, a.k))
    out = {}

    def step(i):
        trainer.maybe_reset_sparsity()
        o = trainer.step(xs[i % POOL])
        trainer.n_training_steps += 1
        out["acts"] = o.feature_acts

    return step, lambda: {"l0": float((out["acts"] > 0).float().sum(-1).mean())}


def worker_sparsify(a) -> dict:
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    n = a.d_model * a.expansion
    transcode = a.kind != "sae"
    sae = SparseCoder(a.d_model, SparseCoderConfig(num_latents=n, k=a.k, transcode=transcode), a.device,
                      dtype=torch.float32)
    if a.sparsify_optimizer == "adam":
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam([dict(params=sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)])
        schedulers = [get_linear_schedule_with_warmup(opt, 1000, 10**6)]
    else:  # sparsify's default: signum
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (n / 2**14) ** 0.5)]),
                                  momentum=0.95)
        opt.train()
        schedulers = []
    xs, ys = _data(a, a.device)
    since_fired = torch.zeros(n, dtype=torch.long, device=a.device)
    did_fire = torch.zeros(n, dtype=torch.bool, device=a.device)
    out = {}

    def step(i):
        x, y = xs[i % POOL], ys[i % POOL]
        if sae.cfg.normalize_decoder and not transcode:
            sae.set_decoder_norm_to_unit_norm()
        total_variance = (y - y.mean(0)).pow(2).sum()
        with _autocast(a):
            o = sae(x=x, y=y, dead_mask=None, total_variance=total_variance)
        did_fire[o.latent_indices.flatten()] = True
        out["fvu"] = float(o.fvu.detach())
        loss = o.fvu + 0.0 * o.auxk_loss + o.multi_topk_fvu / 8
        loss.backward()
        if sae.cfg.normalize_decoder and not transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for s in schedulers:
            s.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()

    return step, lambda: {"fvu": out["fvu"], "l0": float(a.k)}


WORKERS = {"ours": worker_ours, "sae-lens": worker_saelens, "sparsify": worker_sparsify}


def run_as_worker(a) -> None:
    """Standalone: warmup + timed steps, one RESULT line. ``--serve``: lock-step protocol on stdin/stdout
    (``step`` -> one timed step, answers ``STEP <seconds>``; ``done`` -> RESULT line), so the driver can
    alternate single steps between processes."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    step, info = WORKERS[a.worker](a)
    if a.serve:
        print(READY, flush=True)
        times, i = [], 0
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "step":
                sync(a.device)
                t = time.perf_counter()
                step(i)
                sync(a.device)
                dt = time.perf_counter() - t
                i += 1
                times.append(dt)
                print(f"{STEP}{dt}", flush=True)
            elif cmd == "done":
                break
        times = times[a.warmup:]
    else:
        times = time_loop(step, a.warmup, a.steps, a.device)
    res = info()
    res.update(
        worker=a.worker,
        step_s=median(times),
        best_step_s=min(times) if times else float("nan"),
        step_times=times,
        tokens_per_s=a.batch / median(times),
        peak_rss_mb=peak_rss_mb(),
        peak_device_mb=peak_device_mb(a.device),
        torch=torch.__version__,
    )
    emit(res)


# ------------------------------------------------------------------------------------------ driver
def worker_args(a, worker: str, activation: str, d: int, e: int) -> list[str]:
    args = ["--worker", worker, "--kind", a.kind, "--activation", activation, "--d-model", str(d),
            "--expansion", str(e), "--batch", str(a.batch), "--k", str(a.k), "--warmup", str(a.warmup),
            "--steps", str(a.steps), "--device", a.device, "--sparsify-optimizer", a.sparsify_optimizer,
            "--regime", a.regime]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if not a.autocast:
        args += ["--no-autocast"]
    if getattr(a, "cpu_bf16", False):
        args += ["--cpu-bf16"]
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["sae", "transcoder"], default="sae")
    p.add_argument("--activation", choices=["relu", "topk", "both"], default="both")
    p.add_argument("--d-model", type=int, default=None, help="with --expansion: one shape (default: all)")
    p.add_argument("--expansion", type=int, default=None)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default cpu 1, cuda 20)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per rep (default cpu 6, cuda 50)")
    p.add_argument("--reps", type=int, default=2, help="repetitions with fresh processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="fp32 on cuda too")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="CPU: bfloat16 matmuls on every side (ours --compute-dtype bfloat16; sae-lens its own "
                        "autocast=True; sparsify its forward under torch.autocast), for CPUs with AMX/AVX512-BF16")
    p.add_argument("--sparsify-optimizer", choices=["signum", "adam"], default="signum")
    p.add_argument("--regime", choices=["init", "trained"], default="init",
                   help="ReLU only: 'init' = fresh dictionaries (dense codes, ~half the features active); "
                        "'trained' = encoder biases of both sides shifted so the mean L0 on the data is k, as "
                        "after the L1 penalty has done its work (most of a run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    p.add_argument("--peers", default="sae-lens,sparsify", help="comma list; empty for ours only")
    p.add_argument("--ours", action="append", default=[], metavar="LABEL=SRC",
                   help="benchmark the sparsetrace package found in SRC (a src/ folder) under LABEL; repeat "
                        "to compare versions (before/after); default: this checkout. The ratio line uses "
                        "the last one")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    a.warmup = a.warmup if a.warmup is not None else (20 if cuda else 1)
    a.steps = a.steps if a.steps is not None else (50 if cuda else 6)
    if a.worker:
        run_as_worker(a)
        return

    shapes = SHAPES
    if a.d_model or a.expansion:
        shapes = [(a.d_model or 576, a.expansion or 32)]
    acts = ["relu", "topk"] if a.activation == "both" else [a.activation]
    peers_wanted = [x for x in a.peers.split(",") if x]
    plan = []  # (shape, activation, peer)
    for d, e in shapes:
        for act in acts:
            peer = "sae-lens" if act == "relu" else "sparsify"
            if peer == "sae-lens" and a.kind != "sae":
                peer = None
            plan.append(((d, e), act, peer if peer in peers_wanted else None))
    here = Path(__file__).resolve()
    variants = dict(v.split("=", 1) for v in a.ours) or {"ours": str(here.parent.parent / "src")}
    print(f"# bench_train: kind={a.kind} batch={a.batch} k={a.k} device={a.device} warmup={a.warmup} "
          f"steps={a.steps} reps={a.reps} relu-regime={a.regime} ({machine_line()})", flush=True)
    results: dict = {}  # (shape, act, who) -> list of RESULT dicts (one per rep)
    step_times: dict = {}  # (shape, act, who) -> list over reps of per-step seconds (lock-step order)
    for rep in range(a.reps):
        for (d, e), act, peer in plan:
            group = {who: (sys.executable, {"PYTHONPATH": src}, "ours") for who, src in variants.items()}
            if peer:
                group[peer] = (peer_python(), None, peer)
            procs = {who: Served(py, here, [*worker_args(a, w, act, d, e), "--serve"], env=env)
                     for who, (py, env, w) in group.items()}
            for pr in procs.values():
                pr.wait_ready()
                for _ in range(a.warmup):
                    pr.step()
            names = list(procs)
            times = {who: [] for who in names}
            for i in range(a.steps):  # one step each, rotating who goes first
                for who in names[i % len(names):] + names[: i % len(names)]:
                    times[who].append(procs[who].step())
            for who, pr in procs.items():
                r = pr.finish()
                results.setdefault(((d, e), act, who), []).append(r)
                step_times.setdefault(((d, e), act, who), []).append(times[who])
                msg = r.get("error") or f"{fmt(r['tokens_per_s'])} tok/s, median step {r['step_s']:.3f}s"
                print(f"  rep {rep} {d}x{e} {act:4s} {who:8s}: {msg}", flush=True)

    rows, ratios = [], {"sae-lens": [], "sparsify": []}
    for (d, e), act, peer in plan:
        for label in variants:
            key = ((d, e), act, label)
            s_ours = _summary(results[key])
            row = [f"{d}", f"{e}x ({d * e})", act, label, fmt(s_ours[0]), fmt(s_ours[1]), fmt(s_ours[2])]
            if peer:
                pk = ((d, e), act, peer)
                s = _summary(results[pk])
                # ratio of tokens/s = peer step time / our step time, paired step by step (adjacent in time)
                pairs = [tp / to for ro, rp in zip(step_times[key], step_times[pk], strict=True)
                         for to, tp in zip(ro, rp, strict=True) if to and tp]
                ratio = median(pairs) if pairs else float("nan")
                if pairs and label == list(variants)[-1]:
                    ratios[peer].append(ratio)
                errs = [r["error"] for r in results[pk] if "error" in r]
                err = f" ({errs[0][:60]})" if errs else ""
                row += [peer + err, fmt(s[0]), fmt(s[1]), fmt(s[2]), f"{ratio:.2f}x" if pairs else "n/a"]
            else:
                row += ["-", "n/a", "n/a", "n/a", "n/a"]
            rows.append(row)
    print()
    print(table(["d_model", "features", "act", "ours", "ours tok/s", "ours peak RSS MB", "ours L0", "peer",
                 "peer tok/s", "peer peak RSS MB", "peer L0", "ours/peer"], rows))
    parts = []
    for peer in ("sae-lens", "sparsify"):
        rs = ratios[peer]
        parts.append(f"vs {peer}: {math.exp(sum(map(math.log, rs)) / len(rs)):.2f}x" if rs else f"vs {peer}: n/a")
    print("ratio " + "; ".join(parts))


def _summary(rs: list[dict]) -> tuple[float, float, float]:
    rs = [r for r in rs if "error" not in r]
    if not rs:
        return float("nan"), float("nan"), float("nan")
    return (median([r["tokens_per_s"] for r in rs]), max(r["peak_rss_mb"] for r in rs),
            median([r.get("l0", float("nan")) for r in rs]))


if __name__ == "__main__":
    main()
