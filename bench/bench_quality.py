"""Quality per wall-minute: ours vs sparsify vs sae-lens on SmolLM2-135M's layer-6 MLP, same text, same clock.

    python bench/bench_quality.py                               # budgets 2,5,10 min: ~50 min in all
    python bench/bench_quality.py --budgets 0.5,1 --eval-tokens 2048      # smoke test (~8 min)
    python bench/bench_quality.py --contenders ours-topk,sparsify        # a subset
    python bench/bench_quality.py --contenders ours-topk-skip --add-to bench/out/quality-X.json   # one more

Contenders (same width, ``--n-features``, default 8 x d_model = 4608; same target L0 32):

- ``ours-relu``: our ReLU transcoder, λ tuned automatically to L0 32 (``train_dictionaries`` with
  ``time_budget``: the LR warm-up/decay follow elapsed time; at the end the usual L0 calibration);
- ``ours-topk``: our TopK transcoder, k 32, same trainer;
- ``sparsify``: sparsify's own ``Trainer.fit`` (its hooked forward of the whole model, its default
  ScheduleFree SignSGD, ``loss_fn="fvu"``), TopK transcoder (``transcode=True``) k 32 on ``layers.6.mlp``;
- ``sae-lens``: sae-lens's ``ActivationsStore`` (HookedProxyLM over the HF model, hook
  ``model.layers.6.mlp``, i.e. mlp_out) + ``SAETrainer.step`` on a ``TopKTrainingSAE`` k 32, constant LR,
  no warm-up or decay: an SAE on mlp_out, the nearest thing sae-lens trains (it has no trainable
  transcoder).

One run per contender, of the largest budget, each in its own process (peers in ``bench/.venv-peers``),
one at a time, 2 torch threads each; snapshots are saved with each tool's own save function at every
smaller budget. The clock of a run starts after the Python imports, before the model is loaded: model
load, reading the token ids, each tool's forward passes (harvesting), training steps and mid-run
snapshot saves count; the final save after the budget does not. Snapshots are taken at the first step
boundary after each budget. sparsify's and sae-lens's schedules do not depend on the total budget
(ScheduleFree; constant LR), so their snapshots are what a run of that budget would have given. Ours
follows the budget of the whole run: its snapshots at the smaller budgets are mid-schedule (LR not yet
decayed, ReLU L0 not calibrated), a handicap for ours.

Text: the default corpus mix, tokenized once by our pipeline (``load_corpus_windows``, context 128),
the training split written to ``<work>/train_ids.safetensors`` and read by every tool in the same
order; held-out windows of the same split (never trained on) for the evaluation, which runs after all
training with our ``sparsetrace.evaluate.metrics.evaluate`` for every dictionary (loaded with
``load_dictionary``, which reads the peers' formats): FVU, L0, CE recovered vs zero- and mean-ablation
of mlp_out (spliced), KL. The last line compares the largest budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT, emit, fmt, machine_line, peak_rss_mb, peer_python, run_worker, table  # noqa: E402

MODEL = "smollm2-135m"
CONTENDERS = ("ours-relu", "ours-topk", "sparsify", "sae-lens", "ours-relu-bf16", "ours-topk-bf16", "ours-topk-skip")
DEFAULT_CONTENDERS = CONTENDERS[:4]
LABELS = {"ours-relu": "ours ReLU transcoder (auto λ, L0 32)", "ours-topk": "ours TopK transcoder (k 32)",
          "ours-relu-bf16": "ours ReLU transcoder, --model-dtype/--compute-dtype bfloat16",
          "ours-topk-bf16": "ours TopK transcoder, --model-dtype/--compute-dtype bfloat16",
          "ours-topk-skip": "ours TopK skip transcoder (k 32, plus a linear skip term mlp_in -> mlp_out)",
          "sparsify": "sparsify TopK transcoder (k 32)",
          "sae-lens": "sae-lens TopK SAE on mlp_out (k 32; the nearest thing sae-lens trains)"}


def model_dir() -> Path:
    root = Path(os.environ.get("SPARSETRACE_CACHE", Path.home() / ".cache" / "sparsetrace"))
    return root / "models" / MODEL


def minutes_label(m: float) -> str:
    return f"{m:g}min"


class Clock:
    """A worker's wall clock: snapshot times (minutes) due, and the end of the budget."""

    def __init__(self, budgets: list[float]):
        self.t0 = time.time()
        self.pending = sorted(budgets)[:-1]
        self.end = max(budgets) * 60.0
        self.snapshots: list[dict] = []

    def elapsed(self) -> float:
        return time.time() - self.t0

    def due(self) -> list[float]:
        t = self.elapsed() / 60.0
        out = [m for m in self.pending if m <= t]
        self.pending = [m for m in self.pending if m > t]
        return out

    def spent(self) -> bool:
        return self.elapsed() >= self.end

    def record(self, minutes: float, path: Path, steps: int, tokens: int) -> None:
        self.snapshots.append({"minutes": minutes, "elapsed_s": round(self.elapsed(), 2), "steps": steps,
                               "tokens": tokens, "path": str(path)})


# ------------------------------------------------------------------------------------------ workers
def peer_hf_model():
    """The cached SmolLM2 for the peer venv's transformers 4.57, which reads this transformers-5 folder's
    ``rope_parameters`` as the default RoPE base 10000 instead of 100000 (then every activation differs
    from the real model's): the base is set from the file. Checked against our model by ``check_acts``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = json.loads((model_dir() / "config.json").read_text(encoding="utf-8"))
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    cfg = AutoConfig.from_pretrained(str(model_dir()))
    cfg.rope_theta = float(rope)
    return AutoModelForCausalLM.from_pretrained(str(model_dir()), config=cfg, dtype=torch.float32).eval()


def layer_mlp_io(model, layer: int, ids):
    """(mlp_in, mlp_out) of ``layer`` for ``ids`` [n, ctx], from a hook on the HF module ``layers.L.mlp``."""
    import torch

    got = {}

    def hook(mod, inputs, output):
        got["in"], got["out"] = inputs[0].detach().clone(), output.detach().clone()

    h = model.model.layers[layer].mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return got["in"], got["out"]


def check_acts(model, a) -> float:
    """Max relative error of this process's mlp_in/mlp_out against the reference our model wrote."""
    from safetensors.torch import load_file

    ref = load_file(str(Path(a.ids).with_name("reference_acts.safetensors")))
    x, y = layer_mlp_io(model, a.layer, ref["ids"])
    return max(float((x - ref["mlp_in"]).abs().max() / ref["mlp_in"].abs().max()),
               float((y - ref["mlp_out"]).abs().max() / ref["mlp_out"].abs().max()))


def worker_ours(a) -> dict:
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    from sparsetrace.model.adapter import LanguageModel
    from sparsetrace.train.budget import WallClock
    from sparsetrace.train.config import TrainConfig
    from sparsetrace.train.pipeline import open_stream, resolve_store
    from sparsetrace.train.trainer import dictionary_dirname, train_dictionaries

    torch.set_num_threads(a.threads)
    t0 = time.time()  # the clock: after imports, before the model is loaded
    bf16 = a.worker.endswith("-bf16")
    lm = LanguageModel.load(MODEL, dtype=torch.bfloat16 if bf16 else torch.float32)
    ids = load_file(a.ids)["input_ids"]
    budgets = sorted(a.budgets)
    act = a.worker.split("-")[1]
    per_window = ids.shape[1] - 1  # BOS is not trained on
    kind = "skip_transcoder" if a.worker.endswith("-skip") else "transcoder"
    tcfg = TrainConfig(model=MODEL, layers=[a.layer], kind=kind, activation=act, target_l0=float(a.k),
                       k=a.k if act == "topk" else None, n_features=a.n_features, context=ids.shape[1],
                       n_tokens=ids.shape[0] * per_window, epochs=2.0, store="stream",
                       time_budget=budgets[-1], snapshot_at=budgets[:-1],
                       model_dtype="bfloat16" if bf16 else "float32", compute_dtype="bfloat16" if bf16 else "float32")
    if a.ours_buffer_tokens:
        tcfg = replace(tcfg, buffer_tokens=a.ours_buffer_tokens)
    tcfg = resolve_store(tcfg, lm, None, 2, ids.shape[0])
    stream = open_stream(tcfg, lm, ids, None, progress=False)
    clock = WallClock(tcfg, start=t0)
    out = Path(a.out)
    train_dictionaries(tcfg, stream, out, d_model=lm.d_model, model_id=lm.model_id, progress=False, clock=clock)
    t_end = time.time() - t0
    name = dictionary_dirname(a.layer, kind)
    snaps = [{**s, "path": str(Path(s["path"]) / name)} for s in clock.snapshots]
    snaps.append({"minutes": budgets[-1], "elapsed_s": round(clock.stopped_s, 2), "steps": clock.steps,
                  "tokens": clock.steps * tcfg.batch_size, "path": str(out / name),
                  "stopped_by": clock.stop_reason})
    return {"snapshots": snaps, "batch_tokens": tcfg.batch_size, "steps": clock.steps,
            "tokens": clock.steps * tcfg.batch_size, "tokens_forwarded": stream.forwarded,
            "seconds_stream_forward": round(stream.seconds_forward, 1),
            "finish_and_save_s": round(t_end - clock.stopped_s, 1)}  # after the budget: calibration, save


class _Stop(Exception):
    pass


def worker_sparsify(a) -> dict:
    import torch
    from safetensors.torch import load_file
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoderConfig, Trainer
    from sparsify import TrainConfig as SparsifyConfig

    torch.set_num_threads(a.threads)
    clock = Clock(a.budgets)
    model = peer_hf_model()
    ids = load_file(a.ids)["input_ids"]
    bos = model.config.bos_token_id
    hook = f"layers.{a.layer}.mlp"
    bs = a.sparsify_batch
    out = Path(a.out)
    state = {}

    def snapshot(minutes: float) -> None:
        tr = state["trainer"]
        path = out / minutes_label(minutes) / hook
        for opt in tr.optimizers:  # as sparsify's own Trainer._checkpoint: the ScheduleFree averaged weights
            if isinstance(opt, ScheduleFreeWrapper):
                opt.eval()
        tr.saes[hook].save_to_disk(str(path))
        for opt in tr.optimizers:
            if isinstance(opt, ScheduleFreeWrapper):
                opt.train()
        clock.record(minutes, path, tr.global_step, tr.global_step * bs * (ids.shape[1] - 1))

    class Windows(torch.utils.data.Dataset):
        """The token windows in order (cycled); at each batch boundary (the previous step done) the clock
        is read: snapshots due are saved, and the run ends when the budget is spent."""

        def __len__(self):
            return ids.shape[0] * 100

        def __getitem__(self, i):
            if i % bs == 0 and i > 0:
                for m in clock.due():
                    snapshot(m)
                if clock.spent():
                    raise _Stop
            return {"input_ids": ids[i % ids.shape[0]]}

    cfg = SparsifyConfig(SparseCoderConfig(num_latents=a.n_features, k=a.k, transcode=True), batch_size=bs,
                         hookpoints=[hook], log_to_wandb=False, save_every=10**9, save_dir=str(out / "_ckpt"),
                         exclude_tokens=[bos] if bos is not None else [])
    trainer = Trainer(cfg, Windows(), model)
    state["trainer"] = trainer
    try:
        trainer.fit()
    except _Stop:
        pass
    snapshot(max(a.budgets))
    steps = trainer.global_step
    return {"snapshots": clock.snapshots, "batch_tokens": bs * (ids.shape[1] - 1), "steps": steps,
            "tokens": steps * bs * (ids.shape[1] - 1), "acts_max_rel_err": check_acts(model, a)}


def worker_saelens(a) -> dict:
    import torch
    from datasets import Dataset
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import load_file

    torch.set_num_threads(a.threads)
    clock = Clock(a.budgets)
    hook = f"model.layers.{a.layer}.mlp"  # its output: mlp_out
    # sae-lens's load_model("AutoModelForCausalLM", ...) with the RoPE fix (peer_hf_model) and a tokenizer built
    # from tokenizer.json (transformers 4.57 cannot read this tokenizer_config); the ids come pre-tokenized
    from transformers import PreTrainedTokenizerFast

    hf_model = peer_hf_model()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir() / "tokenizer.json"))
    model = HookedProxyLM(hf_model, tok, hook_names=[hook])
    ids = load_file(a.ids)["input_ids"]
    bos = hf_model.config.bos_token_id
    ds = Dataset.from_dict({"input_ids": ids.tolist()})
    d_model = json.loads((model_dir() / "config.json").read_text(encoding="utf-8"))["hidden_size"]
    batch = a.saelens_batch
    big = 10**12
    store = ActivationsStore(
        model=model, dataset=ds, streaming=False, hook_name=hook, hook_head_index=None, context_size=ids.shape[1],
        d_in=d_model, n_batches_in_buffer=a.saelens_buffer,
        total_training_tokens=big, store_batch_size_prompts=32, train_batch_size_tokens=batch, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32",
        exclude_special_tokens=torch.tensor([bos]) if bos is not None else None)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_model, d_sae=a.n_features, k=a.k, device="cpu"))
    tcfg = SAETrainerConfig(total_training_samples=big, train_batch_size_samples=batch, lr=3e-4, lr_end=3e-4,
                            lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, device="cpu")
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=store)
    out = Path(a.out)

    def snapshot(minutes: float) -> None:
        path = out / minutes_label(minutes)
        sae.save_inference_model(str(path))
        clock.record(minutes, path, trainer.n_training_steps, trainer.n_training_samples)

    while True:  # SAETrainer.fit's loop body (no wandb, no evals, no checkpoints)
        trainer.maybe_reset_sparsity()
        trainer.step(next(store))
        trainer.n_training_steps += 1
        for m in clock.due():
            snapshot(m)
        if clock.spent():
            break
    snapshot(max(a.budgets))
    return {"snapshots": clock.snapshots, "batch_tokens": batch, "steps": trainer.n_training_steps,
            "tokens": trainer.n_training_samples, "acts_max_rel_err": check_acts(hf_model, a)}


WORKERS = {"ours-relu": worker_ours, "ours-topk": worker_ours, "ours-relu-bf16": worker_ours,
           "ours-topk-bf16": worker_ours, "ours-topk-skip": worker_ours, "sparsify": worker_sparsify,
           "sae-lens": worker_saelens}


def run_as_worker(a) -> None:
    res = WORKERS[a.worker](a)
    import torch

    res.update(worker=a.worker, peak_rss_mb=peak_rss_mb(), torch=torch.__version__)
    emit(res)


# ------------------------------------------------------------------------------------------ driver
def prepare(a, work: Path):
    """Train and held-out windows of the default mix (our pipeline's split), written once."""
    import torch
    from safetensors.torch import save_file

    from sparsetrace.model.adapter import LanguageModel
    from sparsetrace.train.config import TrainConfig
    from sparsetrace.train.pipeline import load_corpus_windows

    torch.set_num_threads(a.threads)
    lm = LanguageModel.load(MODEL)
    tcfg = TrainConfig(model=MODEL, layers=[a.layer], context=a.context, n_tokens=a.train_tokens)
    train, heldout = load_corpus_windows(lm, tcfg)
    n_eval = -(-a.eval_tokens // (a.context - 1))
    if heldout.shape[0] < n_eval:
        raise SystemExit(f"error: --eval-tokens {a.eval_tokens} needs {n_eval} held-out windows; the split has "
                         f"{heldout.shape[0]} (raise --train-tokens)")
    save_file({"input_ids": train.contiguous()}, str(work / "train_ids.safetensors"))
    save_file({"input_ids": heldout[:n_eval].contiguous()}, str(work / "heldout_ids.safetensors"))
    ref_ids = heldout[:2].contiguous()
    x, y = layer_mlp_io(lm.model, a.layer, ref_ids)  # the peers check their model's activations against these
    save_file({"ids": ref_ids, "mlp_in": x.contiguous(), "mlp_out": y.contiguous()},
              str(work / "reference_acts.safetensors"))
    return lm, heldout[:n_eval]


def evaluate_all(a, lm, heldout, results: dict) -> list[dict]:
    """Every snapshot with the same code, in one call of our evaluate() on the held-out windows (one clean
    pass per batch shared by all; per dictionary a spliced, a zero- and a mean-ablated pass from layer 6)."""
    from sparsetrace.dictionary.load import load_dictionary
    from sparsetrace.evaluate.metrics import evaluate

    items, dicts = [], []
    for who, res in results.items():
        for s in res.get("snapshots", []):
            d = load_dictionary(s["path"])
            d.cfg.model_id = lm.model_id  # the peers' files name the model by path, or not at all
            if who == "sae-lens":  # HookedProxyLM's hook name model.layers.6.mlp is the MLP's output
                d.cfg.layer, d.cfg.hookpoint_in, d.cfg.hookpoint_out = a.layer, "mlp_out", "mlp_out"
            items.append((who, s))
            dicts.append(d)
    if not dicts:
        return []
    t = time.perf_counter()
    ev = evaluate(lm, dicts, heldout, substitution=False, progress=True)  # rows in input order (one layer)
    print(f"  evaluated {len(dicts)} dictionaries on {heldout.shape[0]} held-out windows in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for (who, s), r in zip(items, ev["dictionaries"], strict=True):
        rows.append({"contender": who, "budget_min": s["minutes"], "elapsed_s": s["elapsed_s"],
                     "steps": s["steps"], "tokens": s["tokens"], "kind": r["kind"],
                     "hookpoints": f"{r['hookpoint_in']}->{r['hookpoint_out']}",
                     **{k: r.get(k) for k in ("fvu", "l0", "ce_recovered_vs_zero", "ce_recovered_vs_mean", "kl",
                                              "ce_spliced", "fvu_ci", "ce_recovered_vs_zero_ci", "kl_ci")},
                     "clean_ce": ev["clean_ce"]})
    return rows


def svg_plot(rows: list[dict], path: Path) -> None:
    """FVU against wall minutes, one line per contender (plain SVG, no plotting library needed)."""
    W, H, L, B = 640, 400, 60, 50
    xs = [r["budget_min"] for r in rows]
    ys = [r["fvu"] for r in rows if r["fvu"] is not None]
    if not xs or not ys:
        return
    x1, y1 = max(xs) * 1.05, max(ys) * 1.1

    def px(x, y):
        return L + (W - L - 20) * x / x1, H - B - (H - B - 20) * y / y1

    colors = {"ours-relu": "#1f77b4", "ours-topk": "#2ca02c", "ours-relu-bf16": "#17becf", "ours-topk-bf16": "#bcbd22", "ours-topk-skip": "#ff7f0e", "sparsify": "#d62728", "sae-lens": "#9467bd"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - 10}" y2="{H - B}" stroke="black"/>',
             f'<line x1="{L}" y1="{H - B}" x2="{L}" y2="10" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">wall minutes (budget)</text>',
             f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" text-anchor="middle">FVU (held-out, '
             f'lower is better)</text>']
    for i in range(5):
        y = y1 * i / 4
        _, yy = px(0, y)
        parts.append(f'<text x="{L - 5}" y="{yy + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for m in sorted(set(xs)):
        xx, _ = px(m, 0)
        parts.append(f'<text x="{xx:.1f}" y="{H - B + 15}" text-anchor="middle">{m:g}</text>')
    for j, who in enumerate(dict.fromkeys(r["contender"] for r in rows)):
        pts = sorted((r["budget_min"], r["fvu"]) for r in rows if r["contender"] == who and r["fvu"] is not None)
        c = colors.get(who, "black")
        parts.append('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>'.format(
            c, " ".join("{:.1f},{:.1f}".format(*px(x, y)) for x, y in pts)))
        parts += [f'<circle cx="{px(x, y)[0]:.1f}" cy="{px(x, y)[1]:.1f}" r="3" fill="{c}"/>' for x, y in pts]
        parts.append(f'<text x="{L + 10}" y="{20 + 16 * j}" fill="{c}">{LABELS.get(who, who)}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def _free_path(path: Path) -> Path:
    """``path``, or ``path`` with -2, -3, ... before the suffix: never overwrite an earlier result."""
    n, p = 1, path
    while p.exists():
        n += 1
        p = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="2,5,10", help="wall minutes, comma list (floats allowed)")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"comma list of {', '.join(CONTENDERS)} (the -bf16 ones: ours with a bf16 model and bf16 "
                        "matmuls, for CPUs with AMX/AVX512-BF16 and GPUs)")
    p.add_argument("--n-features", type=int, default=4608, help="width of every dictionary (8 x 576)")
    p.add_argument("--k", type=int, default=32, help="k of the TopK contenders; target L0 of ours-relu")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--train-tokens", type=int, default=1_500_000, help="tokens of training windows (cycled)")
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens for the evaluation (64 windows; its cost grows with this x dictionaries)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    p.add_argument("--sparsify-batch", type=int, default=32, help="sparsify: windows per step (its default)")
    p.add_argument("--saelens-batch", type=int, default=4096, help="sae-lens: tokens per step (its default)")
    p.add_argument("--saelens-buffer", type=int, default=64, help="sae-lens: n_batches_in_buffer")
    p.add_argument("--ours-buffer-tokens", type=int, default=0, help="ours: stream buffer rows (0: our default, "
                   "65536; the first chunk is harvested before the first step)")
    p.add_argument("--work", default=None, help="folder for ids and dictionaries (default bench/out/quality-<time>)")
    p.add_argument("--eval-corpus", default=None, metavar="SOURCE",
                   help="with --eval-only: evaluate on windows of this corpus source instead of the mix's held-out "
                        "split, e.g. heldout (World Factbook passages that no training mix contains)")
    p.add_argument("--eval-only", default=None, metavar="RESULT.json",
                   help="evaluate again the dictionaries of an earlier result file (its work folder must still "
                        "exist); nothing is trained")
    p.add_argument("--add-to", default=None, metavar="RESULT.json",
                   help="train --contenders into an earlier result's work folder (same training and held-out ids) "
                        "and evaluate them together with its dictionaries in one evaluation")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    try:
        a.budgets = sorted({float(x) for x in a.budgets.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"error: --budgets '{a.budgets}' is invalid; expected minutes, e.g. 2,5,10") from None
    if not a.budgets or min(a.budgets) <= 0:
        raise SystemExit(f"error: --budgets {a.budgets} is invalid; expected minutes > 0")
    if a.worker:
        run_as_worker(a)
        return
    contenders = [c for c in a.contenders.split(",") if c]
    bad = [c for c in contenders if c not in CONTENDERS]
    if bad:
        raise SystemExit(f"error: --contenders {','.join(bad)} unknown; expected some of {','.join(CONTENDERS)}")
    import torch

    torch.set_num_threads(a.threads)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if a.eval_only and a.add_to:
        raise SystemExit("error: pass --eval-only or --add-to, not both")
    if a.eval_only or a.add_to:
        earlier = json.loads(Path(a.eval_only or a.add_to).read_text(encoding="utf-8"))
        a.work, results = earlier["work"], earlier["workers"]
        a.budgets = sorted({s["minutes"] for r in results.values() for s in r.get("snapshots", [])})
        if a.add_to:
            again = [c for c in contenders if c in results]
            if again:
                raise SystemExit(f"error: {a.add_to} already has {','.join(again)}; expected new contenders")
    work = Path(a.work) if a.work else BENCH / "out" / f"quality-{stamp}"
    if a.eval_only or a.add_to:
        from safetensors.torch import load_file

        from sparsetrace.model.adapter import LanguageModel

        lm = LanguageModel.load(MODEL)
        heldout = load_file(str(work / "heldout_ids.safetensors"))["input_ids"]
        n_windows = -(-a.eval_tokens // (heldout.shape[1] - 1))
        if a.eval_corpus:  # a whole source no training text came from (e.g. ``heldout``)
            from sparsetrace.data.corpus import load_texts
            from sparsetrace.data.tokens import tokenize_windows

            heldout = tokenize_windows(lm.tokenizer, load_texts(a.eval_corpus), heldout.shape[1],
                                       max_windows=n_windows)
        heldout = heldout[:n_windows]
        if a.add_to:
            results = {**results, **run_contenders(a, work, contenders)}
    elif work.exists() and any(work.iterdir()):
        raise SystemExit(f"error: --work '{work}' is not empty; expected a new folder (earlier results are kept)")
    if not (a.eval_only or a.add_to):
        lm, heldout, results = train_all(a, work, contenders)
    _report(a, lm, heldout, results, work, stamp)


def train_all(a, work: Path, contenders: list[str]):
    work.mkdir(parents=True, exist_ok=True)
    print(f"# bench_quality: budgets {a.budgets} min, n_features {a.n_features}, k/L0 {a.k}, layer {a.layer}, "
          f"threads {a.threads}, work {work} ({machine_line()})", flush=True)
    t = time.perf_counter()
    lm, heldout = prepare(a, work)
    print(f"  windows ready in {time.perf_counter() - t:.0f} s: held-out {heldout.shape[0]} x {heldout.shape[1]}",
          flush=True)
    return lm, heldout, run_contenders(a, work, contenders)


def run_contenders(a, work: Path, contenders: list[str]) -> dict:
    """Each contender's run of the largest budget, one at a time, on ``work``'s training ids."""
    here = Path(__file__).resolve()
    results = {}
    done = work / "workers.json"
    earlier = json.loads(done.read_text(encoding="utf-8")) if done.exists() else {}
    common_args = ["--budgets", ",".join(f"{b:g}" for b in a.budgets), "--n-features", str(a.n_features),
                   "--k", str(a.k), "--layer", str(a.layer), "--threads", str(a.threads), "--ids",
                   str(work / "train_ids.safetensors"), "--sparsify-batch", str(a.sparsify_batch),
                   "--saelens-batch", str(a.saelens_batch), "--saelens-buffer", str(a.saelens_buffer),
                   "--ours-buffer-tokens", str(a.ours_buffer_tokens)]
    for who in contenders:  # one at a time, never concurrently
        ours = who.startswith("ours")
        py = sys.executable if ours else peer_python()
        env = {"PYTHONPATH": str(ROOT / "src")} if ours else None
        t = time.perf_counter()
        res = run_worker(py, here, ["--worker", who, "--out", str(work / who), *common_args],
                         timeout=max(a.budgets) * 60 + 900, env=env)
        results[who] = res
        msg = res.get("error") or (f"{res['steps']} steps, {fmt(res['tokens'])} tokens, peak RSS "
                                   f"{fmt(res['peak_rss_mb'])} MB" + (
                                       f", activations vs ours: max rel err {res['acts_max_rel_err']:.1e}"
                                       if "acts_max_rel_err" in res else ""))
        print(f"  {who:9s}: {msg} ({time.perf_counter() - t:.0f} s)", flush=True)
        done.write_text(json.dumps({**earlier, **results}, indent=2), encoding="utf-8")
    return results


def _report(a, lm, heldout, results: dict, work: Path, stamp: str) -> None:
    rows = evaluate_all(a, lm, heldout, results)
    (BENCH / "out").mkdir(parents=True, exist_ok=True)
    out_json = _free_path(BENCH / "out" / f"quality-{stamp}.json")
    table_rows = [[f"{r['budget_min']:g}", r["contender"], fmt(r["elapsed_s"], 1), fmt(r["fvu"], 4), fmt(r["l0"], 1),
                   fmt(r["ce_recovered_vs_zero"], 4), fmt(r["ce_recovered_vs_mean"], 4), fmt(r["kl"], 4),
                   fmt(r["tokens"]), fmt(r["steps"]), fmt(results[r["contender"]].get("peak_rss_mb"))]
                  for r in sorted(rows, key=lambda r: (r["budget_min"], CONTENDERS.index(r["contender"])))]
    print()
    print(table(["budget min", "contender", "at s", "FVU", "L0", "CE rec (zero)", "CE rec (mean)", "KL", "tokens",
                 "steps", "peak RSS MB"], table_rows))
    out_json.write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "ids", "out")},
                                    "machine": machine_line(), "labels": LABELS, "work": str(work),
                                    "workers": results, "rows": rows}, indent=2), encoding="utf-8")
    svg = _free_path(out_json.with_suffix(".svg"))
    svg_plot(rows, svg)
    print(f"\nwrote {out_json} and {svg}")
    last = max(a.budgets)
    at = {r["contender"]: r["fvu"] for r in rows if r["budget_min"] == last and r["fvu"] is not None}
    peers = {k: v for k, v in at.items() if not k.startswith("ours")}
    best = min(peers, key=peers.get) if peers else None
    ours_best = min((v for k, v in at.items() if k.startswith("ours")), default=None)
    ratio = f"{ours_best / peers[best]:.2f}" if best and ours_best is not None else "n/a"
    bf = "".join(f" / {fmt(at[c], 4)} ({c[5:]})" for c in ("ours-relu-bf16", "ours-topk-bf16", "ours-topk-skip")
                 if c in at)
    print(f"FVU at {last:g} min (held-out, lower is better): ours {fmt(at.get('ours-relu'), 4)} (relu) / "
          f"{fmt(at.get('ours-topk'), 4)} (topk){bf} vs best peer {fmt(peers.get(best), 4)} ({best or 'n/a'}): "
          f"ratio R = ours best / peer best = {ratio}")


if __name__ == "__main__":
    main()
