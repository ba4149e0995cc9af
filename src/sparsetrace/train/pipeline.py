"""The training job end to end: model -> corpus -> windows -> harvest -> train -> save.

``TrainConfig.max_memory_gb`` (``--max-memory``, GB = 10^9 bytes, per process) is split by
:func:`plan_memory`: what the process needs anyway (its resident memory once the model and corpus are
loaded, each dictionary with gradients and Adam moments, batches and working buffers) and the rest, the
activation cache's share (see :class:`~sparsetrace.data.store.ActivationCache`). A budget below what the
process needs anyway is a :class:`ConfigError` before anything is harvested.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.store import ActivationCache, default_cache_root, harvest
from ..data.stream import ActivationStream
from ..data.tokens import split_windows, tokenize_windows
from ..errors import ConfigError
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint
from .config import TrainConfig
from .trainer import train_dictionaries, world_from_env, write_run_json

HELDOUT = "heldout_tokens.safetensors"
MIN_HELDOUT = 64


def load_corpus_windows(
    lm: LanguageModel, tcfg: TrainConfig, texts: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token windows for a config (deterministic in corpus + seed)."""
    from ..data.corpus import load_texts

    if texts is None:
        texts = load_texts(tcfg.corpus)
    n_train_windows, frac, n_total = _split_plan(tcfg)
    windows = tokenize_windows(lm.tokenizer, texts, tcfg.context, max_windows=n_total)
    train, heldout = split_windows(windows, frac, seed=tcfg.seed)
    return train[:n_train_windows], heldout


def _split_plan(tcfg: TrainConfig) -> tuple[int, float, int]:
    """Training windows, held-out fraction and windows to tokenize: at least MIN_HELDOUT held-out
    windows (evaluation's default), however small the run."""
    n_train_windows = -(-tcfg.n_tokens // (tcfg.context - 1))
    frac = min(0.45, max(tcfg.eval_fraction, MIN_HELDOUT / (n_train_windows + MIN_HELDOUT)))
    return n_train_windows, frac, int(n_train_windows / (1 - frac)) + 2


def source_tokens(lm: LanguageModel, tcfg: TrainConfig, corpus) -> dict[str, int]:
    """Training tokens taken from each source of the corpus (the windows of :func:`load_corpus_windows`)."""
    from ..data.tokens import window_source_counts

    n_train_windows, frac, n_total = _split_plan(tcfg)
    counts, names = window_source_counts(lm.tokenizer, corpus.texts, corpus.sources, tcfg.context, n_total)
    train = split_windows(counts, frac, seed=tcfg.seed)[0][:n_train_windows].sum(0)
    return {n: int(v) for n, v in zip(names, train.tolist(), strict=True)}


def check_layers(lm: LanguageModel, layers: list[int]) -> None:
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise ConfigError(f"layer {layer} is out of range for '{lm.model_id}'; expected 0..{lm.n_layers - 1}")


def run_training(
    tcfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    lm: LanguageModel | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    stop_at_step: int | None = None,
) -> dict:
    tcfg.validate()
    world_from_env()
    out_dir = Path(out_dir)
    if resume and not (out_dir / "train_config.json").exists():
        raise ConfigError(f"--resume: '{out_dir}' has no train_config.json; nothing to resume")
    if resume:
        cfg_path = out_dir / "train_config.json"
        try:
            saved_dict = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ConfigError(
                f"--resume: '{cfg_path}' is unreadable or not JSON ({e}); delete the run folder to start over"
            ) from None
        try:
            saved = TrainConfig.from_dict(saved_dict)
        except ConfigError as e:
            raise ConfigError(f"--resume: '{cfg_path}' is not a valid training config ({e})") from None
        if saved.time_budget is not None or tcfg.time_budget is not None:
            raise ConfigError(f"--resume: a --time-budget run cannot be resumed (its schedule follows the wall "
                              f"time it had); expected a new run instead of continuing '{out_dir}'")
        if saved.to_dict() != tcfg.to_dict():
            # resuming always continues the saved configuration; only the memory budget (a property of
            # the machine, not of the results) may be given anew
            mem = tcfg.max_memory_gb if tcfg.max_memory_gb is not None else saved.max_memory_gb
            tcfg = replace(saved, max_memory_gb=mem)
    _check_writable(out_dir)
    t0 = time.time()
    from ..data.corpus import load_corpus

    corpus = load_corpus(tcfg.corpus)  # before the model, so a bad corpus fails fast
    texts = corpus.texts
    lm = lm or LanguageModel.load(tcfg.model, device=tcfg.device, dtype=getattr(torch, tcfg.model_dtype))
    tcfg = tcfg.resolve_layers(lm.n_layers)
    check_layers(lm, tcfg.layers)
    if tcfg.kind == "clt":
        from .clt_job import check_clt_layers

        check_clt_layers(tcfg.layers, lm.n_layers)
    n_features = tcfg.n_features or tcfg.expansion * lm.d_model
    k = tcfg.k if tcfg.k is not None else max(1, round(tcfg.max_target_l0))
    if tcfg.activation in ("topk", "batchtopk") and k > n_features:
        raise ConfigError(f"--k {k} is larger than n_features={n_features}; expected k <= n_features")
    plan = plan_memory(tcfg, lm, n_features=n_features)  # a budget that is too small fails here
    train_windows, heldout = load_corpus_windows(lm, tcfg, texts)
    hp_in, hp_out = tcfg.hookpoints
    hookpoints = sorted({Hookpoint(h, layer) for layer in tcfg.layers for h in (hp_in, hp_out)}, key=str)
    tcfg = resolve_store(tcfg, lm, plan, len(hookpoints), train_windows.shape[0], cache_dir)
    from ..dictionary.io import atomic_write_text, write_failed

    atomic_write_text(out_dir / "train_config.json", json.dumps(tcfg.to_dict(), indent=2))
    try:
        save_file({"tokens": heldout.contiguous()}, str(out_dir / HELDOUT))
    except (OSError, SafetensorError) as e:
        raise write_failed(out_dir / HELDOUT, e) from None
    if tcfg.store == "stream":
        cache = open_stream(tcfg, lm, train_windows, plan, progress=progress)
    else:
        mem_kw = {} if plan is None else {"max_resident_bytes": plan.cache_bytes,
                                          "batch_windows": plan.harvest_windows}
        cache = _harvest_once(
            lm, train_windows, hookpoints, cache_dir=cache_dir, progress=progress, dtype=tcfg.dtype, **mem_kw
        )
    t_harvest = time.time() - t0
    sparsity: dict = {}
    t_train = time.time()
    # --- kind dispatch (issue 12 §2): a cross-layer transcoder trains all layers as one model (train/clt_job.py)
    train_fn = train_dictionaries
    kw: dict = {}
    if tcfg.kind == "clt":
        from .clt_job import train_clt as train_fn
    else:  # --time-budget / --snapshot-at: the clock started with the run (train/budget.py)
        from .budget import WallClock

        kw["clock"] = clock = WallClock(tcfg, start=t0)
    dictionaries = train_fn(
        tcfg,
        cache,
        out_dir,
        d_model=lm.d_model,
        model_id=lm.model_id,
        resume=resume,
        progress=progress,
        stop_at_step=stop_at_step,
        sparsity=sparsity,
        **kw,
    )
    info = {
        "model": lm.model_id,
        "layers": tcfg.layers,
        "kind": tcfg.kind,
        "activation": tcfg.activation,
        "target_l0": tcfg.target_l0,
        "corpus": tcfg.corpus,
        "n_tokens": cache.total_tokens if isinstance(cache, ActivationStream) else cache.n_tokens,
        "store": tcfg.store,
        "corpus_sources": source_tokens(lm, tcfg, corpus),
        "seconds_harvest": round(t_harvest, 1),
        "seconds_train": round(time.time() - t_train, 1),
        "seconds_total": round(time.time() - t0, 1),
        "peak_rss_mb": round(peak_resident_bytes() / 1e6),
    }
    if "clock" in kw:
        info["steps"] = clock.steps
        info["tokens_trained"] = clock.steps * tcfg.batch_size
        info["stopped_by"] = clock.stop_reason
        if clock.active:
            info["time_budget_min"] = tcfg.time_budget
        if clock.snapshots:
            info["snapshots"] = clock.snapshots
    # per layer: the controller's own L0 before the final calibration, the calibration shift, L0/FVU on a
    # training sample before and after it (train/stats.py); warnings are also printed on stderr
    info["sparsity"] = {str(layer): rec for layer, rec in sorted(sparsity.items())}
    info["warnings"] = [w for rec in info["sparsity"].values() for w in rec["warnings"]]
    if plan is not None:
        info["max_memory_gb"] = tcfg.max_memory_gb
        info["cache_reads"] = "stream" if isinstance(cache, ActivationStream) else (
            "mapped" if cache.mapped else "pread")
    if isinstance(cache, ActivationStream):
        info["buffer_tokens"] = cache.buffer_rows
        info["tokens_forwarded"] = cache.forwarded  # this process: epochs x its share, + the first chunk on resume
        info["seconds_stream_forward"] = round(cache.seconds_forward, 1)
    if stop_at_step is None:
        write_run_json(out_dir, info)
    info["dictionaries"] = dictionaries
    return info


GB = 1e9
AUTO_DISK_MAX_BYTES = 4 * 10**9  # --store auto: a disk cache up to this size (and with room on disk), else stream
STREAM_BUFFER_BYTES = 2 * 10**9  # the stream's buffer without --max-memory
STREAM_BUFFER_MAX_ROWS = 65536


def _row_bytes(tcfg: TrainConfig, d_model: int, n_hookpoints: int) -> int:
    return n_hookpoints * d_model * (2 if tcfg.dtype == "float16" else 4)


def resolve_store(tcfg: TrainConfig, lm: LanguageModel, plan: MemoryPlan | None, n_hookpoints: int,
                  n_windows: int, cache_dir: Path | None = None) -> TrainConfig:
    """``store="auto"`` becomes ``disk`` when the activation cache would be at most AUTO_DISK_MAX_BYTES and
    fits on its disk (multi-epoch runs then pay one forward pass), else ``stream``; a stream's
    ``buffer_tokens`` is fixed here (it shapes the batch order, so a resumed run keeps the saved one)."""
    per_window = tcfg.context - (1 if getattr(lm.tokenizer, "bos_token_id", None) is not None else 0)
    row = _row_bytes(tcfg, lm.d_model, n_hookpoints)
    store = tcfg.store
    if store == "auto":
        need = n_windows * per_window * row
        root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "activations"
        store = "disk" if need <= AUTO_DISK_MAX_BYTES and need * 1.1 + 2e8 <= _free_bytes(root) else "stream"
    buffer = tcfg.buffer_tokens
    if store == "stream":
        fit = stream_buffer_tokens(tcfg, plan, row, per_window, n_windows)
        if buffer is None:
            buffer = fit
        elif plan is not None and buffer > fit:
            raise ConfigError(
                f"--max-memory {tcfg.max_memory_gb:g} GB is too small for this run's stream buffer of {buffer} "
                f"tokens (it fits {fit}); expected the budget the run started with, or more"
            )
    return replace(tcfg, store=store, buffer_tokens=buffer)


def stream_buffer_tokens(tcfg: TrainConfig, plan: MemoryPlan | None, row_bytes: int, per_window: int,
                         n_windows: int | None = None) -> int:
    """Rows the stream's buffer holds: what --max-memory leaves after the model, dictionaries and working
    buffers (:func:`plan_memory`), else STREAM_BUFFER_BYTES; at most STREAM_BUFFER_MAX_ROWS and the
    training windows' tokens; at least one window (a budget below that is a ConfigError)."""
    budget = STREAM_BUFFER_BYTES
    if plan is not None:  # beside the buffer: a whole forward pass, and a batch gathered (and joined) from it
        budget = plan.cache_bytes - max(0, plan.forward_bytes - plan.working) - 2 * tcfg.batch_size * row_bytes
    corpus = n_windows * per_window if n_windows is not None else max(tcfg.n_tokens, per_window)
    rows = min(budget // row_bytes, STREAM_BUFFER_MAX_ROWS, corpus)
    if rows < per_window:
        assert plan is not None
        more = (per_window * row_bytes - budget) / GB
        raise ConfigError(
            f"--max-memory {tcfg.max_memory_gb:g} GB is too small to stream {len(tcfg.layers)} layers: one window "
            f"of activations needs {_size(per_window * row_bytes)} more than the model and dictionaries leave; "
            f"expected --max-memory >= {_gb(int((tcfg.max_memory_gb + more) * GB) + 1)}"
        )
    return int(rows)


def open_stream(tcfg: TrainConfig, lm: LanguageModel, windows: torch.Tensor, plan: MemoryPlan | None,
                *, progress: bool = True) -> ActivationStream:
    """The stream a run trains from: DDP data-parallel ranks take disjoint windows; under layer
    parallelism each rank streams its own layers' hookpoints over every window."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    layers = tcfg.layers
    if world > 1 and tcfg.parallel == "layer":
        layers, rank, world = tcfg.layers[rank::world], 0, 1
    hps = [Hookpoint(h, layer) for layer in layers for h in sorted(set(tcfg.hookpoints))]
    assert tcfg.buffer_tokens is not None
    return ActivationStream(
        lm, windows, hps, batch_size=tcfg.batch_size, seed=tcfg.seed, buffer_tokens=tcfg.buffer_tokens,
        rank=rank, world_size=world, batch_windows=16 if plan is None else plan.harvest_windows, dtype=tcfg.dtype,
        progress=progress and rank == 0,
    )


def _free_bytes(folder: Path) -> int:
    import shutil

    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


@dataclass
class MemoryPlan:
    """How a run splits ``--max-memory`` (all in bytes)."""

    budget: int
    process: int  # resident now: interpreter, libraries, the model (at least its parameters), the corpus
    dictionaries: int  # this process's dictionaries: parameters, gradients and the two Adam moments
    working: int  # batches, encoder activations, resample/calibration samples, checkpoint buffers
    harvest_windows: int  # windows per harvest forward pass
    forward_bytes: int = 0  # one forward pass of harvest_windows windows (the stream holds it beside its buffer)

    @property
    def need(self) -> int:
        return self.process + self.dictionaries + self.working

    @property
    def cache_bytes(self) -> int:
        """The activation cache's share: what it may keep mapped."""
        return max(0, self.budget - self.need)


def plan_memory(
    tcfg: TrainConfig, lm: LanguageModel, *, n_features: int, process_bytes: int | None = None
) -> MemoryPlan | None:
    """Split ``tcfg.max_memory_gb`` (None: unbounded, no plan); ConfigError when it is too small."""
    if tcfg.max_memory_gb is None:
        return None
    budget = int(tcfg.max_memory_gb * GB)
    f32 = 4
    model = sum(t.numel() * t.element_size() for t in (*lm.model.parameters(), *lm.model.buffers()))
    process = max(resident_bytes() if process_bytes is None else process_bytes, model)
    d = lm.d_model
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    layers = tcfg.layers[rank::world] if world > 1 and tcfg.parallel == "layer" else tcfg.layers
    batch = tcfg.batch_size // world if world > 1 and tcfg.parallel == "data" else tcfg.batch_size
    hp_per_layer = len(set(tcfg.hookpoints))
    params = n_features * 2 * d + n_features + d
    params += d * d if tcfg.kind == "skip_transcoder" else 0
    params += n_features if tcfg.activation == "jumprelu" else 0
    dictionaries = 4 * params * f32 * len(layers)  # parameters, gradients, exp_avg, exp_avg_sq
    if tcfg.kind == "clt":  # one cross-layer transcoder over every layer: decoders to all later layers
        from .clt import clt_parameter_count

        params = clt_parameter_count(len(tcfg.layers), n_features, d)
        dictionaries = 4 * params * f32
    uses_lambda = tcfg.activation in ("relu", "jumprelu")
    n_resample = min(4096, tcfg.n_tokens) if uses_lambda and tcfg.resample_every > 0 else 0
    n_calibrate = min(8192, tcfg.n_tokens) if uses_lambda else 0
    working = batch * d * f32 * hp_per_layer * len(layers) * 3 + max(
        batch * (6 * n_features + 8 * d) * f32,  # one training step
        n_resample * (3 * n_features + 6 * d) * f32,  # dead-feature resampling
        n_calibrate * ((3 * n_features + 2 * d) * f32 + n_features),  # the final L0 calibration
        3 * params * f32,  # serialising a checkpoint
        2 * min(20000, tcfg.n_tokens) * d * f32,  # the activation scales
    )
    if tcfg.kind == "clt":
        from .clt import clt_working_bytes

        working = clt_working_bytes(tcfg, len(tcfg.layers), n_features, d)
    cfg = lm.model.config
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 16)
    n_hp = hp_per_layer * len(tcfg.layers)
    per_window = tcfg.context * d * f32 * (n_hp + 24) + tcfg.context**2 * f32 * 2 * heads
    harvest_windows = int(max(1, min(16, (budget - process) // per_window)))  # 16 unless that does not fit
    plan = MemoryPlan(budget=budget, process=process, dictionaries=dictionaries,
                      working=max(working, 2 * per_window), harvest_windows=harvest_windows,
                      forward_bytes=harvest_windows * per_window)
    if plan.need > budget:
        raise ConfigError(
            f"--max-memory {tcfg.max_memory_gb:g} GB is too small: the model and dictionaries alone need "
            f"~{_gb(plan.need)} GB (process now {_size(process)}, {len(layers)} "
            f"{'dictionary' if len(layers) == 1 else 'dictionaries'} with Adam state {_size(dictionaries)}, "
            f"batches and working buffers {_size(plan.working)}); expected --max-memory >= {_gb(plan.need)}"
        )
    return plan


def _gb(n: int) -> str:
    """Bytes as GB, rounded up to 0.1 GB."""
    return f"{math.ceil(n / 1e8) / 10:g}"


def _size(n: int) -> str:
    return f"{_gb(n)} GB" if n >= 1e8 else f"{math.ceil(n / 1e6)} MB"


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rusage_bytes() -> int:
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError, ValueError):
        return 0


def resident_bytes() -> int:
    """This process's resident set size now (VmRSS; the peak where /proc is not available)."""
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else _peak_rusage_bytes()


def peak_resident_bytes() -> int:
    """This process's peak resident set size so far (VmHWM)."""
    rss = _status_bytes("VmHWM")
    return rss if rss is not None else _peak_rusage_bytes()


def _harvest_once(lm: LanguageModel, windows: torch.Tensor, hookpoints: list[Hookpoint], **kw) -> ActivationCache:
    """``harvest``, but under torchrun only one rank per cache folder writes it.

    Rank 0 harvests while the other ranks wait at a barrier; then the LOCAL_RANK 0 of every other node
    harvests (or, when the cache folder is shared between nodes, just finds rank 0's cache) while the
    rest wait again; then every rank opens the finished cache.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return harvest(lm, windows, hookpoints, **kw)
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cache = harvest(lm, windows, hookpoints, **kw) if rank == 0 else None
    dist.barrier()
    if cache is None and local_rank == 0:
        cache = harvest(lm, windows, hookpoints, **kw)
    dist.barrier()
    if cache is None:  # the cache is complete now: this only opens it
        cache = harvest(lm, windows, hookpoints, **{**kw, "progress": False})
    return cache


def load_heldout(run_dir: Path) -> torch.Tensor | None:
    p = Path(run_dir) / HELDOUT
    if p.exists():
        return load_file(str(p))["tokens"]
    return None


def _check_writable(out_dir: Path) -> None:
    import os
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"output directory '{out_dir}' is not writable ({e.strerror}); choose another --out") from None
