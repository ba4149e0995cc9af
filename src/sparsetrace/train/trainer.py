"""Training sparse dictionaries on harvested activations.

One harvest feeds every layer: the model runs once over the corpus, stopping after the deepest layer
needed, and each layer's dictionary is trained on its own hookpoints from the shared cache.

Sparsity: TopK/BatchTopK fix L0 = k. ReLU+L1 and JumpReLU+L0 have a penalty λ, which is tuned
*automatically and per layer* by :class:`~.controller.L0Controller` (a log-space integral controller
with look-ahead) towards ``target_l0``, approaching it from the dense side; dead features are resampled
so an undershoot can recover. JumpReLU thresholds start where each feature fires on a few times
target/n_features of the first batch and learn at ``threshold_lr_scale`` x the base rate. At the end,
:func:`~.stats.finish_layer` records the controller's own L0, calibrates the encoder bias (unless
``calibrate`` is off) and warns when either step went wrong; see :mod:`.stats`.

Distributed: under ``torchrun`` with ``parallel="data"`` each dictionary is wrapped in
``DistributedDataParallel`` and each rank takes a disjoint slice of every global batch; with
``parallel="layer"`` rank r trains ``layers[r::world_size]``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.store import ActivationCache, BatchSchedule
from ..data.stream import ActivationStream
from ..dictionary.io import atomic_write_text, save_dictionary
from ..dictionary.model import DictionaryConfig, SparseDictionary
from ..errors import ConfigError, TrainingDiverged
from .budget import WallClock, save_snapshot, schedule_factor
from .checkpoint import (
    append_log,
    checkpoint_tensors,
    dictionary_dirname,
    load_checkpoint,
    save_checkpoints,
    truncate_log,
)
from .config import TrainConfig
from .controller import L0Controller, init_thresholds
from .objective import StepStats, _Objective
from .sparse_relu import SPARSE_DENSITY
from .stats import TrainingStream, feature_counts, finish_layer, save_training_stats

__all__ = ["LayerTrainer", "StepStats", "_Objective", "dictionary_dirname", "train_dictionaries"]


JUMPRELU_DECODER_INIT = 0.3  # initial norm of JumpReLU decoder rows (inputs are scaled to unit mean square)


def _fused_kwargs(device: str) -> dict:
    kind = torch.device(device).type
    return {"fused": True} if kind in ("cpu", "cuda") else {}


class LayerTrainer:
    """Everything needed to train one layer's dictionary."""

    def __init__(self, tcfg: TrainConfig, layer: int, d_model: int, model_id: str, in_scale: float, out_scale: float):
        self.tcfg, self.layer = tcfg, layer
        hp_in, hp_out = tcfg.hookpoints
        n_features = tcfg.n_features or tcfg.expansion * d_model
        self.target_l0 = tcfg.target_for(layer)
        k = tcfg.k if tcfg.k is not None else max(1, round(self.target_l0))
        if tcfg.activation in ("topk", "batchtopk") and k > n_features:
            raise ConfigError(f"k={k} is larger than n_features={n_features}; expected k <= n_features")
        cfg = DictionaryConfig(
            kind=tcfg.kind,
            d_in=d_model,
            d_out=d_model,
            n_features=n_features,
            activation=tcfg.activation,
            k=k if tcfg.activation in ("topk", "batchtopk") else None,
            layer=layer,
            hookpoint_in=hp_in,
            hookpoint_out=hp_out,
            model_id=model_id,
        )
        self.hp_in, self.hp_out = f"{hp_in}.{layer}", f"{hp_out}.{layer}"
        self.in_scale, self.out_scale = in_scale, out_scale
        self.dictionary = SparseDictionary(cfg, seed=tcfg.seed * 1000 + layer).to(tcfg.device)
        if tcfg.activation == "jumprelu":
            with torch.no_grad():
                self.dictionary.b_enc.fill_(0.0)
                # small decoder rows: a JumpReLU feature cannot shrink below its threshold, so against a
                # unit-norm random decoder the quickest cut in MSE is to switch features off, and the
                # encoder does that in a few steps (L0 135 -> 6 on SmolLM2 within 20 steps, whatever λ)
                self.dictionary.W_dec.mul_(JUMPRELU_DECODER_INIT)
        self.compute_dtype = torch.bfloat16 if tcfg.compute_dtype == "bfloat16" else torch.float32
        self.objective: nn.Module = _Objective(self.dictionary, tcfg.aux_k_coef, self.compute_dtype)
        if dist.is_available() and dist.is_initialized() and tcfg.parallel == "data" and dist.get_world_size() > 1:
            self.objective = nn.parallel.DistributedDataParallel(self.objective)
        # fused Adam: one kernel over each parameter (6x faster than foreach on CPU for 38M parameters)
        d = self.dictionary
        groups = [{"params": [p for p in d.parameters() if p is not d.log_threshold], "lr_scale": 1.0}]
        if d.log_threshold is not None:
            groups.append({"params": [d.log_threshold], "lr_scale": tcfg.threshold_lr_scale})
        self.opt = torch.optim.Adam(groups, lr=tcfg.lr, betas=(0.9, 0.999), **_fused_kwargs(tcfg.device))
        init = tcfg.l1_init if tcfg.l1_init is not None else (0.05 if tcfg.activation == "relu" else 1.0)
        # JumpReLU answers λ more slowly (a threshold moves only through tokens within the bandwidth of it),
        # so its controller looks further ahead
        horizon = tcfg.lambda_horizon if tcfg.lambda_horizon is not None else (
            50.0 if tcfg.activation == "jumprelu" else 20.0)
        self.controller = L0Controller(self.target_l0, math.log(init), tcfg.lambda_gain, horizon=horizon)
        self.since_fired = torch.zeros(n_features, dtype=torch.long)
        self.step = 0
        self.progress: float | None = None  # under --time-budget: fraction of the training time elapsed
        self.last_l0: float | None = None
        self.b_enc_before_calibration: Tensor | None = None
        self.threshold_before_calibration: Tensor | None = None
        # training-stream statistics over the last pass (at most n_tokens tokens) of the run
        stream_steps = min(tcfg.total_steps, -(-tcfg.n_tokens // tcfg.batch_size))
        start = 0 if tcfg.time_budget is not None else tcfg.total_steps - stream_steps  # the end is unknown
        self.stream = TrainingStream(n_features, d_model, start, tcfg.device)
        total_tokens = tcfg.total_steps * tcfg.batch_size
        self.dead_window = max(10 * tcfg.batch_size, min(tcfg.dead_window_tokens, total_tokens // 8))

    @property
    def thresholds_frozen(self) -> bool:
        """JumpReLU thresholds (and λ with them) are held for the first ``threshold_warmup_frac`` of the
        steps while the decoder learns its first directions: what a feature is worth to reconstruction,
        which moves its threshold, means little against a random decoder."""
        if self.dictionary.log_threshold is None:
            return False
        if self.progress is not None:
            return self.progress < self.tcfg.threshold_warmup_frac
        return self.step < self.tcfg.threshold_warmup_frac * self.tcfg.total_steps

    @property
    def uses_lambda(self) -> bool:
        return self.tcfg.activation in ("relu", "jumprelu")

    def lr_at(self, step: int) -> float:
        if self.progress is not None:  # --time-budget: the schedule follows the training time elapsed
            return self.tcfg.lr * schedule_factor(self.progress, self.tcfg.warmup_frac, self.tcfg.decay_frac)
        total = self.tcfg.total_steps
        warm = max(1, int(total * self.tcfg.warmup_frac))
        decay_start = int(total * (1 - self.tcfg.decay_frac))
        if step < warm:
            return self.tcfg.lr * (step + 1) / warm
        if step >= decay_start:
            return self.tcfg.lr * max(0.0, (total - step) / max(1, total - decay_start))
        return self.tcfg.lr

    def train_step(self, x: Tensor, y: Tensor) -> StepStats:
        d = self.dictionary
        d.train()
        x = x.to(self.tcfg.device) / self.in_scale
        y = y.to(self.tcfg.device) / self.out_scale
        lam = torch.tensor(self.controller.value, device=x.device)
        dead = self.since_fired.to(x.device) > self.dead_window
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step) * g.get("lr_scale", 1.0)
        if self.step == 0 and d.cfg.activation == "jumprelu":
            self._init_thresholds(x)
        # the controller's smoothed L0 (saved in checkpoints, equal on every rank) picks the ReLU step
        ema = self.controller.ema_l0
        active_only = (d.cfg.activation == "relu" and self.tcfg.sparse_relu and ema is not None
                       and ema < SPARSE_DENSITY * d.n_features)
        # bfloat16: the dense ReLU step casts its own matmuls (train/dense_relu.py); the others run under autocast
        fused = d.cfg.activation == "relu" and not active_only
        use_autocast = self.compute_dtype != torch.float32 and not fused
        with torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=use_autocast):
            loss, mse, code, err = self.objective(x, y, lam, dead, active_only)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {float(loss.detach())} at step {self.step} for layer {self.layer}; "
                f"expected a finite loss (try a lower --lr)"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if d.cfg.activation in ("topk", "batchtopk"):
            d.remove_parallel_decoder_grad()
        if self.thresholds_frozen and d.log_threshold.grad is not None:
            d.log_threshold.grad.zero_()
        torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            if d.cfg.activation in ("topk", "batchtopk"):
                d.normalise_decoder()
            if d.cfg.activation == "batchtopk":
                dense = code.dense
                pos = dense[dense > 0]
                if pos.numel():
                    m = pos.min()
                    if self.step == 0:
                        d.batch_threshold.fill_(m)
                    else:
                        d.batch_threshold.mul_(0.99).add_(0.01 * m)
            counts = feature_counts(code, d.n_features)
            self.stream.add(self.step, counts, y)
            fired = (counts > 0).to(torch.int64)
            l0 = code.l0()
            var = (y - y.mean(0)).pow(2).sum()
            fvu = err.pow(2).sum() / var.clamp_min(1e-12)
            stats = torch.stack([l0, fvu, mse.detach(), loss.detach()])
            if dist.is_available() and dist.is_initialized() and self.tcfg.parallel == "data":
                dist.all_reduce(stats)
                stats /= dist.get_world_size()
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            l0_v, fvu_v, mse_v, loss_v = stats.tolist()
            n_tok = x.shape[0] * (dist.get_world_size() if dist.is_initialized() and self.tcfg.parallel == "data" else 1)
            self.since_fired += n_tok
            self.since_fired[fired.cpu().bool()] = 0
        lam_v = self.controller.value
        self.last_l0 = l0_v
        if self.uses_lambda and not self.thresholds_frozen:
            self.controller.update(l0_v)
        self.step += 1
        return StepStats(
            loss=loss_v,
            mse=mse_v,
            fvu=fvu_v,
            l0=l0_v,
            lam=lam_v,
            dead_frac=float((self.since_fired > self.dead_window).float().mean()),
        )

    @torch.no_grad()
    def _init_thresholds(self, x: Tensor) -> None:
        """Start JumpReLU with every feature firing on ``init_l0_factor`` x target / n_features of the tokens."""
        d = self.dictionary
        rate = min(0.5, self.tcfg.init_l0_factor * self.target_l0 / d.n_features)
        thr = init_thresholds(d.pre_activations(x), rate)
        if dist.is_available() and dist.is_initialized() and self.tcfg.parallel == "data":
            dist.all_reduce(thr)
            thr /= dist.get_world_size()
        d.log_threshold.copy_(thr.log())

    @torch.no_grad()
    def resample_dead(self, cache: ActivationCache, n_candidates: int = 4096) -> int:
        """Re-initialise dead features towards inputs the dictionary reconstructs worst (deterministic)."""
        d = self.dictionary
        dead = (self.since_fired > self.dead_window).nonzero().squeeze(-1)
        if dead.numel() == 0:
            return 0
        g = torch.Generator().manual_seed(self.tcfg.seed * 7919 + self.step)
        idx = torch.randint(0, cache.n_tokens, (min(n_candidates, cache.n_tokens),), generator=g)
        x = cache.get(self.hp_in, idx).to(self.tcfg.device) / self.in_scale
        y = cache.get(self.hp_out, idx).to(self.tcfg.device) / self.out_scale
        d.eval()
        resid = y - d.decode(d.encode(x), x)
        d.train()
        weight = resid.pow(2).sum(-1)
        pick = torch.multinomial(weight.cpu() + 1e-12, dead.numel(), replacement=True, generator=g)
        alive = self.since_fired <= self.dead_window
        enc_norm = d.W_enc[alive].norm(dim=-1).mean() if alive.any() else torch.tensor(1.0)
        r = resid[pick]
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        xi = x[pick]
        xi = xi / xi.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        d.W_dec[dead] = r
        d.W_enc[dead] = xi * enc_norm * 0.2
        d.b_enc[dead] = 0.0
        if d.log_threshold is not None:
            # as selective as a typical live feature (a tiny threshold would fire on every token and throw
            # L0 far above the target right when the controller has settled)
            live = d.log_threshold[alive]
            d.log_threshold[dead] = live.median() if live.numel() else math.log(0.05)
        for p in (d.W_dec, d.W_enc, d.b_enc, d.log_threshold):
            if p is None:
                continue
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][dead] = 0.0
        self.since_fired[dead] = 0
        return int(dead.numel())

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        return checkpoint_tensors(self)

    def checkpoint_json(self) -> dict:
        return {"step": self.step, "controller": self.controller.state(), "layer": self.layer}

    def load_checkpoint(self, folder: Path) -> None:
        load_checkpoint(self, folder)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def scales_for(cache: ActivationCache | ActivationStream, hp_in: str, hp_out: str) -> tuple[float, float]:
    d = next(iter(cache.meta.d.values()))
    in_scale = math.sqrt(cache.mean_sq_norm(hp_in) / d)
    out_scale = math.sqrt(cache.mean_sq_norm(hp_out) / d)
    return max(in_scale, 1e-8), max(out_scale, 1e-8)


def train_dictionaries(
    tcfg: TrainConfig,
    cache: ActivationCache | ActivationStream,
    out_dir: Path,
    *,
    d_model: int,
    model_id: str,
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    sparsity: dict | None = None,
    clock: WallClock | None = None,
) -> dict[int, SparseDictionary]:
    """Train one dictionary per layer in ``tcfg.layers`` on ``cache``; save them into ``out_dir``.

    ``cache`` is an on-disk :class:`ActivationCache` (batches by :class:`BatchSchedule`) or an
    :class:`ActivationStream` (batches from the model's forward passes, already split by DDP rank);
    both serve every layer the same batches, in an order that is a pure function of (seed, step).

    ``sparsity`` (optional) receives, per layer, the record of :func:`~.stats.finish_layer`. ``clock``
    (train/budget.py) carries ``time_budget`` and ``snapshot_at``; by default it starts now."""
    tcfg.validate()
    clock = clock if clock is not None else WallClock(tcfg)
    sparsity = {} if sparsity is None else sparsity
    out_dir = Path(out_dir)
    rank, world = _rank_world()
    my_layers = tcfg.layers
    if world > 1 and tcfg.parallel == "layer":
        my_layers = tcfg.layers[rank::world]
    if world > 1 and (clock.active or clock.pending):
        raise ConfigError("--time-budget and --snapshot-at are not available under torchrun; expected one process")
    if resume and clock.active:
        raise ConfigError("--resume: a --time-budget run cannot be resumed (its schedule follows the wall time "
                          "it had); expected a new run")
    trainers: list[LayerTrainer] = []
    for layer in my_layers:
        hp_in, hp_out = tcfg.hookpoints
        s_in, s_out = scales_for(cache, f"{hp_in}.{layer}", f"{hp_out}.{layer}")
        trainers.append(LayerTrainer(tcfg, layer, d_model, model_id, s_in, s_out))
    ckpt_root = out_dir / ".checkpoints"
    _resume_or_clear_logs(trainers, tcfg, out_dir, ckpt_root, resume, rank)
    total = tcfg.total_steps
    hps = sorted({h for tr in trainers for h in (tr.hp_in, tr.hp_out)})
    start = min((tr.step for tr in trainers), default=0)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress or rank != 0)
    last_ckpt = {tr.layer: tr.step for tr in trainers}
    end = total if stop_at_step is None else min(total, stop_at_step)
    for step, batch in zip(range(start, end), _batches(tcfg, cache, hps, start, end), strict=True):
        postfix = {}
        if clock.train_start is None:  # the schedule's time starts with the first batch (a stream's first chunk)
            clock.begin_training()
        progress_now = clock.progress()
        for tr in trainers:
            if tr.step > step:  # resumed from a later checkpoint than another layer
                continue
            tr.progress = progress_now
            try:
                st = tr.train_step(batch[tr.hp_in], batch[tr.hp_out])
            except TrainingDiverged as e:
                raise TrainingDiverged(
                    f"{e}; the last good checkpoint (step {last_ckpt[tr.layer]}) is kept in {ckpt_root}; "
                    f"rerun with --resume"
                ) from None
            postfix[f"L{tr.layer}"] = f"l0={st.l0:.0f} fvu={st.fvu:.2f}"
            _log_step(tr, st, step, tcfg, out_dir, rank)
            _maybe_resample(tr, step, tcfg, cache, progress_now)
        bar.update(1)
        bar.set_postfix(postfix, refresh=False)
        clock.steps = step + 1
        for minutes in clock.due():
            if rank == 0 or tcfg.parallel == "layer":
                save_snapshot(trainers, out_dir, minutes, clock, tcfg.batch_size)
        if clock.spent():
            clock.stop_reason = "time budget"
            break
        if tcfg.checkpoint_every and not clock.active and (step + 1) % tcfg.checkpoint_every == 0 and \
                step + 1 < total:
            due = [tr for tr in trainers if tr.step == step + 1]
            save_checkpoints(due, ckpt_root, tcfg.kind, rank, tcfg.parallel)
            last_ckpt.update({tr.layer: tr.step for tr in due})
    bar.close()
    clock.stopped_s = clock.elapsed()
    if stop_at_step is not None and end < total:
        save_checkpoints([tr for tr in trainers if tr.step <= end], ckpt_root, tcfg.kind, rank, tcfg.parallel)
        return {tr.layer: tr.dictionary for tr in trainers}
    return _finish_all(trainers, tcfg, cache, out_dir, ckpt_root, rank, sparsity)


def _resume_or_clear_logs(trainers: list[LayerTrainer], tcfg: TrainConfig, out_dir: Path, ckpt_root: Path,
                          resume: bool, rank: int) -> None:
    if resume:
        # each layer resumes from its own checkpoint (a kill between two layers' checkpoint writes leaves
        # them at different steps); batch order is a pure function of (seed, step), so the layers behind
        # catch up on exactly the batches they missed
        for tr in trainers:
            folder = ckpt_root / dictionary_dirname(tr.layer, tcfg.kind)
            if folder.exists():
                tr.load_checkpoint(folder)
            truncate_log(out_dir / dictionary_dirname(tr.layer, tcfg.kind) / "train_log.jsonl", tr.step)
        return
    for tr in trainers:
        log = out_dir / dictionary_dirname(tr.layer, tcfg.kind) / "train_log.jsonl"
        if log.exists() and rank == 0:
            log.unlink()


def _log_step(tr: LayerTrainer, st: StepStats, step: int, tcfg: TrainConfig, out_dir: Path, rank: int) -> None:
    total = tcfg.total_steps
    if (step % tcfg.log_every == 0 or step == total - 1) and rank == 0 or (
        tcfg.parallel == "layer" and step % tcfg.log_every == 0
    ):
        append_log(
            out_dir / dictionary_dirname(tr.layer, tcfg.kind) / "train_log.jsonl",
            {
                "step": step,
                "tokens": (step + 1) * tcfg.batch_size,
                "loss": st.loss,
                "mse": st.mse,
                "fvu": st.fvu,
                "l0": st.l0,
                "lambda": st.lam,
                "lr": tr.lr_at(step),
                "dead_frac": st.dead_frac,
            },
        )


def _maybe_resample(tr: LayerTrainer, step: int, tcfg: TrainConfig, cache, progress_now: float | None) -> None:
    """Dead-feature resampling every ``resample_every`` steps, until the LR decay starts (by steps, or by
    elapsed time under a time budget)."""
    if not tr.uses_lambda or tcfg.resample_every <= 0 or step <= 0 or step % tcfg.resample_every:
        return
    before_decay = (step < tcfg.total_steps * (1 - tcfg.decay_frac) if progress_now is None
                    else progress_now < 1 - tcfg.decay_frac)
    if before_decay:
        tr.resample_dead(cache)


def _finish_all(trainers: list[LayerTrainer], tcfg: TrainConfig, cache, out_dir: Path, ckpt_root: Path, rank: int,
                sparsity: dict) -> dict[int, SparseDictionary]:
    """Calibrate, fold the scales in, save every dictionary and its statistics; drop the checkpoints."""
    result = {}
    for tr in trainers:
        d = tr.dictionary
        rec = finish_layer(tr, cache)
        stream = tr.stream.reduced(tcfg.parallel == "data")
        d.fold_normalisation(tr.in_scale, tr.out_scale)
        if rank == 0 or tcfg.parallel == "layer":
            folder = out_dir / dictionary_dirname(tr.layer, tcfg.kind)
            save_dictionary(d, folder)
            save_training_stats(tr, folder, rec, stream)
        result[tr.layer] = d
        sparsity[tr.layer] = rec
    if rank == 0 or tcfg.parallel == "layer":
        import shutil

        for tr in trainers:
            shutil.rmtree(ckpt_root / dictionary_dirname(tr.layer, tcfg.kind), ignore_errors=True)
    return result


def _batches(tcfg: TrainConfig, cache: ActivationCache | ActivationStream, hps: list[str], start: int, end: int):
    """Batches of steps start..end-1: from the stream (already split by rank), or the disk cache's schedule
    (DDP data-parallel ranks take their slices of each global batch)."""
    if isinstance(cache, ActivationStream):
        return cache.batches(hps, start, end)
    rank, world = _rank_world()
    if tcfg.parallel != "data":
        rank, world = 0, 1
    schedule = BatchSchedule(cache.n_tokens, tcfg.batch_size, tcfg.seed, rank=rank, world_size=world)
    return schedule.batches(cache, hps, start, end)


def write_run_json(out_dir: Path, info: dict) -> None:
    atomic_write_text(Path(out_dir) / "run.json", json.dumps(info, indent=2))


def world_from_env() -> bool:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        return True
    return False
