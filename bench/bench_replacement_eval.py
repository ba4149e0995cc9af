"""Wall time of evaluating a full replacement (every MLP substituted at once, by depth) on SmolLM2.

    python bench/bench_replacement_eval.py RUN [--n-windows 64] [--batch-windows 8]
    python bench/bench_replacement_eval.py --random-plt 2 --n-windows 16    # untrained PLT, expansion 2

Prints the time of each part (clean pass, substituted pass, ablations, by-depth suffix runs, the LM head
alone) on one batch, then the whole :func:`evaluate_replacement` wall time and its headline figures.
Timings are only meaningful on a quiet machine: the script prints the 1-minute load average beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402
from sparsetrace.dictionary.replacement_set import PLTSet, load_replacement  # noqa: E402
from sparsetrace.evaluate.job import heldout_windows  # noqa: E402
from sparsetrace.evaluate.replacement import evaluate_replacement, format_replacement  # noqa: E402
from sparsetrace.model.adapter import LanguageModel  # noqa: E402
from sparsetrace.model.hookpoints import Hookpoint  # noqa: E402
from sparsetrace.model.suffix import start_at  # noqa: E402


def _timed(fn, reps: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-plt", type=int, default=0, help="untrained PLT on every layer, this expansion")
    ap.add_argument("--n-windows", type=int, default=64)
    ap.add_argument("--batch-windows", type=int, default=8)
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--heldout", help="take the windows from this run's heldout_tokens.safetensors")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    lm = LanguageModel.load(args.model)
    if args.run:
        rep = load_replacement(args.run)
        windows = heldout_windows(Path(args.run), lm, None, args.n_windows)
    else:
        ds = [SparseDictionary(DictionaryConfig(kind="transcoder", d_in=lm.d_model, d_out=lm.d_model,
                                                n_features=args.random_plt * lm.d_model, layer=ly,
                                                model_id=lm.model_id), seed=ly) for ly in range(lm.n_layers)]
        rep = PLTSet(ds)
        windows = heldout_windows(Path(args.heldout or "/nonexistent"), lm, None if args.heldout else args.corpus,
                                  args.n_windows)
    ids = windows[: args.batch_windows]
    with torch.no_grad():
        parts = {
            "clean forward (all layers + head)": min(_timed(lambda: lm.model(input_ids=ids, use_cache=False))
                                                     for _ in range(2)),
            "LM head + final norm alone": _timed(lambda: lm.model.lm_head(torch.randn(*ids.shape, lm.d_model))),
        }
        out = lm.run(ids, read=[Hookpoint("resid_pre", 15)])

        def half():
            with start_at(lm, 15, out.acts[Hookpoint("resid_pre", 15)]):
                lm.model(input_ids=ids, use_cache=False)

        parts["suffix from layer 15 (15 layers + head)"] = _timed(half)
    load = os.getloadavg()[0]
    for k, v in parts.items():
        print(f"{k:45s} {v:7.3f} s  ({args.batch_windows} windows x {ids.shape[1]})")
    t, c = time.perf_counter(), time.process_time()
    res = evaluate_replacement(lm, rep, windows, batch_windows=args.batch_windows)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n_batches = -(-len(windows) // args.batch_windows)
    fwd = parts["clean forward (all layers + head)"]
    print(format_replacement(res))
    print(f"load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f}; threads "
          f"{torch.get_num_threads()}")
    print(f"cost in clean forward passes of the same windows: {wall / (fwd * n_batches):.1f} "
          f"(clean forward {ids.numel() / fwd:.0f} tokens/s during this run)")
    print(f"full replacement of {len(rep.layers)} layers on {len(windows)} windows: {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
