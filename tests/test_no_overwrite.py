"""Earlier results are never replaced silently: each command that writes results refuses an output that holds
some unless --overwrite is given; an evaluation on other text goes beside the run's own figures; verify.json
records the circuit it verified."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli

from sparsetrace.train.config import TrainConfig
from sparsetrace.train.pipeline import run_training
from sparsetrace.util.hashing import sha256_file


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = [
        "Once upon a time there was a little fox who lived in the woods near a river.",
        "Mary and John went to the store. John gave a drink to Mary because she was thirsty.",
    ]
    path = tmp_path_factory.mktemp("text") / "austen_like.txt"
    path.write_text("\n\n".join(f"{t} Story number {i}. " * 3 for i in range(60) for t in base))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus, tiny_llama):
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(model="tiny-llama", layers=[1], kind="transcoder", corpus=str(corpus), context=32,
                      n_tokens=1500, epochs=1.0, batch_size=128, expansion=2, target_l0=8.0)
    run_training(cfg, out, lm=tiny_llama, progress=False, cache_dir=out.parent / "cache")
    return out


def cli(capsys, *args):
    return run_cli(capsys, *args)


def _refused(code, err):
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "results already exist" in errors[0] and "--overwrite" in errors[0], err


def test_evaluate_other_text_goes_beside(run_dir, corpus, capsys):
    code, out, err = cli(capsys, "evaluate", run_dir, "--n-windows", "2")
    assert code == 0, err
    own = (run_dir / "eval.json").read_bytes()
    metrics = (run_dir / "L01_transcoder" / "metrics.json").read_bytes()
    _refused(*cli(capsys, "evaluate", run_dir, "--n-windows", "2")[::2])
    code, out, err = cli(capsys, "evaluate", run_dir, "--corpus", corpus, "--n-windows", "2")
    assert code == 0, err
    beside = run_dir / "eval_austen_like.json"
    assert f"written: {beside}" in out
    assert json.loads(beside.read_text())["corpus"] == str(corpus)
    assert (run_dir / "eval.json").read_bytes() == own  # the run's held-out figures are untouched
    assert (run_dir / "L01_transcoder" / "metrics.json").read_bytes() == metrics
    _refused(*cli(capsys, "evaluate", run_dir, "--corpus", corpus, "--n-windows", "2")[::2])
    code, out, err = cli(capsys, "evaluate", run_dir, "--corpus", corpus, "--n-windows", "2", "--overwrite")
    assert code == 0, err


def test_trace_refuses_then_overwrites_and_verify_records_circuit(run_dir, capsys):
    args = ["trace", "-d", run_dir, "--prompt", "When Mary and John went to the store, John gave a drink to",
            "--target", " Mary", "--max-features", "3", "--verify"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    folder = run_dir / "circuits" / "custom"
    verify = json.loads((folder / "verify.json").read_text())
    assert verify["circuit_sha256"] == sha256_file(folder / "circuit.json")
    from sparsetrace.intervene.circuit_job import verify_is_current

    assert verify_is_current(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _refused(*cli(capsys, *args[:-1], "--max-features", "2")[::2])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing touched
    code, out, err = cli(capsys, *args[:-1], "--max-features", "2", "--overwrite")
    assert code == 0, err
    assert not (folder / "verify.json").exists()  # the old one described the replaced circuit
    # a circuit.json edited after verification: verify.json is no longer current
    code, out, err = cli(capsys, "verify", folder)
    assert code == 0 and verify_is_current(folder), err
    doc = json.loads((folder / "circuit.json").read_text())
    (folder / "circuit.json").write_text(json.dumps({**doc, "circuit": doc["circuit"][:1]}))
    assert not verify_is_current(folder)


def test_explain_report_train_refuse(run_dir, corpus, tmp_path, capsys):
    args = ["explain", run_dir, "--layer", "1", "--features", "random:2", "--n-tokens", "1000", "--no-verify"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    _refused(*cli(capsys, *args)[::2])
    code, out, err = cli(capsys, *args, "--overwrite")
    assert code == 0, err

    report = tmp_path / "report"
    assert cli(capsys, "report", run_dir, "--out", report)[0] == 0
    _refused(*cli(capsys, "report", run_dir, "--out", report)[::2])
    assert cli(capsys, "report", run_dir, "--out", report, "--overwrite")[0] == 0

    code, out, err = cli(capsys, "train", "--model", "tiny-llama", "--layers", "1", "--corpus", corpus,
                         "--n-tokens", "500", "--out", run_dir)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "--resume" in errors[0] and "--overwrite" in errors[0], err
    assert (run_dir / "L01_transcoder" / "weights.safetensors").is_file()
