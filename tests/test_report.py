"""Tests for the static HTML report builder (sparsetrace.report.html)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sparsetrace.errors import SparsetraceError
from sparsetrace.report.html import build_report

FIXTURE = Path(__file__).parent / "fixtures" / "report_run"
URL = re.compile(
    r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I
)


def load_js_payload(path: Path, prefix: str) -> object:
    text = path.read_text(encoding="utf-8").strip()
    assert text.startswith(prefix), text[:80]
    body = text[len(prefix) :].rstrip(";").rstrip()
    return json.loads(body)


def load_data(out: Path) -> dict:
    return load_js_payload(out / "data" / "report-data.js", "window.SPARSETRACE_DATA=")


def load_chunk(out: Path, rel: str) -> tuple[str, object]:
    text = (out / rel).read_text(encoding="utf-8").strip()
    m = re.fullmatch(r'SPARSETRACE_LOAD\(("[^"]*"),(.*)\);', text, re.S)
    assert m, text[:80]
    return json.loads(m.group(1)), json.loads(m.group(2))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    index = build_report([FIXTURE], out)
    return out, index


def test_files_exist(built):
    out, index = built
    assert index == out / "index.html" and index.is_file()
    for rel in ("assets/report.js", "assets/report.css", "assets/favicon.svg", "data/report-data.js"):
        assert (out / rel).is_file(), rel
    assert (out / "data/r0/circuit-0.js").is_file()
    assert (out / "data/r0/features-L03-c0.js").is_file()


def test_no_network_references(built):
    out, _ = built
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    for path in [out / "index.html", *out.glob("assets/*.js"), *out.glob("assets/*.css")]:
        text = path.read_text(encoding="utf-8")
        assert not URL.search(text), (path, URL.search(text))
    js = (out / "assets/report.js").read_text(encoding="utf-8")
    # data must be embedded as scripts: the report works from file://, where fetch/XHR are blocked
    assert "fetch(" not in js and "XMLHttpRequest" not in js and "import(" not in js
    assert 'type="module"' not in html


def test_html_references_scripts_and_css(built):
    out, _ = built
    html = (out / "index.html").read_text(encoding="utf-8")
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert (out / ref).is_file(), ref
    assert '<script src="data/report-data.js"></script>' in html
    assert html.index("data/report-data.js") < html.index("assets/report.js")


def test_viewer_is_split_into_ordered_classic_scripts(built):
    out, _ = built
    from sparsetrace.report.html import SCRIPTS

    html = (out / "index.html").read_text(encoding="utf-8")
    static = Path(__file__).parents[1] / "src" / "sparsetrace" / "report" / "static"
    assert sorted(p.name for p in static.glob("*.js")) == sorted(SCRIPTS)  # every script is loaded
    positions = [html.index(f'<script src="assets/{name}"></script>') for name in SCRIPTS]
    assert positions == sorted(positions) and html.index("data/report-data.js") < positions[0]
    for name in SCRIPTS:
        text = (out / "assets" / name).read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 700, name
        assert "fetch(" not in text and "XMLHttpRequest" not in text and "import(" not in text, name
        assert "window.ST" in text, name  # one shared namespace, no ES modules


def test_data_is_embedded(built):
    out, _ = built
    data = load_data(out)
    assert data["format"] == "sparsetrace-report/1"
    (run,) = data["runs"]
    assert run["run"]["model"] == "tiny-gpt2-synthetic"
    # training curves for both dictionaries
    names = sorted(d["name"] for d in run["dictionaries"])
    assert names == ["L01_transcoder", "L03_transcoder"]
    for d in run["dictionaries"]:
        assert len(d["train_log"]) == 41
        assert {"tokens", "loss", "l0", "lambda"} <= set(d["train_log"][0])
    # per-layer metrics, substitution curve
    assert [m["layer"] for m in run["metrics"]] == [1, 3]
    assert [s["n_layers"] for s in run["substitution"]] == [0, 1, 2]
    assert run["clean_ce"] == pytest.approx(3.1)
    # circuit with verification
    (circuit,) = run["circuits"]
    assert circuit["name"] == "ioi"
    assert circuit["verify"]["faithfulness"] == pytest.approx(0.787)
    assert circuit["summary"]["n_nodes"] == 28 and circuit["summary"]["n_links"] == 62
    key, graph = load_chunk(out, circuit["graph"]["src"])
    assert key == circuit["graph"]["key"]
    ids = {n["node_id"] for n in graph["nodes"]}
    assert "L3/F12@9" in ids and "LOGIT/5335@13" in ids
    assert all(lk["source"] in ids and lk["target"] in ids for lk in graph["links"])
    # features: index entries (incl. one without a dashboard) and chunked dashboards
    (layer,) = run["features"]
    assert layer["layer"] == 3
    assert [e["feature"] for e in layer["entries"]] == [12, 40, 77, 301]
    assert sorted(layer["chunk_of"]) == ["12", "40", "77"]
    key, dashboards = load_chunk(out, layer["chunks"]["0"])
    assert key == "r0/L3/c0"
    assert dashboards["12"]["label"] == "S-inhibition"
    assert dashboards["12"]["top_examples"][0]["tokens"]
    assert run["warnings"] == []


def test_only_eval_json_is_tolerated(tmp_path):
    run = tmp_path / "run_eval_only"
    run.mkdir()
    shutil.copy(FIXTURE / "eval.json", run / "eval.json")
    out = tmp_path / "out"
    index = build_report([run], out)
    assert index.is_file()
    (r,) = load_data(out)["runs"]
    assert r["run"] is None and r["dictionaries"] == [] and r["circuits"] == [] and r["features"] == []
    assert len(r["metrics"]) == 2 and len(r["substitution"]) == 3
    assert not (out / "data" / "r0").exists()


def test_empty_run_folder(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    index = build_report([run], tmp_path / "out")
    (r,) = load_data(tmp_path / "out")["runs"]
    assert index.is_file() and r["metrics"] == [] and r["has_eval"] is False


def test_corrupt_and_partial_files_become_warnings(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    (run / "eval.json").write_text("{not json", encoding="utf-8")
    (run / "L01_transcoder" / "train_log.jsonl").write_text(
        '{"step": 0, "loss": 1.0}\ngarbage\n{"step": 1, "loss": NaN}\n'
    )
    (run / "features" / "L03" / "f40.json").write_text("[]", encoding="utf-8")  # wrong type
    (run / "circuits" / "broken").mkdir()
    (run / "circuits" / "broken" / "graph.json").write_text('{"nodes": "x"}', encoding="utf-8")
    (run / "circuits" / "verify_only").mkdir()
    shutil.copy(
        FIXTURE / "circuits" / "ioi" / "verify.json", run / "circuits" / "verify_only" / "verify.json"
    )
    g = json.loads((run / "circuits" / "ioi" / "graph.json").read_text())
    g["links"].append({"source": "nope", "target": "L3/F12@9", "weight": 1.0})
    (run / "circuits" / "ioi" / "graph.json").write_text(json.dumps(g))
    out = tmp_path / "out"
    build_report([run], out)
    (r,) = load_data(out)["runs"]
    text = "\n".join(r["warnings"])
    assert "eval.json" in text and "train_log.jsonl" in text and "f40.json" in text
    assert "broken" in text and "ignored 1 malformed" in text
    # metrics fall back to each dictionary's metrics.json
    assert [m["layer"] for m in r["metrics"]] == [1, 3]
    log = next(d for d in r["dictionaries"] if d["name"] == "L01_transcoder")["train_log"]
    assert log == [{"step": 0.0, "loss": 1.0}, {"step": 1.0, "loss": None}]  # NaN becomes null
    names = [c["name"] for c in r["circuits"]]
    assert names == ["ioi", "verify_only"]
    assert r["circuits"][1]["graph"] is None
    assert "40" not in r["features"][0]["chunk_of"]  # unreadable dashboard skipped, index entry kept
    assert any(e["feature"] == 40 for e in r["features"][0]["entries"])
    # the data file is strict JSON (no NaN/Infinity)
    assert "NaN" not in (out / "data" / "report-data.js").read_text()


def test_multiple_runs_and_rebuild(tmp_path):
    a = tmp_path / "a" / "tc"
    b = tmp_path / "b" / "tc"
    shutil.copytree(FIXTURE, a)
    b.mkdir(parents=True)
    shutil.copy(FIXTURE / "eval.json", b / "eval.json")
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    keep = out / "data" / "mine.txt"
    keep.write_text("user file")  # a data folder we did not write is never wiped
    build_report([a, b], out)
    assert keep.is_file()
    runs = load_data(out)["runs"]
    assert [r["name"] for r in runs] == ["tc (0)", "tc (1)"]
    build_report([b], out)  # rebuild into the same folder: stale data files of the old build go away
    assert not (out / "data" / "r0" / "circuit-0.js").exists()
    assert len(load_data(out)["runs"]) == 1


def test_untrusted_text_cannot_break_out(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    p = run / "features" / "L03" / "f12.json"
    d = json.loads(p.read_text())
    d["label"] = "</script><script>alert(1)</script>"
    p.write_text(json.dumps(d))
    out = tmp_path / "out"
    build_report([run], out)
    for f in (out / "data").rglob("*.js"):
        text = f.read_text()
        assert "</script>" not in text and "<script" not in text


def test_bad_arguments(tmp_path):
    with pytest.raises(SparsetraceError, match="at least one run"):
        build_report([], tmp_path / "out")
    with pytest.raises(SparsetraceError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(SparsetraceError, match="must not be the run folder"):
        build_report([tmp_path], tmp_path)


# ------------------------------------------------------------------------------------------ inputs
def _stale_run(tmp_path: Path) -> Path:
    """The fixture with a circuit.json, a verify.json recording its hash, dictionary weights at layer 3
    and dashboards recording those weights' hash."""
    from sparsetrace.util.hashing import sha256_bytes

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    cdir = run / "circuits" / "ioi"
    circuit = b'{"format": "sparsetrace-circuit/1", "circuit": ["L3/F12@9"]}\n'
    (cdir / "circuit.json").write_bytes(circuit)
    v = json.loads((cdir / "verify.json").read_text())
    v["circuit_sha256"] = sha256_bytes(circuit)
    (cdir / "verify.json").write_text(json.dumps(v))
    weights = b"not really safetensors, only hashed here"
    (run / "L03_transcoder" / "weights.safetensors").write_bytes(weights)
    for f in (run / "features" / "L03").glob("f*.json"):
        d = json.loads(f.read_text())
        d["dictionary_sha256"] = sha256_bytes(weights)
        f.write_text(json.dumps(d))
    return run


def _states(out: Path) -> tuple[dict, dict]:
    (r,) = load_data(out)["runs"]
    (layer,) = r["features"]
    _, dashboards = load_chunk(out, layer["chunks"]["0"])
    return r["circuits"][0]["verify_status"], {f: d["dictionary_status"]["state"] for f, d in dashboards.items()}


def test_report_records_its_inputs_hashes(tmp_path):
    from sparsetrace.util.hashing import sha256_file

    run = _stale_run(tmp_path)
    out = tmp_path / "out"
    build_report([run], out, upstream=False)
    doc = json.loads((out / "inputs.json").read_text())
    assert doc["format"] == "sparsetrace-report-inputs/1"
    (entry,) = doc["runs"]
    files = entry["files"]
    for rel in (
        "L03_transcoder/weights.safetensors",
        "circuits/ioi/circuit.json",
        "circuits/ioi/verify.json",
        "circuits/ioi/graph.json",
        "features/L03/f12.json",
        "features/L03/index.json",
        "eval.json",
        "run.json",
    ):
        assert files[rel] == sha256_file(run / rel), rel
    assert load_data(out)["runs"][0]["n_inputs"] == len(files)
    verify, dash = _states(out)
    assert verify["state"] == "current" and set(dash.values()) == {"current"}


def test_stale_verification_is_flagged(tmp_path):
    run = _stale_run(tmp_path)
    cjson = run / "circuits" / "ioi" / "circuit.json"
    cjson.write_bytes(cjson.read_bytes().replace(b"L3/F12@9", b"L3/F40@13"))  # the circuit changed
    build_report([run], tmp_path / "a", upstream=False)
    verify, _ = _states(tmp_path / "a")
    assert verify["state"] == "stale" and "changed after it was verified" in verify["reason"]
    cjson.unlink()  # ... or is gone
    build_report([run], tmp_path / "b", upstream=False)
    verify, _ = _states(tmp_path / "b")
    assert verify["state"] == "stale" and "no circuit.json" in verify["reason"]
    build_report([FIXTURE], tmp_path / "c", upstream=False)  # an old verify.json records nothing
    verify, _ = _states(tmp_path / "c")
    assert verify["state"] == "unrecorded"


def test_stale_dashboards_are_flagged(tmp_path):
    run = _stale_run(tmp_path)
    (run / "L03_transcoder" / "weights.safetensors").write_bytes(b"retrained: other weights")
    out = tmp_path / "out"
    build_report([run], out, upstream=False)
    _, dash = _states(out)
    assert set(dash.values()) == {"stale"}
    (r,) = load_data(out)["runs"]
    layer = r["features"][0]
    assert layer["dashboard_states"] == {"stale": 3} and "changed after the dashboard" in layer["stale_reason"]
    assert [e.get("stale", False) for e in layer["entries"]] == [True, True, True, False]  # F301: no dashboard
    (run / "L03_transcoder" / "weights.safetensors").unlink()  # nothing to compare with
    build_report([run], tmp_path / "b", upstream=False)
    assert set(_states(tmp_path / "b")[1].values()) == {"unchecked"}


# ------------------------------------------------------------------------------------------ upstream
def upstream_run(base: Path) -> Path:
    """The fixture run with real (random) transcoder weights for tiny-llama at layers 1 and 3."""
    import torch

    from sparsetrace.dictionary.io import save_dictionary
    from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary

    run = base / "up_run"
    shutil.copytree(FIXTURE, run)
    for layer in (1, 3):
        cfg = DictionaryConfig(kind="transcoder", d_in=64, d_out=64, n_features=512, layer=layer,
                               model_id="tiny-llama")
        d = SparseDictionary(cfg, seed=layer)
        with torch.no_grad():
            d.W_enc.mul_(torch.linspace(0.5, 2.0, 512)[:, None])  # not all rows of equal norm
        tmp = save_dictionary(d, base / f"dict{layer}")
        for name in ("weights.safetensors", "config.json"):
            shutil.copy(tmp / name, run / f"L{layer:02d}_transcoder" / name)
    return run


def test_upstream_panel_matches_weight_only_attribution(tmp_path, tiny_llama):
    import torch

    from sparsetrace.attribute import weights as W
    from sparsetrace.dictionary.load import load_dictionary

    run = upstream_run(tmp_path)
    out = tmp_path / "out"
    build_report([run], out)
    (r,) = load_data(out)["runs"]
    assert r["warnings"] == []
    _, dashboards = load_chunk(out, r["features"][0]["chunks"]["0"])
    lm = tiny_llama
    src = load_dictionary(run / "L01_transcoder")
    tgt = load_dictionary(run / "L03_transcoder")
    for f, dash in dashboards.items():
        panel = dash["upstream"]
        f = int(f)
        assert panel["n_sources"] == 1
        assert [t for t, _ in panel["deembedding"]] == [t for t, _ in W.feature_input_tokens(lm, tgt, f, k=6)]
        rows = panel["features"]
        assert len(rows) == 8 and all(row["layer"] == 1 for row in rows)
        mags = [abs(row["weight"]) for row in rows]
        assert mags == sorted(mags, reverse=True)
        # every candidate path scored by the attribute package's own functions: the panel keeps the top 8
        direct = W.virtual_weights(src, tgt, f, lm=lm)
        scores = {("direct", i): float(direct[i]) for i in range(512)}
        for a in (2, 3):  # attention layers between the layer-1 write and the layer-3 read
            ov = W.ov_virtual_weights(lm, a, src, tgt, f)
            for h in range(ov.shape[0]):
                scores.update({(f"L{a} attention head {h} (OV)", i): float(ov[h, i]) for i in range(512)})
        best = sorted(scores.items(), key=lambda kv: -abs(kv[1]))[:8]
        assert [(row["path"], row["feature"]) for row in rows] == [k for k, _ in best]
        for row, (_, w) in zip(rows, best, strict=True):
            assert row["weight"] == pytest.approx(w, rel=1e-4, abs=1e-6)
            assert row["deembedding"] == [
                [t, pytest.approx(s, abs=1e-3)] for t, s in W.feature_input_tokens(lm, src, row["feature"], k=6)
            ]
        assert torch.isfinite(torch.tensor(mags)).all()


def test_upstream_panel_is_bounded_and_optional(tmp_path):
    run = upstream_run(tmp_path)
    build_report([run], tmp_path / "none", upstream_budget_s=0.0)  # no time: no panel, a warning
    (r,) = load_data(tmp_path / "none")["runs"]
    assert any("within its 0 s budget" in w for w in r["warnings"])
    _, dashboards = load_chunk(tmp_path / "none", r["features"][0]["chunks"]["0"])
    assert all(d["upstream"] is None for d in dashboards.values())
    build_report([run], tmp_path / "off", upstream=False)
    (r,) = load_data(tmp_path / "off")["runs"]
    _, dashboards = load_chunk(tmp_path / "off", r["features"][0]["chunks"]["0"])
    assert r["warnings"] == [] and all("upstream" not in d for d in dashboards.values())
    for name in ("L01_transcoder", "L03_transcoder"):
        cfg = json.loads((run / name / "config.json").read_text())
        cfg["model_id"] = "no-such-model-here"
        (run / name / "config.json").write_text(json.dumps(cfg))
    build_report([run], tmp_path / "bad")  # the model cannot be loaded: a warning, the report still builds
    (r,) = load_data(tmp_path / "bad")["runs"]
    assert any("cannot load model 'no-such-model-here'" in w for w in r["warnings"])


# ------------------------------------------------------------------------------------------ Chromium rule
@pytest.mark.parametrize("ci", ["true", ""])
def test_browser_tests_fail_under_ci_without_chromium(ci, tmp_path):
    """With no browser, tests/test_browser.py fails under CI=true and skips (with its reason) elsewhere."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CI": ci, "SPARSETRACE_CHROMIUM": str(tmp_path / "no-chromium")}
    test_file = Path(__file__).parent / "test_browser.py"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(test_file)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = res.stdout + res.stderr
    if ci:
        assert res.returncode != 0 and "CI=true and" in out and "no-chromium not found" in out
        assert " passed" not in out and "skipped" not in out
    else:
        assert res.returncode == 0 and "skipped" in out and "no-chromium not found" in out
        assert "browser tests SKIPPED" in out  # the loud line in the warnings summary
