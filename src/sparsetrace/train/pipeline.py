"""The training job end to end: model -> corpus -> windows -> harvest -> train -> save."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.store import ActivationCache, harvest
from ..data.tokens import split_windows, tokenize_windows
from ..errors import ConfigError
from ..model.adapter import LanguageModel
from ..model.hookpoints import Hookpoint
from .config import TrainConfig
from .trainer import train_dictionaries, world_from_env, write_run_json

HELDOUT = "heldout_tokens.safetensors"


def load_corpus_windows(
    lm: LanguageModel, tcfg: TrainConfig, texts: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token windows for a config (deterministic in corpus + seed)."""
    from ..data.corpus import load_texts

    if texts is None:
        texts = load_texts(tcfg.corpus)
    per_window = tcfg.context - 1
    n_train_windows = -(-tcfg.n_tokens // per_window)
    n_total = int(n_train_windows / (1 - tcfg.eval_fraction)) + 2
    windows = tokenize_windows(lm.tokenizer, texts, tcfg.context, max_windows=n_total)
    train, heldout = split_windows(windows, tcfg.eval_fraction, seed=tcfg.seed)
    return train[:n_train_windows], heldout


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
        if saved.to_dict() != tcfg.to_dict():
            tcfg = saved  # resuming always continues the saved configuration
    _check_writable(out_dir)
    t0 = time.time()
    from ..data.corpus import load_texts

    texts = load_texts(tcfg.corpus)  # before the model, so a bad corpus fails fast
    lm = lm or LanguageModel.load(tcfg.model, device=tcfg.device)
    check_layers(lm, tcfg.layers)
    n_features = tcfg.n_features or tcfg.expansion * lm.d_model
    k = tcfg.k if tcfg.k is not None else max(1, round(tcfg.target_l0))
    if tcfg.activation in ("topk", "batchtopk") and k > n_features:
        raise ConfigError(f"--k {k} is larger than n_features={n_features}; expected k <= n_features")
    train_windows, heldout = load_corpus_windows(lm, tcfg, texts)
    from ..dictionary.io import atomic_write_text, write_failed

    atomic_write_text(out_dir / "train_config.json", json.dumps(tcfg.to_dict(), indent=2))
    try:
        save_file({"tokens": heldout.contiguous()}, str(out_dir / HELDOUT))
    except (OSError, SafetensorError) as e:
        raise write_failed(out_dir / HELDOUT, e) from None
    hp_in, hp_out = tcfg.hookpoints
    hookpoints = sorted({Hookpoint(h, layer) for layer in tcfg.layers for h in (hp_in, hp_out)}, key=str)
    cache = _harvest_once(lm, train_windows, hookpoints, cache_dir=cache_dir, progress=progress, dtype=tcfg.dtype)
    t_harvest = time.time() - t0
    dictionaries = train_dictionaries(
        tcfg,
        cache,
        out_dir,
        d_model=lm.d_model,
        model_id=lm.model_id,
        resume=resume,
        progress=progress,
        stop_at_step=stop_at_step,
    )
    info = {
        "model": lm.model_id,
        "layers": tcfg.layers,
        "kind": tcfg.kind,
        "activation": tcfg.activation,
        "target_l0": tcfg.target_l0,
        "corpus": tcfg.corpus,
        "n_tokens": cache.n_tokens,
        "seconds_harvest": round(t_harvest, 1),
        "seconds_total": round(time.time() - t0, 1),
    }
    if stop_at_step is None:
        write_run_json(out_dir, info)
    info["dictionaries"] = dictionaries
    return info


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
