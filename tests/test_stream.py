"""Every layer from one pass (issue 12 §1): layer lists and ranges, per-layer target L0, the streaming
activation source (deterministic in (seed, step), bounded buffer, DDP shares) and training from it."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file

from sparsetrace.cli_options import parse_layers, parse_target_l0
from sparsetrace.data.stream import ActivationStream, stream_batches
from sparsetrace.errors import ConfigError
from sparsetrace.train.config import TrainConfig
from sparsetrace.train.pipeline import run_training

HPS = ["mlp_in.1", "mlp_out.1", "mlp_in.3", "mlp_out.3"]


@pytest.fixture()
def corpus_file(tmp_path, texts):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(texts))
    return p


@pytest.fixture(scope="module")
def windows():
    return torch.randint(5, 250, (40, 17), generator=torch.Generator().manual_seed(3))


def _cfg(corpus_file, **kw):
    base = dict(model="tiny-llama", layers="all", kind="transcoder", corpus=str(corpus_file), context=32,
                n_tokens=3000, epochs=3.0, batch_size=128, expansion=4, target_l0=8.0, checkpoint_every=20,
                log_every=10, resample_every=30, store="stream", buffer_tokens=500)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- layers, target L0
def test_parse_layers_lists_ranges_and_all():
    assert parse_layers("all") == "all" and parse_layers(" ALL ") == "all"
    assert parse_layers("0-29") == list(range(30))
    assert parse_layers("0-3,6,10-12") == [0, 1, 2, 3, 6, 10, 11, 12]
    assert parse_layers("3, 6") == [3, 6]
    for bad, named in [("3-1", "'3-1'"), ("a", "'a'"), ("1-x", "'1-x'"), ("0-3,all", "'all'")]:
        with pytest.raises(ConfigError, match=f"^--layers .*{named}.*expected"):
            parse_layers(bad)


def test_layer_config_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"^--layers \[0, 1, 2, 3, 2\] lists a layer twice"):
        TrainConfig(layers=parse_layers("0-3,2")).validate()
    with pytest.raises(ConfigError, match=r"^--layers 'every' is invalid"):
        TrainConfig(layers="every").validate()
    cfg = TrainConfig(layers="all", target_l0=[4.0, 8.0, 16.0, 32.0]).validate()
    assert cfg.resolve_layers(4).layers == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"^--target-l0 has 4 values for 30 layers; expected one value, or one per"):
        cfg.resolve_layers(30)


def test_target_l0_one_or_one_per_layer():
    assert parse_target_l0("32") == 32.0 and parse_target_l0("8, 16") == [8.0, 16.0]
    for bad in ("0", "8,-1", "8,x", "nan", ""):
        with pytest.raises(ConfigError, match="^--target-l0 .*expected a number > 0"):
            parse_target_l0(bad)
    cfg = TrainConfig(layers=[6, 3], target_l0=[16.0, 8.0]).validate()
    assert cfg.target_for(6) == 16.0 and cfg.target_for(3) == 8.0 and cfg.max_target_l0 == 16.0
    with pytest.raises(ConfigError, match=r"^--target-l0 has 3 values for 2 layers"):
        TrainConfig(layers=[3, 6], target_l0=[8.0, 8.0, 8.0]).validate()


def test_cli_layer_and_target_errors_are_one_line(tmp_path, corpus_file, capsys):
    base = ["train", "--model", "tiny-llama", "--corpus", str(corpus_file), "--n-tokens", "500", "--out"]
    cases = [
        (["--layers", "5-2"], "error: --layers '5-2' has a reversed range '5-2'"),
        (["--layers", "1,2", "--target-l0", "8,8,8"], "error: --target-l0 has 3 values for 2 layers"),
        (["--layers", "all", "--target-l0", "8,8"], "error: --target-l0 has 2 values for 4 layers"),
        (["--layers", "1", "--store", "tape"], "error: --store 'tape' is unknown; expected stream, disk or auto"),
    ]
    for i, (args, line) in enumerate(cases):
        code, _, err = run_cli(capsys, *base, tmp_path / f"o{i}", *args)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code != 0 and len(lines) == 1 and lines[0].startswith(line), (args, err)


# ---------------------------------------------------------------------------------------------- the stream
def test_stream_is_deterministic_and_resumes_mid_chunk(tiny_llama, windows):
    a = list(stream_batches(tiny_llama, windows, HPS, 32, 0, 0, 45, 100, progress=False))
    b = list(stream_batches(tiny_llama, windows, HPS, 32, 0, 0, 45, 100, progress=False))
    c = list(stream_batches(tiny_llama, windows, HPS, 32, 1, 0, 45, 100, progress=False))
    assert len(a) == 45 and set(a[0]) == set(HPS) and a[0]["mlp_in.1"].shape == (32, tiny_llama.d_model)
    assert all(torch.equal(x[h], y[h]) for x, y in zip(a, b, strict=True) for h in HPS)
    assert not torch.equal(a[0]["mlp_in.1"], c[0]["mlp_in.1"])
    s = ActivationStream(tiny_llama, windows, HPS, batch_size=32, seed=0, buffer_tokens=100, progress=False)
    assert s.steps_per_epoch == 40 * 16 // 32 and s.chunk_rows == 7 * 16
    for start in (7, 23, 41):  # mid-chunk, a batch spanning two chunks, and the second epoch
        s2 = ActivationStream(tiny_llama, windows, HPS, batch_size=32, seed=0, buffer_tokens=100, progress=False)
        rest = list(s2.batches(None, start, 45))
        assert all(torch.equal(x[h], y[h]) for x, y in zip(a[start:], rest, strict=True) for h in HPS)
        # only the chunks from the resume step on were computed, not the stream before it
        assert s2.forwarded <= (45 - start) * 32 + 2 * s2.chunk_rows
    # each epoch reads every streamed token once (rows of a batch are distinct, epoch 0 covers the corpus)
    epoch0 = torch.cat([x["mlp_in.3"] for x in a[:20]])
    assert torch.unique(epoch0, dim=0).shape[0] == epoch0.shape[0] == 40 * 16


def test_stream_buffer_is_bounded(tiny_llama, windows):
    s = ActivationStream(tiny_llama, windows, HPS, batch_size=16, seed=2, buffer_tokens=40, progress=False)
    peak = 0
    for _ in s.batches(None, 0, 80):  # two epochs through chunks of 3 windows (48 rows)
        peak = max(peak, max(t.shape[0] for t in s._buf.values()), s.n_tokens)
    assert peak == s.chunk_rows == 48
    assert s.forwarded == 2 * 40 * 16  # epochs > 1 re-stream: each epoch runs the model over the corpus again
    x = s.get("mlp_out.3", torch.arange(5))
    assert x.shape == (5, tiny_llama.d_model) and x.dtype == torch.float32


def test_stream_whole_corpus_buffer_runs_the_model_once(tiny_llama, windows):
    """A buffer that holds every window: computed once; epochs re-permute it; resume is still exact."""
    a = ActivationStream(tiny_llama, windows, HPS, batch_size=32, seed=4, buffer_tokens=10**6, progress=False)
    got = list(a.batches(None, 0, 60))  # three epochs
    assert a.whole and a.forwarded == 40 * 16 and a.n_tokens == 40 * 16
    b = ActivationStream(tiny_llama, windows, HPS, batch_size=32, seed=4, buffer_tokens=10**6, progress=False)
    rest = list(b.batches(None, 47, 60))
    assert all(torch.equal(x[h], y[h]) for x, y in zip(got[47:], rest, strict=True) for h in HPS)
    assert not torch.equal(got[0]["mlp_in.1"], got[20]["mlp_in.1"])  # a new order each epoch
    epoch1 = torch.cat([x["mlp_in.3"] for x in got[20:40]])
    assert torch.unique(epoch1, dim=0).shape[0] == 40 * 16


def test_stream_ranks_take_disjoint_windows(tiny_llama, windows):
    one = ActivationStream(tiny_llama, windows, HPS, batch_size=32, seed=0, buffer_tokens=100, progress=False)
    ranks = [ActivationStream(tiny_llama, windows, HPS, batch_size=32, seed=0, buffer_tokens=100, rank=r,
                              world_size=2, progress=False) for r in range(2)]
    for epoch in range(2):
        got = [torch.cat([r.chunk_windows_of(epoch, j) for j in range(3)]) for r in ranks]
        assert set(got[0].tolist()).isdisjoint(got[1].tolist())
        assert sorted(got[0].tolist() + got[1].tolist()) == list(range(40))
    b = [r.batch_at(5, ["mlp_in.1"])["mlp_in.1"] for r in ranks]
    assert b[0].shape == (16, tiny_llama.d_model) and one.steps_per_epoch == ranks[0].steps_per_epoch
    assert not set(map(tuple, b[0].tolist())) & set(map(tuple, b[1].tolist()))
    # the scales are measured on the first chunk of every rank together (equal on all ranks)
    assert ranks[0].mean_sq_norm("mlp_in.1") > 0


# ---------------------------------------------------------------------------------------------- training
def _dicts(run: Path) -> dict:
    return {p.parent.name: load_file(str(p)) for p in sorted(run.glob("L*/weights.safetensors"))}


def test_stream_run_resumes_bit_identical(tmp_path, corpus_file, tiny_llama):
    cfg = _cfg(corpus_file, target_l0=[4.0, 8.0, 8.0, 12.0])
    full = run_training(cfg, tmp_path / "full", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
    run_training(cfg, tmp_path / "cut", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c", stop_at_step=33)
    saved = json.loads((tmp_path / "cut" / "train_config.json").read_text())
    assert saved["layers"] == [0, 1, 2, 3] and saved["store"] == "stream" and saved["buffer_tokens"] == 500
    run_training(cfg, tmp_path / "cut", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c", resume=True)
    a, b = _dicts(tmp_path / "full"), _dicts(tmp_path / "cut")
    assert len(a) == 4 and a.keys() == b.keys()
    for layer in a:
        for name in a[layer]:
            assert torch.equal(a[layer][name], b[layer][name]), (layer, name)
    assert not (tmp_path / "c").exists()  # streaming writes no activation cache
    run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["store"] == "stream" and run["layers"] == [0, 1, 2, 3] and 500 <= run["buffer_tokens"] < 532
    assert [run["sparsity"][str(i)]["target_l0"] for i in range(4)] == [4.0, 8.0, 8.0, 12.0]
    assert full["n_tokens"] == run["n_tokens"] > 0


def test_stream_and_disk_both_train(tmp_path, corpus_file, tiny_llama):
    """Both sources train: the loss falls, and the stream ends near where the disk cache does."""
    last = {}
    for store in ("stream", "disk"):
        cfg = _cfg(corpus_file, layers=[1, 2], store=store, buffer_tokens=None, epochs=4.0)
        info = run_training(cfg, tmp_path / store, lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
        assert info["store"] == store and (store == "disk") == (tmp_path / "c").exists()
        for layer in (1, 2):
            log = [json.loads(x) for x in (tmp_path / store / f"L0{layer}_transcoder" / "train_log.jsonl").open()]
            assert log[-1]["mse"] < 0.6 * log[0]["mse"], (store, layer, log[0], log[-1])
            last[store, layer] = log[-1]["fvu"]
    for layer in (1, 2):
        assert abs(last["stream", layer] - last["disk", layer]) < 0.2 * last["disk", layer], last


def test_store_auto_and_memory_budget(tmp_path, corpus_file, tiny_llama, monkeypatch):
    from sparsetrace.train import pipeline

    small = _cfg(corpus_file, layers=[1, 2], store="auto", buffer_tokens=None)
    assert pipeline.resolve_store(small, tiny_llama, None, 4, 100, tmp_path).store == "disk"
    monkeypatch.setattr(pipeline, "AUTO_DISK_MAX_BYTES", 1000)
    auto = pipeline.resolve_store(small, tiny_llama, None, 4, 100, tmp_path)
    assert auto.store == "stream" and auto.buffer_tokens == 100 * 31  # no budget: capped by the windows' tokens
    monkeypatch.setattr(pipeline, "resident_bytes", lambda: 400 * 10**6)
    budget = _cfg(corpus_file, layers=[1, 2], buffer_tokens=None, max_memory_gb=100.0)
    plan = pipeline.plan_memory(budget, tiny_llama, n_features=256)
    tight = _cfg(corpus_file, layers=[1, 2], buffer_tokens=None, max_memory_gb=(
        plan.need + plan.forward_bytes + 2 * 128 * 1024 + 40 * 1024) / 1e9)
    plan = pipeline.plan_memory(tight, tiny_llama, n_features=256)
    rows = pipeline.resolve_store(tight, tiny_llama, plan, 4, 100, tmp_path).buffer_tokens
    assert 31 <= rows <= plan.cache_bytes // (4 * 64 * 4)  # what the budget leaves, at least one window
    run = tmp_path / "budget"  # end to end: a stream under a budget trains, its buffer within what is left
    one = replace(tight, layers=[1], epochs=1.0)
    left = pipeline.plan_memory(one, tiny_llama, n_features=256).cache_bytes // (2 * 64 * 4)
    info = pipeline.run_training(one, run, lm=tiny_llama, progress=False)
    assert info["cache_reads"] == "stream" and 31 <= info["buffer_tokens"] <= left + 31
    assert (run / "L01_transcoder" / "weights.safetensors").exists()
    too_tight = _cfg(corpus_file, layers=[1, 2], buffer_tokens=None, max_memory_gb=(plan.need + 100) / 1e9)
    with pytest.raises(ConfigError, match=r"^--max-memory .* GB is too small to stream 2 layers"):
        pipeline.resolve_store(too_tight, tiny_llama, pipeline.plan_memory(too_tight, tiny_llama, n_features=256),
                               4, 100, tmp_path)


@pytest.mark.parametrize("parallel", ["data", "layer"])
def test_stream_under_torchrun(tmp_path, corpus_file, parallel):
    """Two ranks stream: data-parallel ranks forward disjoint windows (scales all-reduced), layer-parallel
    ranks stream only their own layers; both finish and save every layer."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSETRACE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "SPARSETRACE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": src}
    out = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max_restarts",
            "0", "-m", "sparsetrace.cli", "train", "--model", "tiny-llama", "--layers", "0-1,3", "--corpus",
            str(corpus_file), "--context", "32", "--n-tokens", "2000", "--epochs", "1", "--batch-size", "128",
            "--expansion", "4", "--target-l0", "8,8,4", "--store", "stream", "--parallel", parallel, "--out", str(out)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for layer in (0, 1, 3):
        assert (out / f"L{layer:02d}_transcoder" / "weights.safetensors").exists()
    assert json.loads((out / "train_config.json").read_text())["store"] == "stream"
    assert not (tmp_path / "cache" / "activations").exists()
