"""Matmul ceiling of a dense ReLU training step, and the fraction of it our training step reaches.

    python bench/bench_ceiling.py                         # d_model 576, 32x, batch 4096, fp32, CPU
    python bench/bench_ceiling.py --device cuda           # bf16 autocast step vs bf16 matmul ceiling

A dense ReLU SAE step needs five matmuls of the same size (the input needs no gradient):

    forward   pre  = x @ W_enc.T          [B, d] x [d, n]
              y    = f @ W_dec            [B, n] x [n, d]
    backward  df   = dy @ W_dec.T         [B, d] x [d, n]
              dW_dec = f.T @ dy           [n, B] x [B, d]
              dW_enc = dpre.T @ x         [n, B] x [B, d]

i.e. 5 * 2 * B * d * n FLOPs. The ceiling runs exactly these five ``torch.mm`` calls (same shapes,
same transposed layouts) on preallocated tensors and nothing else; its time is the fastest any dense
ReLU step can be on this machine, ``B / t_mm`` its tokens/s. The measured step is
``LayerTrainer.train_step`` with ``activation="relu"`` on a freshly initialised dictionary (about half
of the features active, so the dense path runs), everything included (loss, L1, Adam, clipping,
statistics). Both are measured in this process, interleaved rep by rep; medians are reported. The
last line is our median tokens/s over the ceiling's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, machine_line, median, random_activations, sync, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--expansion", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per rep (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="on cuda: fp32 step and fp32 ceiling (default bf16 autocast and bf16 ceiling)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="on cpu: our step with --compute-dtype bfloat16 against a bf16 ceiling (AMX/AVX512-BF16)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--src", default=None, help="import sparsetrace from this src/ folder")
    a = p.parse_args()
    if a.src:
        sys.path.insert(0, a.src)

    import contextlib

    import torch

    from sparsetrace.train.config import TrainConfig
    from sparsetrace.train.trainer import LayerTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    bf16 = (dev.startswith("cuda") and a.autocast) or (dev == "cpu" and a.cpu_bf16)
    mm_dtype = torch.bfloat16 if bf16 else torch.float32
    B, d, n = a.batch, a.d_model, a.d_model * a.expansion
    flops = 5 * 2 * B * d * n

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g).to(dev, mm_dtype)
    w_enc = torch.randn(n, d, generator=g).to(dev, mm_dtype)
    w_dec = torch.randn(n, d, generator=g).to(dev, mm_dtype)
    f = torch.randn(B, n, generator=g).to(dev, mm_dtype)
    dy = torch.randn(B, d, generator=g).to(dev, mm_dtype)
    out_bn = torch.empty(B, n, device=dev, dtype=mm_dtype)
    out_bd = torch.empty(B, d, device=dev, dtype=mm_dtype)
    out_nd = torch.empty(n, d, device=dev, dtype=mm_dtype)

    def ceiling() -> float:
        sync(dev)
        t = time.perf_counter()
        torch.mm(x, w_enc.t(), out=out_bn)  # pre
        torch.mm(f, w_dec, out=out_bd)  # y
        torch.mm(dy, w_dec.t(), out=out_bn)  # df
        torch.mm(f.t(), dy, out=out_nd)  # dW_dec
        torch.mm(f.t(), x, out=out_nd)  # dW_enc
        sync(dev)
        return time.perf_counter() - t

    tc = TrainConfig(layers=[0], kind="sae", activation="relu", n_features=n, batch_size=B, target_l0=32.0,
                     n_tokens=10**9, epochs=1.0, device=dev, compute_dtype="bfloat16" if bf16 else "float32")
    tr = LayerTrainer(tc, 0, d, "bench", 1.0, 1.0)
    xs = random_activations(2, B, d, seed=1234, device=dev)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and dev.startswith("cuda") else contextlib.nullcontext()
    state = {"i": 0}

    def step() -> float:
        times = []
        for _ in range(a.steps):
            i = state["i"]
            state["i"] += 1
            sync(dev)
            t = time.perf_counter()
            with ac:
                st = tr.train_step(xs[i % 2], xs[i % 2])
            sync(dev)
            times.append(time.perf_counter() - t)
        state["l0"] = st.l0
        return median(times)

    print(f"# bench_ceiling: B={B} d={d} n={n} ({a.expansion}x), {'bf16' if bf16 else 'fp32'} on {dev}, "
          f"{flops / 1e9:.0f} GFLOP of matmul per step ({machine_line()})", flush=True)
    ceiling()
    step()
    tc_, ts_ = [], []
    for rep in range(a.reps):
        order = [("ceiling", ceiling), ("step", step)] if rep % 2 == 0 else [("step", step), ("ceiling", ceiling)]
        for name, fn in order:
            dt = fn()
            (tc_ if name == "ceiling" else ts_).append(dt)
            print(f"  rep {rep} {name:8s}: {dt:.3f}s  ({B / dt:,.0f} tok/s)", flush=True)
    mc, ms = median(tc_), median(ts_)
    rows = [
        [f"5 x torch.mm ({'bf16' if bf16 else 'fp32'})", fmt(mc, 3), fmt(flops / mc / 1e9, 1), fmt(B / mc)],
        [f"ours: LayerTrainer.train_step relu (L0 {state.get('l0', 0):.0f} of {n})", fmt(ms, 3),
         fmt(flops / ms / 1e9, 1), fmt(B / ms)],
    ]
    print()
    print(table(["", "median s/step", "matmul GFLOP/s", "tokens/s"], rows))
    paired = median([c / s for c, s in zip(tc_, ts_, strict=True)])
    print(f"(median of paired reps: {paired:.2f})")
    print(f"fraction of matmul ceiling: {mc / ms:.2f}")


if __name__ == "__main__":
    main()
