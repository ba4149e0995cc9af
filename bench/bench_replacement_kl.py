"""Full-replacement KL of a run's MLP replacement (a CLT or a per-layer transcoder set), every MLP at once.

    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/bench_replacement_kl.py RUN [RUN ...] --n-windows 16

For each run: the model runs on the run's held-out windows once as is and once with every MLP's output
replaced by the replacement's reconstruction, computed from the MLP input that the *replaced* model
produces at that layer (errors accumulate, as in a real replacement). Prints one JSON line per run with
the mean per-token KL(model || replacement), both cross-entropies on the next token, and the top-1
agreement. A stand-in until evaluate/replacement.py (issue 12 §3) is merged: this script is the
measurement the CLT helper reported.

CLT decoding is sparse and incremental: when layer l's features are known, their writes to every layer
j >= l are added to a pending buffer in one ``embedding_bag`` over ``W_dec[l].flatten(1)``, so the whole
pass costs O(active features x writes), not a dense [N, F] x [F, d] product per (source, target) pair.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsetrace.dictionary.replacement_set import CLTReplacement, load_replacement
from sparsetrace.model.adapter import LanguageModel
from sparsetrace.model.hookpoints import Hookpoint
from sparsetrace.train.pipeline import load_heldout


def _edits(rep, n_layers: int, d: int) -> dict:
    pending: dict[int, torch.Tensor] = {}
    feats: dict[int, torch.Tensor] = {}

    def make(layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            flat = x.reshape(-1, d).float()
            f = rep.encode(layer, flat)
            if isinstance(rep, CLTReplacement):
                clt = rep.clt
                rows, cols = f.nonzero(as_tuple=True)
                counts = torch.bincount(rows, minlength=flat.shape[0])
                offsets = counts.cumsum(0) - counts
                writes = F.embedding_bag(cols, clt.W_dec[layer].flatten(1), offsets, mode="sum",
                                         per_sample_weights=f[rows, cols]).view(flat.shape[0], n_layers - layer, d)
                for j in range(layer, n_layers):
                    w = writes[:, j - layer]
                    pending[j] = w.clone() if j not in pending else pending[j] + w
                out = pending.pop(layer) + clt.b_dec[layer]
            else:
                feats[layer] = f
                out = rep.decode(layer, feats, flat)
            return out.reshape(shape).to(x.dtype)

        return fn

    return {Hookpoint("mlp_out", layer): make(layer) for layer in range(n_layers)}, pending


@torch.no_grad()
def measure(run: Path, n_windows: int, batch_windows: int) -> dict:
    rep = load_replacement(run)
    lm = LanguageModel.load(rep.model_id or "smollm2-135m")
    if rep.layers != list(range(lm.n_layers)):
        raise SystemExit(f"{run}: replaces layers {rep.layers}; expected every layer 0..{lm.n_layers - 1}")
    windows = load_heldout(run)[:n_windows]
    kl_sum = ce_clean = ce_rep = agree = n_tok = 0.0
    t0 = time.time()
    for s in range(0, windows.shape[0], batch_windows):
        ids = windows[s:s + batch_windows]
        clean = lm.run(ids).logits[:, :-1].float()
        edits, pending = _edits(rep, lm.n_layers, lm.d_model)
        repl = lm.run(ids, edit=edits, replace_mlp=True).logits[:, :-1].float()
        assert not pending
        target = ids[:, 1:]
        lp, lq = clean.log_softmax(-1), repl.log_softmax(-1)
        kl_sum += float((lp.exp() * (lp - lq)).sum(-1).sum())
        ce_clean += float(F.nll_loss(lp.flatten(0, 1), target.flatten(), reduction="sum"))
        ce_rep += float(F.nll_loss(lq.flatten(0, 1), target.flatten(), reduction="sum"))
        agree += float((clean.argmax(-1) == repl.argmax(-1)).sum())
        n_tok += target.numel()
    return {"run": str(run), "kind": rep.kind, "n_features_total": sum(rep.n_features.values()),
            "n_windows": int(windows.shape[0]), "tokens": int(n_tok), "kl": kl_sum / n_tok,
            "ce_clean": ce_clean / n_tok, "ce_replacement": ce_rep / n_tok, "top1_agreement": agree / n_tok,
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--batch-windows", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    for run in a.runs:
        print(json.dumps(measure(run, a.n_windows, a.batch_windows)), flush=True)


if __name__ == "__main__":
    main()
