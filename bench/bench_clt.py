"""CLT training step on a CPU at SmolLM2-135M's shape (30 layers, d_model 576), synthetic activations.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/bench_clt.py --n-features 1152 --batch 1024 --steps 4

Prints seconds per step (forward+backward, optimizer) for the trainer's step, the decode alone, and the
optimizer choices measured for the decoder state: fused Adam (float32 moments), Adam with bfloat16
moments, and lazy-row Adam (SparseAdam-style: only rows with a non-zero gradient), plus the fraction of
decoder rows a batch's gradient touches (lazy rows can only skip the others).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsetrace.train.clt import CLTTrainer
from sparsetrace.train.clt_ops import clt_decode
from sparsetrace.train.config import TrainConfig


def _adam_bf16(params, grads, states, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    for p, g, (m, v) in zip(params, grads, states, strict=True):
        mf, vf = m.float(), v.float()
        mf.lerp_(g, 1 - b1)
        vf.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(mf, vf.sqrt().add_(eps), value=-lr)
        m.copy_(mf)
        v.copy_(vf)


def _adam_lazy(params, grads, states, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    hit_frac = []
    for p, g, (m, v) in zip(params, grads, states, strict=True):
        hit = g.ne(0).any(-1).any(0).nonzero().squeeze(-1)  # features (dim 1) with any gradient
        hit_frac.append(hit.numel() / g.shape[1])
        gh, mh, vh = g[:, hit], m[:, hit], v[:, hit]
        mh.lerp_(gh, 1 - b1)
        vh.mul_(b2).addcmul_(gh, gh, value=1 - b2)
        p[:, hit] -= lr * mh / (vh.sqrt() + eps)
        m[:, hit], v[:, hit] = mh, vh
    return sum(hit_frac) / len(hit_frac)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--n-features", type=int, default=1152)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--target-l0", type=float, default=32.0)
    ap.add_argument("--activation", default="jumprelu")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    L, d = a.n_layers, a.d_model
    tcfg = TrainConfig(layers=list(range(L)), kind="clt", activation=a.activation, target_l0=a.target_l0,
                       n_features=a.n_features, batch_size=a.batch, n_tokens=a.batch * 100, epochs=1.0)
    tr = CLTTrainer(tcfg, n_layers=L, d_model=d, model_id="synthetic", in_scales=[1.0] * L, out_scales=[1.0] * L)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g) / d**0.5

    def batch():
        x = torch.randn(L, a.batch, d, generator=g)
        return {**{f"mlp_in.{i}": x[i] for i in range(L)}, **{f"mlp_out.{i}": x[i] @ mix for i in range(L)}}

    res = {"config": vars(a), "step_s": []}
    for _ in range(a.steps):
        b = batch()
        t = time.perf_counter()
        st = tr.train_step(b)
        res["step_s"].append(round(time.perf_counter() - t, 2))
        res["l0_mean"] = round(sum(st["l0"]) / L, 1)
    xs, ys = tr.scaled(batch())
    codes = tr.module.codes(xs)[0]
    vals = [c[1].detach().requires_grad_() for c in codes]
    t = time.perf_counter()
    out = clt_decode(vals, [c[2] for c in codes], [c[3] for c in codes], list(tr.module.dec), a.batch)
    res["decode_fwd_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    out.pow(2).sum().backward()
    res["decode_bwd_s"] = round(time.perf_counter() - t, 2)
    dec = [p.data for p in tr.module.dec]
    grads = [p.grad for p in tr.module.dec]
    t = time.perf_counter()
    tr.opt.step()
    res["adam_fused_f32_s"] = round(time.perf_counter() - t, 2)
    states = [(torch.zeros_like(p, dtype=torch.bfloat16), torch.zeros_like(p, dtype=torch.bfloat16)) for p in dec]
    t = time.perf_counter()
    _adam_bf16(dec, grads, states)
    res["adam_bf16_decoder_s"] = round(time.perf_counter() - t, 2)
    states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in dec]
    t = time.perf_counter()
    res["rows_hit_frac"] = round(_adam_lazy(dec, grads, states), 3)
    res["adam_lazy_decoder_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
