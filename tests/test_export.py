"""``sparsetrace export``: circuit-tracer's transcoder-set layout, SAELens / sparsify folders per dictionary,
refusals. On the tiny test model ``tiny-llama`` (d_model 64, 4 layers); circuit-tracer itself is not needed
here (bench/peers/check_circuit_tracer_export.py loads the export with it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402  (PyYAML: a dependency of transformers / huggingface_hub, and of circuit-tracer)
from safetensors.torch import load_file  # noqa: E402

from sparsetrace.dictionary.export import export_run  # noqa: E402
from sparsetrace.dictionary.export_circuit_tracer import write_config_yaml  # noqa: E402
from sparsetrace.dictionary.io import save_dictionary  # noqa: E402
from sparsetrace.dictionary.load import load_dictionary  # noqa: E402
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402
from sparsetrace.errors import ConfigError, DictionaryFileError  # noqa: E402

D, N_LAYERS, MODEL = 64, 4, "tiny-llama"
ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "tests" / "fixtures" / "peers" / "graph_sparsetrace_small.json"


def _dict(kind="transcoder", activation="relu", layer=1, n=96, seed=0, hookpoint=None) -> SparseDictionary:
    hp = (hookpoint or "resid_post",) * 2 if kind == "sae" else ("mlp_in", "mlp_out")
    cfg = DictionaryConfig(kind=kind, d_in=D, d_out=D, n_features=n, activation=activation,
                           k=6 if activation in ("topk", "batchtopk") else None, layer=layer,
                           hookpoint_in=hp[0], hookpoint_out=hp[1], model_id=MODEL, input_scale=0.37,
                           output_scale=1.9)
    d = SparseDictionary(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        d.b_enc.copy_(0.2 * torch.randn(n, generator=g) - 0.1)
        d.b_dec.copy_(0.5 * torch.randn(D, generator=g))
        if d.W_skip is not None:
            d.W_skip.copy_(0.05 * torch.randn(D, D, generator=g))
        if d.log_threshold is not None:
            d.log_threshold.copy_((0.05 + 0.2 * torch.rand(n, generator=g)).log())
        if d.batch_threshold is not None:
            d.batch_threshold.fill_(0.12)
    return d.eval()


def _run_folder(tmp: Path, dicts: list[SparseDictionary], name="run") -> Path:
    run = tmp / name
    for d in dicts:
        save_dictionary(d, run / f"L{d.cfg.layer:02d}_{d.cfg.kind}")
    return run


def _x(seed=3, rows=32) -> torch.Tensor:
    return 2 * torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def _ct_forward(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's SingleLayerTranscoder encode/decode, written from its documented formula."""
    pre = F.linear(x, t["W_enc"], t["b_enc"])
    thr = t.get("activation_function.threshold")
    f = F.relu(pre) if thr is None else pre * (pre > thr)
    y = f @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        y = y + x @ t["W_skip"].T
    return f, y


# ------------------------------------------------------------------------------------ circuit-tracer
def test_circuit_tracer_layout(tmp_path):
    """Files, keys, shapes, config.yaml; each layer file computes our features and outputs (folded
    normalisation), narrower dictionaries are padded with silent features, untrained layers are zero."""
    dicts = [_dict(activation="relu", layer=1, n=96, seed=1), _dict(activation="jumprelu", layer=3, n=80, seed=2)]
    run = _run_folder(tmp_path, dicts)
    out = tmp_path / "ct"
    assert export_run(run, "circuit-tracer", out) == [out]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.yaml", "manifest.json"] + [f"layer_{i}.safetensors" for i in range(N_LAYERS)])
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert cfg["sparsetrace"]["trained_layers"] == [1, 3] and cfg["sparsetrace"]["zero_layers"] == [0, 2]
    assert cfg["sparsetrace"]["n_layers"] == N_LAYERS and cfg["sparsetrace"]["d_transcoder"] == 96
    x = _x()
    for i in range(N_LAYERS):
        t = load_file(str(out / f"layer_{i}.safetensors"))
        want = {"W_enc": (96, D), "b_enc": (96,), "W_dec": (96, D), "b_dec": (D,)}
        if i == 3:
            want["activation_function.threshold"] = (96,)
        assert {k: tuple(v.shape) for k, v in t.items()} == want, i
        assert all(v.dtype == torch.float32 for v in t.values())
        f, y = _ct_forward(t, x)
        if i in (0, 2):
            assert not f.any() and not y.any()
            continue
        d = dicts[0] if i == 1 else dicts[1]
        with torch.no_grad():
            ours_f, ours_y = d.features(x), d(x)
        n = d.cfg.n_features
        assert not f[:, n:].any()  # padding never fires
        assert (f[:, :n] != 0).any()
        torch.testing.assert_close(f[:, :n], ours_f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, ours_y, atol=1e-5, rtol=1e-5)


def test_circuit_tracer_skip_and_batchtopk(tmp_path):
    dicts = [_dict("skip_transcoder", "relu", layer=0, seed=4), _dict("transcoder", "batchtopk", layer=2, seed=5)]
    out = tmp_path / "ct"
    export_run(_run_folder(tmp_path, dicts), "circuit-tracer", out, n_layers=N_LAYERS)
    x = _x(9)
    for i in range(N_LAYERS):
        t = load_file(str(out / f"layer_{i}.safetensors"))
        assert t["W_skip"].shape == (D, D)  # one layer with a skip: every layer gets one (zeros elsewhere)
        if i in (1, 3):
            assert not t["W_skip"].any()
    for i, d in ((0, dicts[0]), (2, dicts[1])):
        f, y = _ct_forward(load_file(str(out / f"layer_{i}.safetensors")), x)
        with torch.no_grad():
            torch.testing.assert_close(f, d.features(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y, d(x), atol=1e-5, rtol=1e-5)
    thr = load_file(str(out / "layer_2.safetensors"))["activation_function.threshold"]
    assert torch.all(thr == thr[0]) and float(thr[0]) == pytest.approx(0.12)


@pytest.mark.parametrize(("dicts", "match"), [
    (lambda: [_dict(activation="topk")], "TopK"),
    (lambda: [_dict("sae", "relu", hookpoint="resid_post")], "transcoders mlp_in -> mlp_out"),
])
def test_circuit_tracer_refusals(tmp_path, dicts, match):
    out = tmp_path / "ct"
    with pytest.raises(DictionaryFileError, match=match):
        export_run(_run_folder(tmp_path, dicts()), "circuit-tracer", out, n_layers=N_LAYERS)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ct")]


def test_circuit_tracer_checks_the_model(tmp_path):
    run = _run_folder(tmp_path, [_dict(layer=1)])
    with pytest.raises(DictionaryFileError, match="out of range"):
        export_run(run, "circuit-tracer", tmp_path / "a", n_layers=1)
    with pytest.raises(ConfigError, match="--n-layers"):
        export_run(run, "circuit-tracer", tmp_path / "b", n_layers=0)
    far = _run_folder(tmp_path, [_dict(layer=5)], name="far")  # tiny-llama (loaded: the recorded model) has 4
    with pytest.raises(DictionaryFileError, match="out of range for 'tiny-llama'"):
        export_run(far, "circuit-tracer", tmp_path / "c")


def test_config_yaml_writer_quotes():
    text = write_config_yaml({"a": "it's: a [test]", "b": None, "c": True, "d": [1, "x"], "e": {"f": 2.5}})
    assert yaml.safe_load(text) == {"a": "it's: a [test]", "b": None, "c": True, "d": [1, "x"], "e": {"f": 2.5}}


# ------------------------------------------------------------------------------------ saelens / sparsify
def test_saelens_round_trip(tmp_path):
    dicts = [_dict("transcoder", "relu", layer=1, seed=6), _dict("skip_transcoder", "jumprelu", layer=2, seed=7),
             _dict("sae", "topk", layer=3, seed=8, hookpoint="resid_pre")]
    run = _run_folder(tmp_path, dicts)
    written = export_run(run, "saelens", tmp_path / "sl")
    assert [w.name for w in written] == ["L01_transcoder", "L02_skip_transcoder", "L03_sae"]
    x = _x(5)
    for w, d in zip(written, dicts, strict=True):
        assert (w / "cfg.json").is_file() and (w / "sae_weights.safetensors").is_file()
        back = load_dictionary(w)
        assert (back.cfg.kind, back.cfg.layer, back.cfg.model_id) == (d.cfg.kind, d.cfg.layer, MODEL)
        with torch.no_grad():
            torch.testing.assert_close(back(x), d(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(back.features(x), d.features(x), atol=1e-5, rtol=1e-5)


def test_sparsify_round_trip(tmp_path):
    dicts = [_dict("transcoder", "topk", layer=1, seed=9), _dict("sae", "topk", layer=2, seed=10)]
    written = export_run(_run_folder(tmp_path, dicts), "sparsify", tmp_path / "sp")
    assert [w.name for w in written] == ["layers.1.mlp", "layers.2"]
    assert json.loads((tmp_path / "sp" / "config.json").read_text())["model"] == MODEL
    x = _x(6)
    for w, d in zip(written, dicts, strict=True):
        back = load_dictionary(w)
        assert (back.cfg.kind, back.cfg.layer, back.cfg.model_id, back.cfg.hookpoint_out) == (
            d.cfg.kind, d.cfg.layer, MODEL, d.cfg.hookpoint_out)
        with torch.no_grad():
            torch.testing.assert_close(back(x), d(x), atol=1e-5, rtol=1e-5)


def test_sparsify_refuses_relu(tmp_path):
    with pytest.raises(DictionaryFileError, match="TopK"):
        export_run(_run_folder(tmp_path, [_dict(activation="relu")]), "sparsify", tmp_path / "sp")
    assert not (tmp_path / "sp").exists()


# ------------------------------------------------------------------------------------ overwriting
def test_overwrite(tmp_path):
    run = _run_folder(tmp_path, [_dict("sae", "topk", layer=1, seed=11)])
    out = tmp_path / "out"
    export_run(run, "saelens", out)
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_run(run, "sparsify", out)
    assert (out / "L01_sae" / "cfg.json").is_file()  # untouched
    (out / "stale.txt").write_text("old")
    export_run(run, "sparsify", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "layers.1"]  # nothing stale left
    for bad in (run, tmp_path, run / "L01_sae"):  # the run, a folder holding it, one of its dictionaries
        with pytest.raises(ConfigError, match="is the input"):
            export_run(run, "saelens", bad, overwrite=True)
    assert (run / "L01_sae" / "weights.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_run(run, "saelens", tmp_path / "file", overwrite=True)


def test_bad_inputs_library(tmp_path):
    run = _run_folder(tmp_path, [_dict()])
    with pytest.raises(ConfigError, match="--to 'neuronpedia' is unknown"):
        export_run(run, "neuronpedia", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryFileError, match="no dictionaries found"):
        export_run(tmp_path / "empty", "saelens", tmp_path / "o")
    with pytest.raises(DictionaryFileError, match="does not exist"):
        export_run(tmp_path / "nope", "saelens", tmp_path / "o")


# ------------------------------------------------------------------------------------ CLI
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPARSETRACE_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sparsetrace.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_cli(tmp_path):
    run = _run_folder(tmp_path, [_dict(layer=2)])
    ok = _cli("export", str(run), "--to", "circuit-tracer", "--out", str(tmp_path / "ct"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert f"written: {tmp_path / 'ct'}" in ok.stdout
    assert len(list((tmp_path / "ct").glob("layer_*.safetensors"))) == N_LAYERS  # the model's 4 layers
    (tmp_path / "empty").mkdir()
    cases = [
        (["--to", "neuronpedia", "--out", "x"], "--to 'neuronpedia' is unknown"),
        (["--to", "circuit-tracer", "--out", str(tmp_path / "ct")], "already exists; pass --overwrite"),
        (["--to", "sparsify", "--out", "y"], "only TopK"),
        (["--to", "saelens", "--out", str(run), "--overwrite"], "is the input"),
    ]
    for extra, msg in cases:
        r = _cli("export", str(run), *extra, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and msg in r.stderr, r.stderr
    r = _cli("export", str(tmp_path / "empty"), "--to", "saelens", "--out", "z", cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "no dictionaries" in r.stderr, r.stderr


def test_cli_graph(tmp_path):
    """A graph.json goes to the graph exporter (what ``export-graph`` does), with the same overwrite rule."""
    out = tmp_path / "g.json"
    r = _cli("export", str(GRAPH), "--to", "circuit-tracer", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    g = json.loads(out.read_text())
    assert g["nodes"] and "links" in g and "metadata" in g
    r = _cli("export", str(GRAPH), "--to", "circuit-tracer", "--out", str(out), cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "--overwrite" in r.stderr
    r = _cli("export", str(GRAPH), "--to", "saelens", "--out", str(tmp_path / "h.json"), cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "cannot take a graph" in r.stderr
