"""`sparsetrace run` resumes: killed with SIGKILL in each of its stages, re-running the same command keeps the
stages that finished, runs the killed one again, and ends with the artifacts of an uninterrupted run.

The report's upstream panel is off: its time budget would make the report depend on the machine's speed.
One chain on tiny-llama: run 1 is killed in train (after its first checkpoints), run 2 resumes it and is killed in
evaluate, ... run 6 finishes. Each run i must skip the stages before the one killed in run i - 1 and run that one
again. The kill comes from a test hook (SPARSETRACE_TEST_KILL_IN=STAGE: the job sends itself SIGKILL part way
through the stage, in train after half the steps were checkpointed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetrace.job import STAGES
from sparsetrace.util.hashing import sha256_file

SCRIPT = """
import sys
from sparsetrace import job
job.PRESETS["test"] = job.Preset(layers=[1, 2], n_tokens=2000, epochs=1.0, eval_windows=2, dashboard_features=3,
    dashboard_tokens=800, circuit_prompts=2, graph_prompts=1, spearman_features=2, circuit_features=4,
    verify_labels=False, checkpoint_every=3, batch_size=128, upstream_seconds=0.0)
job.run_main_job(sys.argv[1], preset="test", model="tiny-llama", corpus=sys.argv[2], progress=False)
"""
# written anew by every run (wall times, which stages ran): not compared
VOLATILE = {"summary.json", "summary.txt"}
# wall-clock and memory measurements, and the hash of a circuit.json (which records its own wall times)
TIMING = re.compile(r"seconds|timings|_s$|^time|rss|^circuit_sha256$")


def _run(out: Path, corpus: Path, kill_in: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSETRACE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SPARSETRACE_TEST_KILL_IN", None)
    if kill_in:
        env["SPARSETRACE_TEST_KILL_IN"] = kill_in
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(corpus)], env=env, capture_output=True,
                          text=True, timeout=300)


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not {".checkpoints", ".job"} & set(p.parts) and p.name not in VOLATILE}


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _without_timings(value):
    """Wall-clock fields dropped; sha256 digests masked (the files they hash are compared themselves, and those
    that record a wall time differ by it)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not TIMING.search(str(k))}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    if isinstance(value, str) and SHA256.match(value):
        return "<sha256>"
    return value


def _first_difference(a, b, path="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True)) if (d := _first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b else f"{path}: {str(a)[:200]} != {str(b)[:200]}"


def _content(path: Path):
    """A JSON (or report .js) file's content without wall-clock fields; None for other files."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".js" and text.startswith("window."):
        text = text.split("=", 1)[1].strip().rstrip(";")
    elif path.suffix == ".js":
        text = re.sub(r"^[A-Z_]+\((\"[^\"]*\"),", "[\\1,", text.strip()).rstrip(";").rstrip(")") + "]"
    try:
        return _without_timings(json.loads(text))
    except ValueError:
        return None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = [
        "Once upon a time there was a little fox who lived in the woods near a river.",
        "Mary and John went to the store. John gave a drink to Mary because she was thirsty.",
        "In 1732 the war began, and it lasted until the year 1748 when peace returned.",
    ]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"{t} Story number {i}. " * 3 for i in range(60) for t in base))
    return path


def test_sigkill_in_each_stage_then_resume(tmp_path, corpus):
    out = tmp_path / "run"  # both runs in the same folder: the artifacts record their paths
    ref = _run(out, corpus)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["ran"] == list(STAGES)
    out.rename(tmp_path / "ref")
    previous = None
    for kill_in in [*STAGES, None]:
        proc = _run(out, corpus, kill_in)
        if kill_in is not None:
            assert proc.returncode == -signal.SIGKILL, (kill_in, proc.returncode, proc.stderr[-3000:])
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
        if previous is not None:
            assert "resuming the run in" in proc.stderr
            i = STAGES.index(previous)
            for n, stage in enumerate(STAGES[:i], 1):
                assert f"stage {n}/5 ({stage}): finished earlier with the same inputs, skipped" in proc.stderr, stage
            assert f"stage {i + 1}/5 ({previous}): finished earlier" not in proc.stderr
        if previous == "train":
            assert "resuming from its last checkpoint" in proc.stderr
        previous = kill_in
    ran = json.loads((out / "summary.json").read_text())["ran"]
    assert ran == ["report"], ran  # the last run ran only the stage the run before it was killed in

    want, got = _files(tmp_path / "ref"), _files(out)
    assert sorted(got) == sorted(want)
    differ = sorted(k for k in want if sha256_file(want[k]) != sha256_file(got[k]))
    # bitwise: the dictionaries (resumed from a checkpoint) and their metrics; the evaluation records its own wall
    # time (seconds_dictionaries), so eval.json is compared below without it, like every other JSON file
    assert not [k for k in differ if k.endswith(".safetensors") or "metrics" in k], differ
    for folder in (tmp_path / "ref", out):
        circuit = folder / "circuits" / "ioi"
        assert json.loads((circuit / "verify.json").read_text())["circuit_sha256"] == sha256_file(circuit / "circuit.json")
    # the rest differs at most in the wall-clock times it records
    for k in differ:
        a, b = _content(want[k]), _content(got[k])
        assert a is not None and a == b, (k, _first_difference(a, b))

    again = _run(out, corpus)  # a finished run: every stage is skipped
    assert again.returncode == 0 and json.loads((out / "summary.json").read_text())["ran"] == []


def test_other_settings_refused_and_overwrite_starts_over(tmp_path, corpus):
    from sparsetrace.errors import ConfigError
    from sparsetrace.job import _claim_folder

    out = tmp_path / "run"
    assert _claim_folder(out, {"preset": "a"}, overwrite=False) is False
    assert _claim_folder(out, {"preset": "a"}, overwrite=False) is True
    # nothing written yet (e.g. the model failed to load): other settings start anew
    assert _claim_folder(out, {"preset": "c"}, overwrite=False) is False
    assert _claim_folder(out, {"preset": "a"}, overwrite=False) is False
    (out / "train_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="other settings"):
        _claim_folder(out, {"preset": "b"}, overwrite=False)
    (out / "eval.json").write_text("{}")
    assert _claim_folder(out, {"preset": "b"}, overwrite=True) is False
    assert not (out / "eval.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        _claim_folder(other, {"preset": "a"}, overwrite=False)
