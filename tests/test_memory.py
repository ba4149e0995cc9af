"""Memory budget: the activation cache stays within ``max_resident_bytes``; ``--max-memory`` is plumbed
through training and ``sparsetrace run``; a budget that is too small is one clean error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparsetrace.data.store import ActivationCache, BatchSchedule, CacheMeta, harvest
from sparsetrace.errors import ConfigError
from sparsetrace.model.hookpoints import Hookpoint
from sparsetrace.train.config import TrainConfig

MB = 1_000_000
HPS = ["mlp_in.1", "mlp_out.1"]


def _write_cache(folder: Path, n: int, d: int, dtype=np.float32, seed: int = 0) -> Path:
    """An activation cache folder in the format ``harvest`` writes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for hp in HPS:
        arr = np.lib.format.open_memmap(folder / f"{hp}.npy", mode="w+", dtype=dtype, shape=(n, d))
        for s in range(0, n, 4096):
            arr[s : s + 4096] = rng.standard_normal((min(4096, n - s), d), dtype=np.float32).astype(dtype)
        arr.flush()
        del arr
    meta = CacheMeta(model_id="test", hookpoints=HPS, n_tokens=n, d={hp: d for hp in HPS},
                     dtype=np.dtype(dtype).name, windows="x", context=32, complete=True)
    (folder / "meta.json").write_text(json.dumps(meta.__dict__))
    return folder


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rss_growth(cache: ActivationCache, steps: int) -> int:
    """VmRSS growth while reading ``steps`` random batches (every row of every hookpoint, twice)."""
    schedule = BatchSchedule(cache.n_tokens, 512, seed=1)
    before = _status("VmRSS")
    peak = before
    for batch in schedule.batches(cache, HPS, 0, steps):
        assert batch[HPS[0]].shape == (512, cache.meta.d[HPS[0]])
        peak = max(peak, _status("VmRSS"))
    return peak - before


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status (Linux)")
def test_cache_rss_stays_within_budget(tmp_path):
    folder = _write_cache(tmp_path / "c", n=13_000, d=576)  # 2 x 30 MB
    steps = 2 * (13_000 // 512)  # two epochs: every row is read twice
    budget = 8 * MB
    small = _write_cache(tmp_path / "small", n=1_024, d=576)  # warm-up: libraries' code pages, allocator arenas
    for warm in (ActivationCache(small), ActivationCache(small, max_resident_bytes=0)):
        _rss_growth(warm, 4)
    bounded = ActivationCache(folder, max_resident_bytes=budget)
    assert bounded.nbytes > 50 * MB and not bounded.mapped
    grown_bounded = _rss_growth(bounded, steps)
    unbounded = ActivationCache(folder)
    assert unbounded.mapped
    grown_unbounded = _rss_growth(unbounded, steps)
    print(f"RSS growth over {steps} batches of a {bounded.nbytes / MB:.0f} MB cache: "
          f"budget {budget / MB:.0f} MB -> {grown_bounded / MB:.1f} MB; unbounded -> {grown_unbounded / MB:.1f} MB")
    assert grown_bounded < budget + 8 * MB, grown_bounded
    assert grown_unbounded > 40 * MB, grown_unbounded  # the memory-mapped reads do make the cache resident
    # a cache that fits in its budget is memory-mapped as usual
    assert ActivationCache(folder, max_resident_bytes=bounded.nbytes).mapped


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batches_identical_with_and_without_budget(tmp_path, dtype):
    folder = _write_cache(tmp_path / "c", n=3_000, d=48, dtype=dtype, seed=3)
    plain, bounded = ActivationCache(folder), ActivationCache(folder, max_resident_bytes=0)
    assert plain.mapped and not bounded.mapped
    for rank, world in ((0, 1), (1, 2)):
        a = BatchSchedule(3_000, 256, seed=7, rank=rank, world_size=world).batches(plain, HPS, 0, 30)
        b = BatchSchedule(3_000, 256, seed=7, rank=rank, world_size=world).batches(bounded, HPS, 0, 30)
        for x, y in zip(a, b, strict=True):
            for hp in HPS:
                assert x[hp].dtype == y[hp].dtype == torch.float32
                assert torch.equal(x[hp], y[hp])
    g = torch.Generator().manual_seed(0)
    for index in (torch.randint(0, 3_000, (700,), generator=g),  # duplicates, as resample_dead draws them
                  np.array([2_999, 0, 5, 4, 6, 6]), slice(None, None, 7), slice(10, 500), slice(None)):
        for hp in HPS:
            assert torch.equal(plain.get(hp, index), bounded.get(hp, index))
    for hp in HPS:
        assert plain.mean_sq_norm(hp) == bounded.mean_sq_norm(hp)
    with pytest.raises(IndexError):
        bounded.get(HPS[0], np.array([3_000]))


def test_harvest_writes_the_activations(tmp_path, tiny_llama):
    from sparsetrace.data.tokens import tokenize_windows

    texts = [f"Once upon a time there was a fox number {i} who lived near the river." * 4 for i in range(40)]
    windows = tokenize_windows(tiny_llama.tokenizer, texts, 32, max_windows=40)
    hps = [Hookpoint("mlp_in", 1), Hookpoint("mlp_out", 2)]
    cache = harvest(tiny_llama, windows, hps, cache_dir=tmp_path / "c", batch_windows=7, progress=False,
                    max_resident_bytes=0)
    assert not cache.mapped
    out = tiny_llama.run(windows, read=hps)
    for hp in hps:
        want = out.acts[hp][:, 1:, :].reshape(-1, tiny_llama.d_model)
        got = cache.get(hp, slice(None))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        on_disk = np.load(cache.folder / f"{hp}.npy")  # a valid .npy file
        assert on_disk.shape == tuple(want.shape) and on_disk.dtype == np.float32
        assert torch.equal(torch.from_numpy(on_disk), got)
    # reopened from the cache folder with another budget: same bytes
    again = harvest(tiny_llama, windows, hps, cache_dir=tmp_path / "c", progress=False)
    assert again.mapped and torch.equal(again.get(hps[0], slice(None)), cache.get(hps[0], slice(None)))


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture()
def corpus_file(tmp_path, texts):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(texts))
    return p


def _cfg(corpus_file, **kw) -> TrainConfig:
    base = dict(model="tiny-llama", layers=[1], kind="transcoder", corpus=str(corpus_file), context=32,
                n_tokens=1500, epochs=1.5, batch_size=128, expansion=2, target_l0=8.0, checkpoint_every=0,
                log_every=5, resample_every=5)
    base.update(kw)
    return TrainConfig(**base)


def test_budget_too_small_is_a_config_error(corpus_file, tiny_llama, tmp_path):
    from sparsetrace.train.pipeline import plan_memory, run_training

    cfg = _cfg(corpus_file, max_memory_gb=0.01)
    with pytest.raises(ConfigError, match=r"^--max-memory 0\.01 GB is too small: the model and dictionaries alone "
                                          r"need ~[0-9.]+ GB .*expected --max-memory >= [0-9.]+$"):
        run_training(cfg, tmp_path / "run", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing was harvested
    assert plan_memory(_cfg(corpus_file), tiny_llama, n_features=128) is None  # no budget: no plan
    plan = plan_memory(_cfg(corpus_file, max_memory_gb=100.0), tiny_llama, n_features=128)
    assert plan.cache_bytes == plan.budget - plan.need > 0 and plan.harvest_windows == 16
    for bad in (0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ConfigError, match="--max-memory"):
            _cfg(corpus_file, max_memory_gb=bad).validate()


def _weights(run: Path) -> dict:
    return load_file(str(run / "L01_transcoder" / "weights.safetensors"))


def test_training_is_bit_identical_under_a_budget(tmp_path, corpus_file, tiny_llama, monkeypatch):
    """A budget that leaves the cache almost nothing (positional reads) trains the same weights."""
    from sparsetrace.train import pipeline

    monkeypatch.setattr(pipeline, "resident_bytes", lambda: 400 * MB)  # a fixed process size: a fixed plan
    need = pipeline.plan_memory(_cfg(corpus_file, max_memory_gb=100.0), tiny_llama, n_features=128).need
    tight = _cfg(corpus_file, max_memory_gb=(need + 1000) / 1e9)
    info_tight = pipeline.run_training(tight, tmp_path / "tight", lm=tiny_llama, progress=False,
                                       cache_dir=tmp_path / "c1")
    info_free = pipeline.run_training(_cfg(corpus_file), tmp_path / "free", lm=tiny_llama, progress=False,
                                      cache_dir=tmp_path / "c2")
    run_json = json.loads((tmp_path / "tight" / "run.json").read_text())
    assert run_json["cache_reads"] == "pread" and run_json["max_memory_gb"] == tight.max_memory_gb
    assert run_json["peak_rss_mb"] > 0 and "cache_reads" not in info_free
    assert info_tight["n_tokens"] == info_free["n_tokens"]
    a, b = _weights(tmp_path / "tight"), _weights(tmp_path / "free")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cli_max_memory_too_small(tmp_path, corpus_file):
    """``train`` and ``run`` with ``--max-memory 0.01``: one ``error:`` line naming the value, exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPARSETRACE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "SPARSETRACE_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SPARSETRACE_DEBUG", None)
    train = ["train", "--model", "tiny-llama", "--layers", "1", "--corpus", str(corpus_file), "--n-tokens", "500",
             "--epochs", "1", "--context", "32", "--batch-size", "64", "--expansion", "2",
             "--out", str(tmp_path / "t"), "--max-memory", "0.01"]
    run = ["run", "--preset", "quick", "--model", "tiny-llama", "--corpus", str(corpus_file),
           "--out", str(tmp_path / "r"), "--max-memory", "0.01"]
    procs = [subprocess.Popen([sys.executable, "-m", "sparsetrace.cli", *args], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in (train, run)]
    for proc, args in zip(procs, (train, run), strict=True):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, err
        lines = err.splitlines() if args is train else [x for x in err.splitlines() if not x.startswith("[sparsetrace]")]
        assert len(lines) == 1 and lines[0].startswith("error: --max-memory 0.01 GB is too small"), err
        assert "need ~" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "cache").exists()
