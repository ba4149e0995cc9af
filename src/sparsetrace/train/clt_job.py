"""The CLT training run: the loop over batches, checkpoints, the final calibration, save and records.

:func:`run_clt_loop` trains on any iterator of batch dicts (``mlp_in.L`` / ``mlp_out.L`` for every
layer ``L``): the disk cache's :class:`~sparsetrace.data.store.BatchSchedule` today, a streaming source
just as well. :func:`train_clt` is the disk-cache job that ``sparsetrace train --kind clt`` runs.

Checkpoints (``RUN/.checkpoints/clt``: ``state.safetensors`` + ``state.json`` + manifest) hold the
trainable tensors in their training layout, Adam's moments, the dead-feature clocks and the λ
controllers, so a resumed run equals an uninterrupted one (batch order is a function of seed and step).
The trained CLT is saved at ``RUN/clt`` (:func:`~sparsetrace.dictionary.clt.save_clt`), with the
training log beside it in ``RUN/clt_train_log.jsonl``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..data.store import ActivationCache, BatchSchedule
from ..dictionary.clt import CLT_DIRNAME, CrossLayerTranscoder, save_clt
from ..dictionary.io import verify_manifest, write_folder_atomically
from ..errors import ConfigError, TrainingDiverged
from .checkpoint import append_log, truncate_log
from .clt import CLTTrainer
from .config import TrainConfig
from .controller import calibration_shift
from .stats import sparsity_warnings

CKPT = Path(".checkpoints") / "clt"
LOG = "clt_train_log.jsonl"
SAMPLE_TOKENS = 2048  # training tokens for the final L0/FVU measurement and the calibration


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_clt_layers(layers: list[int], n_layers: int) -> None:
    """A CLT covers every layer: refuse a partial --layers in one line."""
    if sorted(layers) != list(range(n_layers)):
        raise ConfigError(
            f"--kind clt needs every layer of the model; --layers lists {len(layers)} of {n_layers}; "
            f"expected --layers 0-{n_layers - 1}"
        )


# ---------------------------------------------------------------------------------------------- checkpoints
def save_clt_checkpoint(tr: CLTTrainer, root: Path) -> None:
    if _rank_world()[0] != 0:
        return
    tensors = {f"param.{n}": p.data for n, p in tr.module.named_parameters()}
    names = {id(p): n for n, p in tr.module.named_parameters()}
    for p, st in tr.opt.state.items():
        n = names[id(p)]
        tensors[f"adam.{n}.exp_avg"] = st["exp_avg"]
        tensors[f"adam.{n}.exp_avg_sq"] = st["exp_avg_sq"]
        tensors[f"adam.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    tensors["since_fired"] = tr.since_fired
    meta = {"step": tr.step, "controllers": [c.state() for c in tr.controllers], "last_l0": tr.last_l0}
    write_folder_atomically(Path(root) / CKPT, {"state.safetensors": tensors, "state.json": json.dumps(meta),
                                                "config.json": json.dumps(tr.clt.cfg.to_dict())})


def load_clt_checkpoint(tr: CLTTrainer, root: Path) -> bool:
    folder = Path(root) / CKPT
    if not folder.exists():
        return False
    verify_manifest(folder)
    try:
        t = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainingDiverged(f"checkpoint {folder} is unreadable ({e}); delete it to start over") from None
    with torch.no_grad():
        for n, p in tr.module.named_parameters():
            if tuple(t[f"param.{n}"].shape) != tuple(p.shape):
                raise ConfigError(f"checkpoint {folder} holds {n} of shape {list(t[f'param.{n}'].shape)}; "
                                  f"expected {list(p.shape)} from the training config")
            p.copy_(t[f"param.{n}"])
    for n, p in tr.module.named_parameters():
        if f"adam.{n}.exp_avg" in t:
            tr.opt.state[p] = {"step": torch.tensor(float(t[f"adam.{n}.step"].item())),
                               "exp_avg": t[f"adam.{n}.exp_avg"].clone(),
                               "exp_avg_sq": t[f"adam.{n}.exp_avg_sq"].clone()}
    tr.since_fired = t["since_fired"].clone()
    tr.step = int(meta["step"])
    tr.last_l0 = meta.get("last_l0")
    for c, s in zip(tr.controllers, meta["controllers"], strict=True):
        c.load(s)
    return True


# ---------------------------------------------------------------------------------------------- loop
def run_clt_loop(tr: CLTTrainer, batches: Iterator[dict], out_dir: Path, *, end: int, progress: bool = True) -> None:
    """Train ``tr`` from its current step up to step ``end`` on ``batches`` (one batch dict per step)."""
    tcfg, total = tr.tcfg, tr.tcfg.total_steps
    rank = _rank_world()[0]
    bar = tqdm(total=total, initial=tr.step, desc="train clt", unit="step", disable=not progress or rank != 0)
    last_ckpt = tr.step
    for batch in batches:
        if tr.step >= end:
            break
        step = tr.step
        try:
            st = tr.train_step(batch)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; the last good checkpoint (step {last_ckpt}) is kept in "
                                   f"{out_dir / CKPT}; rerun with --resume") from None
        if rank == 0 and (step % tcfg.log_every == 0 or step == total - 1):
            append_log(out_dir / LOG, {"step": step, "tokens": (step + 1) * tcfg.batch_size, "lr": tr.lr_at(step),
                                       **st})
        bar.update(1)
        bar.set_postfix({"l0": f"{sum(st['l0']) / len(st['l0']):.0f}",
                         "fvu": f"{sum(st['fvu']) / len(st['fvu']):.2f}"}, refresh=False)
        if tcfg.checkpoint_every and tr.step % tcfg.checkpoint_every == 0 and tr.step < total:
            save_clt_checkpoint(tr, out_dir)
            last_ckpt = tr.step
    bar.close()


@torch.no_grad()
def finish_clt(tr: CLTTrainer, xs: torch.Tensor, ys: torch.Tensor) -> dict[int, dict]:
    """Measure per-layer L0/FVU on a scaled training sample, calibrate each layer's L0 (ReLU/JumpReLU,
    unless turned off), measure again; returns the per-layer records (controller L0 included)."""
    tcfg, m = tr.tcfg, tr.module
    l0_before, fvu_before = tr.measure(xs, ys)
    shifts: list[float | None] = [None] * len(tr.targets)
    if tr.uses_lambda and tcfg.calibrate:
        for layer, target in enumerate(tr.targets):
            pre = torch.addmm(m.b_enc[layer], xs[layer], m.W_enc[layer].t())
            thr = m.log_threshold[layer].exp() if m.log_threshold is not None else None
            shift = calibration_shift(pre, thr, target)
            shifts[layer] = shift
            if not shift:
                continue
            if thr is not None:
                m.log_threshold[layer].copy_((thr - shift).clamp_min(1e-6).log())
            else:
                m.b_enc[layer].add_(shift)
    l0_after, fvu_after = tr.measure(xs, ys) if any(shifts) else (l0_before, fvu_before)
    dead = (tr.since_fired > tr.dead_window).float().mean(-1).tolist()
    recs = {}
    for layer, target in enumerate(tr.targets):
        c = tr.controllers[layer]
        rec = {"layer": layer, "target_l0": target,
               "controller_l0": c.ema_l0 if tr.uses_lambda else (tr.last_l0 or [None] * len(tr.targets))[layer],
               "lambda": c.value if tr.uses_lambda else None,
               "l0_before_calibration": l0_before[layer], "fvu_before_calibration": fvu_before[layer],
               "calibration_shift": shifts[layer], "l0_after_calibration": l0_after[layer],
               "fvu_after_calibration": fvu_after[layer], "dead_frac_train": dead[layer],
               "sample_tokens": int(xs.shape[1])}
        rec["warnings"] = sparsity_warnings(rec, tr.uses_lambda)
        recs[layer] = rec
    return recs


# ---------------------------------------------------------------------------------------------- job
def layer_scales(source, hp: str, n_layers: int, d_model: int) -> list[float]:
    """Per-layer scale sqrt(mean ||x||^2 / d) of a hookpoint (a cache, or a stream's first chunk)."""
    return [max((source.mean_sq_norm(f"{hp}.{layer}") / d_model) ** 0.5, 1e-8) for layer in range(n_layers)]


def source_batches(source, tcfg: TrainConfig, hps: list[str], start: int, end: int) -> Iterator[dict]:
    """Batch dicts for steps start..end-1: a streaming source (data/stream.py's ActivationStream, which
    slices ranks itself) yields them directly; a disk cache goes through a BatchSchedule."""
    if hasattr(source, "batch_at"):
        return source.batches(hps, start, end)
    rank, world = _rank_world()
    parallel = tcfg.parallel == "data"
    schedule = BatchSchedule(source.n_tokens, tcfg.batch_size, tcfg.seed,
                             rank=rank if parallel else 0, world_size=world if parallel else 1)
    return schedule.batches(source, hps, start, end)


def train_clt(tcfg: TrainConfig, cache: ActivationCache, out_dir: Path, *, d_model: int, model_id: str,
              resume: bool = False, progress: bool = True, stop_at_step: int | None = None,
              sparsity: dict | None = None) -> dict[str, CrossLayerTranscoder]:
    """Train one CLT over ``tcfg.layers`` (every layer) on ``cache`` (an ActivationCache, or anything with
    its ``n_tokens`` / ``get`` / ``mean_sq_norm`` face and, for streaming, ``batches``/``batch_at``);
    save it at ``out_dir/clt``."""
    sparsity = {} if sparsity is None else sparsity
    out_dir = Path(out_dir)
    n_layers = len(tcfg.layers)
    rank = _rank_world()[0]
    hp_in, hp_out = tcfg.hookpoints
    tr = CLTTrainer(tcfg, n_layers=n_layers, d_model=d_model, model_id=model_id,
                    in_scales=layer_scales(cache, hp_in, n_layers, d_model),
                    out_scales=layer_scales(cache, hp_out, n_layers, d_model))
    if resume:
        load_clt_checkpoint(tr, out_dir)
        truncate_log(out_dir / LOG, tr.step)
    elif rank == 0 and (out_dir / LOG).exists():
        (out_dir / LOG).unlink()
    total = tcfg.total_steps
    end = total if stop_at_step is None else min(total, stop_at_step)
    hps = [f"{h}.{layer}" for layer in range(n_layers) for h in (hp_in, hp_out)]
    run_clt_loop(tr, source_batches(cache, tcfg, hps, tr.step, end), out_dir, end=end, progress=progress)
    if end < total:
        save_clt_checkpoint(tr, out_dir)
        return {}
    tr.opt.zero_grad(set_to_none=True)  # gradients and Adam's moments (3x the decoder) are not needed now
    tr.opt.state.clear()
    g = torch.Generator().manual_seed(tcfg.seed * 31 + 17)
    idx = torch.randint(0, cache.n_tokens, (min(SAMPLE_TOKENS, cache.n_tokens),), generator=g)
    xs, ys = tr.scaled({hp: cache.get(hp, idx) for hp in hps})
    sparsity.update(finish_clt(tr, xs, ys))
    clt = tr.export()
    if rank == 0:
        save_clt(clt, out_dir / CLT_DIRNAME)
        shutil.rmtree(out_dir / CKPT, ignore_errors=True)
    return {CLT_DIRNAME: clt}
