"""Checkpoints of a layer's training state (safetensors + JSON) and the per-layer training log.

A checkpoint holds the dictionary's parameters and buffers, Adam's moments, the dead-feature clocks,
the λ controller and the training-stream statistics, so that a resumed run is bit-identical to an
uninterrupted one (batch order is a pure function of seed and step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..dictionary.io import atomic_write_text, verify_manifest, write_folder_atomically
from ..errors import TrainingDiverged

if TYPE_CHECKING:
    from .trainer import LayerTrainer


def dictionary_dirname(layer: int, kind: str) -> str:
    return f"L{layer:02d}_{kind}"


def checkpoint_tensors(tr: LayerTrainer) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    names = {id(p): n for n, p in tr.dictionary.named_parameters()}
    for n, p in tr.dictionary.named_parameters():
        out[f"param.{n}"] = p.data
    for n, b in tr.dictionary.named_buffers():
        out[f"buffer.{n}"] = b.reshape(-1) if b.dim() == 0 else b
    for p, st in tr.opt.state.items():
        n = names[id(p)]
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"adam.{n}.{key}"] = st[key]
        out[f"adam.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    out["since_fired"] = tr.since_fired
    for k, v in tr.stream.tensors().items():
        out[f"stream.{k}"] = v
    return out


def load_checkpoint(tr: LayerTrainer, folder: Path) -> None:
    verify_manifest(folder)
    try:
        t = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "state.json").read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainingDiverged(f"checkpoint {folder} is unreadable ({e}); delete it to start over") from None
    with torch.no_grad():
        for n, p in tr.dictionary.named_parameters():
            p.copy_(t[f"param.{n}"])
        for n, b in tr.dictionary.named_buffers():
            b.copy_(t[f"buffer.{n}"].reshape(b.shape))
    for n, p in tr.dictionary.named_parameters():
        if f"adam.{n}.exp_avg" in t:
            tr.opt.state[p] = {
                "step": torch.tensor(float(t[f"adam.{n}.step"].item())),
                "exp_avg": t[f"adam.{n}.exp_avg"].clone(),
                "exp_avg_sq": t[f"adam.{n}.exp_avg_sq"].clone(),
            }
    tr.since_fired = t["since_fired"].clone()
    tr.stream.load({k[len("stream."):]: v for k, v in t.items() if k.startswith("stream.")})
    tr.step = int(meta["step"])
    tr.controller.load(meta["controller"])


def save_checkpoints(trainers: list[LayerTrainer], root: Path, kind: str, rank: int, parallel: str) -> None:
    if rank != 0 and parallel != "layer":
        return
    for tr in trainers:
        write_folder_atomically(
            root / dictionary_dirname(tr.layer, kind),
            {
                "state.safetensors": checkpoint_tensors(tr),
                "state.json": json.dumps(tr.checkpoint_json()),
                "config.json": json.dumps(tr.dictionary.cfg.to_dict()),
            },
        )


def append_log(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) < step]
    atomic_write_text(path, "".join(k + "\n" for k in keep))
