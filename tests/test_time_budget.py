"""--time-budget / --snapshot-at: the schedule follows elapsed time, the run stops and saves, snapshots load."""

import json

import pytest
import torch

from sparsetrace.errors import ConfigError
from sparsetrace.train.budget import WallClock, schedule_factor
from sparsetrace.train.config import TrainConfig
from sparsetrace.train.pipeline import run_training


@pytest.fixture()
def corpus_file(tmp_path, texts):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(texts))
    return p


def _cfg(corpus_file, **kw):
    # epochs far beyond what the budget allows: n_tokens x epochs is only an upper bound here
    base = dict(model="tiny-llama", layers=[1], kind="transcoder", corpus=str(corpus_file), context=32,
                n_tokens=2000, epochs=10_000.0, batch_size=64, expansion=4, target_l0=8.0, log_every=5,
                resample_every=50)
    base.update(kw)
    return TrainConfig(**base)


class FakeTime:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_schedule_factor_shape():
    w, dcy = 0.1, 0.2
    ps = [i / 200 for i in range(201)]
    f = [schedule_factor(p, w, dcy) for p in ps]
    warm = [x for p, x in zip(ps, f, strict=True) if p < w]
    assert all(b > a for a, b in zip(warm, warm[1:], strict=False))  # rising during the warm-up
    assert all(x == 1.0 for p, x in zip(ps, f, strict=True) if w <= p < 1 - dcy)
    decay = [x for p, x in zip(ps, f, strict=True) if p >= 1 - dcy]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))  # falling during the decay
    assert f[-1] == 0.0 and 0 < f[0] < 0.1


def test_wall_clock_progress_spent_and_snapshots(corpus_file):
    now = FakeTime()
    clock = WallClock(_cfg(corpus_file, time_budget=1.0, snapshot_at=[0.4, 0.75]), now=now)
    now.t += 20  # loading and harvesting: before the schedule starts
    clock.begin_training()
    assert clock.progress() == 0.0 and not clock.spent() and clock.due() == []
    now.t += 10  # 30 s of 60: 10 of the 40 s of training time
    assert clock.progress() == pytest.approx(0.25)
    assert clock.due() == [0.4] and clock.due() == []
    now.t += 30
    assert clock.spent() and clock.progress() == 1.0 and clock.due() == [0.75]
    free = WallClock(_cfg(corpus_file), now=now)
    assert free.progress() is None and not free.spent()


def test_lr_follows_time_not_steps(tiny_llama, corpus_file):
    from sparsetrace.train.trainer import LayerTrainer

    tcfg = _cfg(corpus_file, time_budget=1.0)
    tr = LayerTrainer(tcfg, 1, tiny_llama.d_model, "tiny", 1.0, 1.0)
    tr.progress = 0.5
    assert tr.lr_at(0) == tr.lr_at(10**6) == tcfg.lr  # mid-run: the step number does not matter
    tr.progress = 0.99
    assert tr.lr_at(0) < 0.1 * tcfg.lr  # end of the budget: decayed, however few steps were taken


def test_time_budget_stops_saves_and_snapshots(tmp_path, corpus_file, tiny_llama):
    from sparsetrace.dictionary.load import load_dictionary

    tcfg = _cfg(corpus_file, time_budget=0.05, snapshot_at=[0.02])  # 3 s, a snapshot at 1.2 s
    run = tmp_path / "run"
    info = run_training(tcfg, run, lm=tiny_llama, progress=False, cache_dir=tmp_path / "c")
    assert info["stopped_by"] == "time budget"
    assert 0 < info["steps"] < tcfg.total_steps
    assert info["tokens_trained"] == info["steps"] * tcfg.batch_size
    assert info["seconds_total"] >= 3.0 - 0.1  # rounded to 0.1 s
    saved = json.loads((run / "run.json").read_text())
    assert saved["stopped_by"] == "time budget" and saved["time_budget_min"] == 0.05
    rows = [json.loads(x) for x in (run / "L01_transcoder" / "train_log.jsonl").open()]
    assert max(r["lr"] for r in rows) == pytest.approx(tcfg.lr)  # reached the constant phase
    assert rows[-1]["lr"] < 0.5 * tcfg.lr  # and decayed by the end of the budget
    assert not (run / ".checkpoints" / "L01_transcoder").exists()
    final = load_dictionary(run / "L01_transcoder")
    snap_dir = run / "snapshots" / "0.02min"
    snap = json.loads((snap_dir / "snapshot.json").read_text())
    assert 0 < snap["steps"] < info["steps"] and snap["elapsed_s"] >= 0.02 * 60
    early = load_dictionary(snap_dir / "L01_transcoder")
    assert early.cfg.input_scale == pytest.approx(final.cfg.input_scale)  # normalisation folded in both
    assert not torch.equal(early.W_dec, final.W_dec)
    with pytest.raises(ConfigError, match="cannot be resumed"):
        run_training(tcfg, run, lm=tiny_llama, progress=False, cache_dir=tmp_path / "c", resume=True)


def test_bad_clock_options(corpus_file):
    with pytest.raises(ConfigError, match="--time-budget"):
        _cfg(corpus_file, time_budget=0).validate()
    with pytest.raises(ConfigError, match="--snapshot-at"):
        _cfg(corpus_file, time_budget=2.0, snapshot_at=[2.0]).validate()
    with pytest.raises(ConfigError, match="--snapshot-at"):
        _cfg(corpus_file, snapshot_at=[-1.0]).validate()
    with pytest.raises(ConfigError, match="clt"):
        _cfg(corpus_file, kind="clt", layers=[0, 1], time_budget=1.0).validate()
