"""Cross-layer transcoder training (`sparsetrace train --kind clt`, train/clt*.py) on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file

from sparsetrace.dictionary.clt import CLTConfig, CrossLayerTranscoder, load_clt, save_clt
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.dictionary.replacement_set import CLTReplacement, PLTSet
from sparsetrace.train.clt import CLTTrainer
from sparsetrace.train.clt_ops import DENSE_DENSITY, clt_decode
from sparsetrace.train.config import TrainConfig
from sparsetrace.train.pipeline import run_training

LAYERS = [0, 1, 2, 3]  # tiny-llama has 4 layers


@pytest.fixture()
def corpus_file(tmp_path, texts):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(texts))
    return p


def _cfg(corpus_file, **kw):
    base = dict(model="tiny-llama", layers=list(LAYERS), kind="clt", activation="jumprelu", corpus=str(corpus_file),
                context=32, n_tokens=4000, epochs=2.0, batch_size=128, expansion=4, target_l0=8.0,
                checkpoint_every=20, log_every=10)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("density", [0.03, 2 * DENSE_DENSITY])
def test_sparse_decode_matches_dense(density):
    """clt_decode (sparse and dense paths) equals CrossLayerTranscoder.decode_all, values and gradients."""
    torch.manual_seed(0)
    L, n_feat, d, n = 3, 40, 8, 50
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, n_features=n_feat, activation="relu"), seed=1)
    feats = [(torch.rand(n, n_feat) < density) * torch.rand(n, n_feat) for _ in range(L)]
    codes = [f.nonzero(as_tuple=True) for f in feats]
    vals = [f[r, c].clone().requires_grad_() for f, (r, c) in zip(feats, codes, strict=True)]
    dec = [w.detach().transpose(0, 1).contiguous().requires_grad_() for w in clt.W_dec]
    out = clt_decode(vals, [c[0] for c in codes], [c[1] for c in codes], dec, n)
    dense = [f.clone().requires_grad_() for f in feats]
    ref = clt.decode_all(dense)
    for j in range(L):
        torch.testing.assert_close(out[j] + clt.b_dec[j], ref[j], rtol=1e-5, atol=1e-5)
    g = torch.randn(L, n, d)
    (out * g).sum().backward()
    sum((r * g[j]).sum() for j, r in enumerate(ref)).backward()
    for src, (r, c) in enumerate(codes):
        torch.testing.assert_close(vals[src].grad, dense[src].grad[r, c], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dec[src].grad, clt.W_dec[src].grad.transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_export_folds_scales_and_round_trips(tmp_path):
    """The exported CLT on raw activations equals the trainer on scaled ones; save/load keeps it exactly."""
    torch.manual_seed(0)
    L, d = 3, 16
    tcfg = TrainConfig(layers=list(range(L)), kind="clt", activation="jumprelu", n_features=48, target_l0=6.0,
                       batch_size=64, n_tokens=640)
    s_in, s_out = [0.5, 2.0, 3.0], [4.0, 0.25, 1.5]
    tr = CLTTrainer(tcfg, n_layers=L, d_model=d, model_id="random", in_scales=s_in, out_scales=s_out)
    x = torch.randn(L, 64, d) * torch.tensor(s_in)[:, None, None]
    y = torch.randn(L, 64, d) * torch.tensor(s_out)[:, None, None]
    batch = {**{f"mlp_in.{i}": x[i] for i in range(L)}, **{f"mlp_out.{i}": y[i] for i in range(L)}}
    for _ in range(3):
        tr.train_step(batch)
    xs, ys = tr.scaled(batch)
    l0, fvu = tr.measure(xs, ys)
    clt = tr.export()
    with torch.no_grad():
        feats = [clt.encode(i, x[i]) for i in range(L)]
        y_hat = clt.decode_all(feats)
    for i in range(L):
        assert float((feats[i] > 0).sum(-1).float().mean()) == pytest.approx(l0[i], abs=1e-6)
        var = (y[i] - y[i].mean(0)).pow(2).sum()
        assert float((y_hat[i] - y[i]).pow(2).sum() / var) == pytest.approx(fvu[i], rel=1e-4)
    save_clt(clt, tmp_path / "clt")
    back = load_clt(tmp_path)
    with torch.no_grad():
        for a, b in zip(back(list(x)), clt(list(x)), strict=True):
            assert torch.equal(a, b)


def test_zero_off_diagonal_clt_equals_plt_set():
    """A CLT whose decoders write only to their own layer is a set of per-layer transcoders."""
    torch.manual_seed(0)
    L, n_feat, d, n = 3, 32, 12, 20
    for act in ("relu", "jumprelu", "topk"):
        cfg = CLTConfig(n_layers=L, d_model=d, n_features=n_feat, activation=act, k=5 if act == "topk" else None)
        clt = CrossLayerTranscoder(cfg, seed=2)
        plts = []
        with torch.no_grad():
            clt.b_enc.normal_(0, 0.3)
            clt.b_dec.normal_()
            if clt.log_threshold is not None:
                clt.log_threshold.uniform_(-3, 0)
            for src in range(L):
                clt.W_dec[src][:, 1:] = 0.0
                dcfg = DictionaryConfig(kind="transcoder", d_in=d, d_out=d, n_features=n_feat, activation=act,
                                        k=cfg.k, layer=src)
                plt = SparseDictionary(dcfg)
                plt.W_enc.copy_(clt.W_enc[src])
                plt.b_enc.copy_(clt.b_enc[src])
                plt.W_dec.copy_(clt.W_dec[src][:, 0])
                plt.b_dec.copy_(clt.b_dec[src])
                if plt.log_threshold is not None:
                    plt.log_threshold.copy_(clt.log_threshold[src])
                plts.append(plt)
        a, b = CLTReplacement(clt), PLTSet(plts)
        xs = [torch.randn(n, d) for _ in range(L)]
        with torch.no_grad():
            feats_a = {i: a.encode(i, xs[i]) for i in range(L)}
            feats_b = {i: b.encode(i, xs[i]) for i in range(L)}
            for i in range(L):
                torch.testing.assert_close(feats_a[i], feats_b[i])
                torch.testing.assert_close(a.decode(i, feats_a, xs[i]), b.decode(i, feats_b, xs[i]),
                                           rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
def test_each_activation_trains_to_its_target_l0(tmp_path, corpus_file, tiny_llama, activation):
    cfg = _cfg(corpus_file, activation=activation, n_tokens=8000, epochs=5.0)  # 312 steps
    info = run_training(cfg, tmp_path / "run", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
    rows = [json.loads(x) for x in (tmp_path / "run" / "clt_train_log.jsonl").read_text().splitlines()]
    for layer in LAYERS:
        assert rows[-1]["mse"][layer] < 0.7 * rows[0]["mse"][layer], (layer, rows[0]["mse"], rows[-1]["mse"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["kind"] == "clt" and run["seconds_train"] > 0
    for layer in LAYERS:
        rec = run["sparsity"][str(layer)]
        if activation == "topk":
            assert rec["l0_before_calibration"] <= 8.0 and rec["calibration_shift"] is None
        else:
            # the controller's own L0 (before the final calibration) reached the target
            assert abs(rec["controller_l0"] - 8.0) / 8.0 < 0.3, rec
            assert abs(rec["l0_after_calibration"] - 8.0) / 8.0 < 0.05, rec
        assert rec["fvu_after_calibration"] < 0.8, rec
    clt = load_clt(tmp_path / "run")  # saved at RUN/clt, on raw activations
    assert clt.cfg.activation == activation and clt.n_layers == 4 and clt.cfg.model_id == "tiny-llama"
    assert clt.cfg.input_scales is not None
    assert set(info["dictionaries"]) == {"clt"}
    assert not (tmp_path / "run" / ".checkpoints" / "clt").exists()


def test_bfloat16_matmuls_train_a_clt_like_float32(tmp_path, corpus_file, tiny_llama):
    """--compute-dtype bfloat16 runs the CLT step under bf16 autocast; it still learns as float32 does."""
    last = {}
    for cd in ("float32", "bfloat16"):
        cfg = _cfg(corpus_file, activation="jumprelu", n_tokens=4000, epochs=3.0, compute_dtype=cd)
        run_training(cfg, tmp_path / cd, lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
        rows = [json.loads(x) for x in (tmp_path / cd / "clt_train_log.jsonl").read_text().splitlines()]
        for layer in LAYERS:
            assert rows[-1]["mse"][layer] < 0.7 * rows[0]["mse"][layer], (cd, layer)
        last[cd] = rows[-1]["mse"]
    for layer in LAYERS:
        assert abs(last["bfloat16"][layer] - last["float32"][layer]) < 0.25 * last["float32"][layer] + 0.02, last


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_resume_equals_uninterrupted(tmp_path, corpus_file, tiny_llama, activation):
    cfg = _cfg(corpus_file, activation=activation)  # 62 steps, checkpoints every 20
    run_training(cfg, tmp_path / "full", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
    run_training(cfg, tmp_path / "cut", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c", stop_at_step=37)
    assert (tmp_path / "cut" / ".checkpoints" / "clt" / "state.safetensors").exists()
    run_training(cfg, tmp_path / "cut", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c", resume=True)
    a = load_file(str(tmp_path / "full" / "clt" / "clt.safetensors"))
    b = load_file(str(tmp_path / "cut" / "clt" / "clt.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = (tmp_path / "full" / "clt_train_log.jsonl").read_text()
    assert log_a == (tmp_path / "cut" / "clt_train_log.jsonl").read_text()


def test_trains_on_a_stream_like_on_the_disk_cache(tmp_path, corpus_file, tiny_llama):
    """--store stream feeds the CLT loop the same batch dicts (data/stream.py); a short run completes."""
    cfg = _cfg(corpus_file, activation="topk", n_tokens=2000, epochs=1.0, store="stream", checkpoint_every=0)
    info = run_training(cfg, tmp_path / "run", lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
    assert info["store"] == "stream" and set(info["dictionaries"]) == {"clt"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "clt_train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["mse"][0] < rows[0]["mse"][0]
    assert load_clt(tmp_path / "run").n_layers == 4


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--layers", "1,2"], "--kind clt needs every layer"),
        (["--layers", "0-3", "--activation", "batchtopk"], "batchtopk is not available for --kind clt"),
        (["--layers", "0-3", "--preact-coef", "-1"], "--preact-coef"),
        (["--layers", "0-3", "--max-memory", "0.01"], "--max-memory 0.01 GB is too small"),
    ],
)
def test_bad_clt_options_give_one_line(tmp_path, corpus_file, capsys, args, needle):
    code, out, err = run_cli(capsys, "train", "--model", "tiny-llama", "--kind", "clt", "--corpus", str(corpus_file),
                             "--context", "32", "--n-tokens", "2000", "--out", str(tmp_path / "run"), *args)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err


def test_unknown_kind_lists_clt(capsys, tmp_path):
    code, _out, err = run_cli(capsys, "train", "--kind", "cross", "--out", str(tmp_path / "r"))
    assert code != 0 and "clt" in err and err.strip().startswith("error:")


# ---------------------------------------------------------------------------------------------- DDP
D, N_TOKENS = 16, 2048


def _make_cache(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hps = [f"{h}.{layer}" for layer in LAYERS for h in ("mlp_in", "mlp_out")]
    mix = rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
    for layer in LAYERS:
        x = rng.standard_normal((N_TOKENS, D)).astype(np.float32) * (1 + layer)
        np.save(folder / f"mlp_in.{layer}.npy", x)
        np.save(folder / f"mlp_out.{layer}.npy", np.maximum(x @ mix, 0).astype(np.float32))
    meta = {"model_id": "random", "hookpoints": hps, "n_tokens": N_TOKENS, "d": dict.fromkeys(hps, D),
            "dtype": "float32", "windows": "random", "context": 33, "complete": True}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _child(cache_dir: str, out: str) -> None:
    import torch.distributed as dist

    from sparsetrace.data.store import ActivationCache
    from sparsetrace.train.clt_job import train_clt

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = TrainConfig(model="random", layers=list(LAYERS), kind="clt", activation="topk", target_l0=4.0,
                      expansion=4, n_tokens=N_TOKENS, epochs=1.0, batch_size=128, lr=3e-3, checkpoint_every=0,
                      log_every=4, parallel="data", seed=3)
    try:
        train_clt(cfg, ActivationCache(Path(cache_dir)), Path(out), d_model=D, model_id="random", progress=False)
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


def test_ddp_two_ranks_equal_single_process(tmp_path):
    cache = _make_cache(tmp_path / "cache")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSETRACE_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    me = str(Path(__file__).resolve())
    for args in ([sys.executable, me, str(cache), str(tmp_path / "single")],
                 [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "--max_restarts", "0", me, str(cache), str(tmp_path / "ddp")]):
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "single" / "clt" / "clt.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "clt" / "clt.safetensors"))
    for k in a:  # half-batch partial sums averaged across ranks: float rounding differs
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
