"""Harvest overhead: ``sparsetrace.data.store.harvest`` vs a bare forward of the same layers.

    python bench/bench_harvest.py                       # smollm2-135m, layers 3 and 6, mlp_in/mlp_out/resid_pre
    python bench/bench_harvest.py --layers 2,4,6 --windows 128 --device cuda

Ours: ``harvest(lm, windows, hookpoints, cache_dir=<fresh temp dir>)`` - the forward with read hooks,
stopping after the deepest layer, the NaN check, the device->host copy and the writes into the
memory-mapped ``.npy`` files, metadata and the atomic rename; everything a training run pays.

Bare: the same token windows in the same batches (``--batch-windows``, harvest's default 16) through
the base transformer with its layer list truncated to the first L+1 layers (no hooks, no lm_head,
outputs discarded) under the same ``torch.no_grad()``.

Both run in one process and are paired batch by batch: during each timed harvest, every batch's
hooked forward is accompanied (alternately before / after) by a bare forward of the same token ids,
timed separately and subtracted from the harvest's wall time. Adjacent-in-time pairs make the
comparison robust on a shared, noisy machine (whole passes differ by +-25% there; ``--separate`` also
times whole passes, interleaved). Medians over ``--reps`` are reported; the last line is the overhead
of harvest over the bare forward in %.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, machine_line, median, sync, table  # noqa: E402


def _layer_list(lm):
    """The ModuleList holding the decoder layers, and its owner (for truncation)."""
    import torch

    first = lm.arch.layer(0)
    for mod in lm.model.modules():
        for name, child in mod.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == lm.n_layers and child[0] is first:
                return mod, name
    raise RuntimeError("could not find the decoder layer list")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="default")
    p.add_argument("--layers", default="3,6", help="layers to read (the deepest is L)")
    p.add_argument("--hookpoints", default="mlp_in,mlp_out,resid_pre")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--windows", type=int, default=64, help="token windows per timed pass")
    p.add_argument("--batch-windows", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--separate", action="store_true",
                   help="also time whole bare passes and whole harvests, interleaved (noisier)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="model dtype (float32 | bfloat16)")
    p.add_argument("--cache-dtype", default="float32", help="activation cache dtype (float32 | float16)")
    p.add_argument("--src", default=None, help="import sparsetrace from this src/ folder")
    a = p.parse_args()
    if a.src:
        sys.path.insert(0, a.src)

    import torch

    from sparsetrace.data.corpus import load_texts
    from sparsetrace.data.store import harvest
    from sparsetrace.data.tokens import tokenize_windows
    from sparsetrace.model.adapter import LanguageModel
    from sparsetrace.model.hookpoints import Hookpoint

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    lm = LanguageModel.load(a.model, device=a.device, dtype=dtype)
    layers = [int(x) for x in a.layers.split(",")]
    deepest = max(layers)
    hookpoints = [Hookpoint(h, layer) for layer in layers for h in a.hookpoints.split(",")]
    windows = tokenize_windows(lm.tokenizer, load_texts(a.corpus), a.context, max_windows=a.windows)
    n_windows = windows.shape[0]
    skip = 1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0
    n_tokens = n_windows * (a.context - skip)
    owner, attr = _layer_list(lm)
    full_layers = getattr(owner, attr)
    base = lm.model.base_model

    def bare_batch(ids) -> float:
        setattr(owner, attr, truncated)
        try:
            sync(a.device)
            t = time.perf_counter()
            with torch.no_grad():
                base(input_ids=ids, use_cache=False)
            sync(a.device)
            return time.perf_counter() - t
        finally:
            setattr(owner, attr, full_layers)

    truncated = torch.nn.ModuleList(list(full_layers)[: deepest + 1])
    run = lm.run

    def ours(paired: bool) -> tuple[float, float]:
        """One harvest. With ``paired``, every batch's hooked forward is followed (even batches) or
        preceded (odd) by a bare forward of the same ids, timed separately and subtracted, so the two
        are compared batch by batch, seconds apart. Returns (harvest seconds, bare seconds)."""
        bare_t: list[float] = []

        def run_and_bare(ids, **kw):
            first = len(bare_t) % 2 == 1
            if paired and first:
                bare_t.append(bare_batch(ids))
            out = run(ids, **kw)
            if paired and not first:
                bare_t.append(bare_batch(ids))
            return out

        lm.run = run_and_bare  # instance attribute shadows the method for this harvest only
        tmp = Path(tempfile.mkdtemp(prefix="bench_harvest_"))
        try:
            sync(a.device)
            t = time.perf_counter()
            cache = harvest(lm, windows, hookpoints, cache_dir=tmp, batch_windows=a.batch_windows,
                            dtype=a.cache_dtype, progress=False)
            sync(a.device)
            dt = time.perf_counter() - t
            assert cache.n_tokens == n_tokens
            return dt - sum(bare_t), sum(bare_t)
        finally:
            del lm.run
            shutil.rmtree(tmp, ignore_errors=True)

    def bare_all() -> float:
        return sum(bare_batch(windows[s : s + a.batch_windows].to(lm.device))
                   for s in range(0, n_windows, a.batch_windows))

    print(f"# bench_harvest: {lm.model_id}, layers {layers} (L={deepest} of {lm.n_layers}), "
          f"{len(hookpoints)} hookpoints, {n_windows} windows x {a.context} tokens, batch {a.batch_windows} "
          f"windows, device {a.device}, model {a.dtype}, cache {a.cache_dtype} ({machine_line()})", flush=True)
    bare_all()  # warm up (allocator, kernels, page cache)
    ours(False)
    th, tb, sep_h, sep_b = [], [], [], []
    for rep in range(a.reps):
        h, b = ours(True)  # batch-paired
        th.append(h)
        tb.append(b)
        print(f"  rep {rep} paired  : harvest {h:.3f}s, bare {b:.3f}s ({(h - b) / b * 100:+.1f}%)", flush=True)
        if a.separate:
            order = [(True, bare_all), (False, lambda: ours(False)[0])]
            for is_bare, fn in (order if rep % 2 == 0 else order[::-1]):
                (sep_b if is_bare else sep_h).append(fn())
            print(f"  rep {rep} separate: harvest {sep_h[-1]:.3f}s, bare {sep_b[-1]:.3f}s", flush=True)
    mh, mb = median(th), median(tb)
    n_hp = len(hookpoints)
    rows = [
        ["bare forward (first L+1 layers)", fmt(mb, 3), fmt(n_tokens / mb), "-"],
        ["harvest (hooks + cache writes)", fmt(mh, 3), fmt(n_tokens / mh), fmt(n_tokens * n_hp / mh)],
    ]
    print()
    print(table(["batch-paired", "median s", "tokens/s", "activation vectors/s"], rows))
    paired = median([(h - b) / b * 100 for h, b in zip(th, tb, strict=True)])
    if sep_h:
        print(f"(separate whole passes, interleaved: harvest {median(sep_h):.3f}s vs bare {median(sep_b):.3f}s, "
              f"{(median(sep_h) - median(sep_b)) / median(sep_b) * 100:+.1f}%)")
    print(f"(overhead of the median times: {(mh - mb) / mb * 100:.1f}%; last line: median over reps of the "
          f"per-rep overhead)")
    print(f"harvest overhead vs bare forward: {paired:.1f}%")


if __name__ == "__main__":
    main()
