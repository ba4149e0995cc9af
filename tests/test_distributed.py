"""torch.distributed training on CPU (gloo): DDP and layer-parallel runs equal a single-process run.

The test writes a small random activation cache (the folder layout ``harvest`` writes: ``meta.json`` +
one ``.npy`` per hookpoint), launches ``python -m torch.distributed.run --standalone --nproc_per_node 2``
on this file (the ``__main__`` block below is the per-rank program), trains ReLU and TopK transcoders
for two layers with ``parallel="data"`` (DDP, each rank half of every global batch) and
``parallel="layer"`` (rank r trains layers[r::2]), and compares the saved dictionaries with those of a
single-process run of the same program. Children run with OMP_NUM_THREADS=1 so a 2-core box is not
oversubscribed; ``--standalone`` picks a free rendezvous port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

LAYERS = [0, 1]
D = 16
N_TOKENS = 2048
ACTIVATIONS = ("relu", "topk")


def _make_cache(folder: Path, seed: int = 0) -> Path:
    """A random activation cache in ``ActivationCache`` layout (float32, 2 layers x mlp_in/mlp_out)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hps = [f"{h}.{layer}" for layer in LAYERS for h in ("mlp_in", "mlp_out")]
    mix = rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
    for layer in LAYERS:
        x = rng.standard_normal((N_TOKENS, D)).astype(np.float32) * (1 + layer)
        y = np.maximum(x @ mix, 0) + 0.1 * rng.standard_normal((N_TOKENS, D)).astype(np.float32)
        np.save(folder / f"mlp_in.{layer}.npy", x)
        np.save(folder / f"mlp_out.{layer}.npy", y.astype(np.float32))
    meta = {"model_id": "random", "hookpoints": hps, "n_tokens": N_TOKENS, "d": dict.fromkeys(hps, D),
            "dtype": "float32", "windows": "random", "context": 33, "complete": True}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _config(activation: str, parallel: str):
    from sparsetrace.train.config import TrainConfig

    return TrainConfig(model="random", layers=list(LAYERS), kind="transcoder", activation=activation,
                       target_l0=4.0, expansion=4, n_tokens=N_TOKENS, epochs=1.5, batch_size=128, lr=3e-3,
                       checkpoint_every=0, log_every=5, resample_every=0, parallel=parallel, seed=3)


def _child(cache_dir: str, out_root: str, parallel: str) -> None:
    """Per-rank program (also the single-process reference when WORLD_SIZE is unset)."""
    import torch.distributed as dist

    from sparsetrace.data.store import ActivationCache
    from sparsetrace.train.trainer import train_dictionaries

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")  # explicit: CPU test even on a CUDA box
    cache = ActivationCache(Path(cache_dir))
    try:
        for act in ACTIVATIONS:
            train_dictionaries(_config(act, parallel), cache, Path(out_root) / act, d_model=D, model_id="random",
                               progress=False)
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SPARSETRACE_NO_PROGRESS": "1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _launch(args: list[str], timeout: float) -> None:
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _weights(root: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for act in ACTIVATIONS:
        for layer in LAYERS:
            f = root / act / f"L{layer:02d}_transcoder" / "weights.safetensors"
            assert f.exists(), f"missing {f}"
            out[(act, layer)] = load_file(str(f))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    cache = _make_cache(base / "cache")
    me = str(Path(__file__).resolve())
    _launch([sys.executable, me, "child", str(cache), str(base / "single"), "data"], timeout=120)
    for parallel in ("data", "layer"):
        _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "--max_restarts", "0", me, "child", str(cache), str(base / parallel), parallel], timeout=180)
    return base


@pytest.mark.parametrize("parallel", ["data", "layer"])
def test_two_ranks_equal_single_process(runs, parallel):
    single, multi = _weights(runs / "single"), _weights(runs / parallel)
    for key, ref in single.items():
        got = multi[key]
        assert set(got) == set(ref), key
        for name in ref:
            if parallel == "layer":  # same full batches, same ops: bit-identical
                assert torch.equal(got[name], ref[name]), (key, name)
            else:  # DDP: half-batch partial sums averaged across ranks, so float rounding differs
                torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m, k=key, n=name: f"{k} {n}: {m}")


def test_ddp_log_matches_single_process(runs):
    """The L0 the λ controller sees is the all-reduced global-batch L0 (same λ trajectory)."""
    for act in ACTIVATIONS:
        for layer in LAYERS:
            rows = {}
            for run in ("single", "data"):
                path = runs / run / act / f"L{layer:02d}_transcoder" / "train_log.jsonl"
                rows[run] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            assert [r["step"] for r in rows["single"]] == [r["step"] for r in rows["data"]]
            for a, b in zip(rows["single"], rows["data"], strict=True):
                assert a["lambda"] == pytest.approx(b["lambda"], rel=1e-5)
                assert a["l0"] == pytest.approx(b["l0"], rel=1e-5, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["data", "layer"])
def test_cli_train_under_torchrun(tmp_path, texts, parallel):
    """The documented launcher: ``torchrun ... -m sparsetrace.cli train`` on a cold activation cache."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts))
    env = {**_env(), "SPARSETRACE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max_restarts",
            "0", "-m", "sparsetrace.cli", "train", "--model", "tiny-llama", "--layers", "1,2", "--corpus",
            str(corpus), "--context", "32", "--n-tokens", "3000", "--epochs", "2", "--batch-size", "128",
            "--expansion", "4", "--target-l0", "8", "--parallel", parallel, "--out", str(out)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for layer in (1, 2):
        assert (out / f"L{layer:02d}_transcoder" / "weights.safetensors").exists()


def test_prefetch_preserves_order_and_errors():
    from sparsetrace.data.prefetch import prefetch

    items = [{"x": torch.full((2,), float(i))} for i in range(20)]
    got = [b["x"][0].item() for b in prefetch(iter(items), depth=3)]
    assert got == [float(i) for i in range(20)]

    def broken():
        yield {"x": torch.zeros(1)}
        raise ValueError("boom")

    it = prefetch(broken(), depth=2)
    next(it)
    with pytest.raises(ValueError, match="boom"):
        next(it)
    it = prefetch(iter(items), depth=2)  # early exit stops the thread
    next(it)
    it.close()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    _child(*sys.argv[2:5])
