"""``sparsetrace export`` of a cross-layer transcoder to circuit-tracer's CLT layout (file names, tensor keys
and shapes as circuit-tracer 0.5.0's ``load_clt`` reads them), refusals, the run/CLT choice, and the graph
targets of ``export``. circuit-tracer itself is not needed here (bench/peers/check_circuit_tracer_export.py
--clt loads the export with it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from cli_runner import run_cli  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sparsetrace.dictionary.clt import CLTConfig, CrossLayerTranscoder, save_clt  # noqa: E402
from sparsetrace.dictionary.export import export_run  # noqa: E402
from sparsetrace.dictionary.io import save_dictionary  # noqa: E402
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402
from sparsetrace.errors import ConfigError, DictionaryFileError  # noqa: E402

L, D, F = 4, 32, 24
ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "tests" / "fixtures" / "peers" / "graph_sparsetrace_small.json"


def _clt(activation="jumprelu", seed=0) -> CrossLayerTranscoder:
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, activation=activation,
                    k=5 if activation == "topk" else None, model_id="tiny-llama")
    clt = CrossLayerTranscoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        clt.b_enc.copy_(0.3 * torch.randn(L, F, generator=g))
        clt.b_dec.copy_(torch.randn(L, D, generator=g))
        if clt.log_threshold is not None:
            clt.log_threshold.copy_((0.1 + 0.5 * torch.rand(L, F, generator=g)).log())
    return clt.eval()


def _clt_run(tmp: Path, clt: CrossLayerTranscoder, name="run") -> Path:
    save_clt(clt, tmp / name / "clt")
    return tmp / name


def _ct_clt(folder: Path, xs: list[torch.Tensor]):
    """circuit-tracer's CLT computation from the exported files, as its load_clt reads them: the layer count
    from the W_enc_* files, JumpReLU when threshold_0 exists, ``pre * (pre > threshold)``, decoder
    W_dec_{i}[:, j - i] writing to layer j, b_dec_{j} added to output j."""
    n = len(list(folder.glob("W_enc_*.safetensors")))
    enc = [load_file(str(folder / f"W_enc_{i}.safetensors")) for i in range(n)]
    dec = [load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(n)]
    feats = []
    for i, x in enumerate(xs):
        pre = torch.einsum("bd,fd->bf", x, enc[i][f"W_enc_{i}"]) + enc[i][f"b_enc_{i}"]
        thr = enc[i].get(f"threshold_{i}")
        feats.append(torch.relu(pre) if thr is None else pre * (pre > thr))
    outs = [enc[j][f"b_dec_{j}"] + sum(feats[i] @ dec[i][:, j - i] for i in range(j + 1)) for j in range(n)]
    return feats, outs


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_clt_layout(tmp_path, activation):
    clt = _clt(activation)
    run = _clt_run(tmp_path, clt)
    out = tmp_path / "ct"
    assert export_run(run, "circuit-tracer", out) == [out]
    want_files = {"config.yaml", "manifest.json"}
    want_files |= {f"W_enc_{i}.safetensors" for i in range(L)} | {f"W_dec_{i}.safetensors" for i in range(L)}
    assert {p.name for p in out.iterdir()} == want_files
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert cfg["sparsetrace"]["n_layers"] == L and cfg["sparsetrace"]["activation"] == activation
    for i in range(L):
        enc = load_file(str(out / f"W_enc_{i}.safetensors"))
        want = {f"W_enc_{i}": (F, D), f"b_enc_{i}": (F,), f"b_dec_{i}": (D,)}
        if activation == "jumprelu":
            want[f"threshold_{i}"] = (F,)
        assert {k: tuple(v.shape) for k, v in enc.items()} == want
        dec = load_file(str(out / f"W_dec_{i}.safetensors"))
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": (F, L - i, D)}
        assert all(v.dtype == torch.float32 for v in [*enc.values(), *dec.values()])
    g = torch.Generator().manual_seed(7)
    xs = [2 * torch.randn(40, D, generator=g) for _ in range(L)]
    feats, outs = _ct_clt(out, xs)
    with torch.no_grad():
        ours_f = [clt.encode(i, x) for i, x in enumerate(xs)]
        ours_y = clt.decode_all(ours_f)
    for i in range(L):
        assert (feats[i] != 0).any() and (feats[i] == 0).any()  # the check sees both firing and silent features
        torch.testing.assert_close(feats[i], ours_f[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[i], ours_y[i], atol=1e-5, rtol=1e-5)


def test_clt_refusals_and_choice(tmp_path):
    run = _clt_run(tmp_path, _clt("topk"), "topk")
    with pytest.raises(DictionaryFileError, match="TopK CLT"):
        export_run(run, "circuit-tracer", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="no CLT format"):
        export_run(_clt_run(tmp_path, _clt()), "saelens", tmp_path / "o")
    with pytest.raises(ConfigError, match="does not match the CLT"):
        export_run(tmp_path / "run", "circuit-tracer", tmp_path / "o", n_layers=L + 1)
    # a run with a CLT and a per-layer transcoder: circuit-tracer takes the CLT, saelens the transcoder
    both = _clt_run(tmp_path, _clt(), "both")
    cfg = DictionaryConfig(kind="transcoder", d_in=D, d_out=D, n_features=F, activation="relu", layer=1,
                           hookpoint_in="mlp_in", hookpoint_out="mlp_out", model_id="tiny-llama")
    save_dictionary(SparseDictionary(cfg, seed=0), both / "L01_transcoder")
    export_run(both, "circuit-tracer", tmp_path / "ct")
    assert (tmp_path / "ct" / f"W_dec_{L - 1}.safetensors").is_file()
    assert [p.name for p in export_run(both, "saelens", tmp_path / "sl")] == ["L01_transcoder"]
    # the CLT folder itself works as RUN
    export_run(both / "clt", "circuit-tracer", tmp_path / "ct2")
    assert (tmp_path / "ct2" / "W_enc_0.safetensors").is_file()


def _one_line_error(code, _out, err, msg):
    assert code != 0 and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and err.startswith("error:") and msg in err, err


def test_cli_clt(tmp_path, capsys):
    run = _clt_run(tmp_path, _clt())
    out = tmp_path / "ct"
    out.mkdir()  # an empty folder is used as it is
    code, stdout, err = run_cli(capsys, "export", run, "--to", "circuit-tracer", "--out", out)
    assert code == 0, err
    assert f"written: {out}" in stdout and (out / "W_enc_3.safetensors").is_file()
    before = (out / "W_enc_0.safetensors").read_bytes()
    _one_line_error(*run_cli(capsys, "export", run, "--to", "circuit-tracer", "--out", out),
                    "already exists; pass --overwrite")
    assert (out / "W_enc_0.safetensors").read_bytes() == before
    code, _, err = run_cli(capsys, "export", run, "--to", "circuit-tracer", "--out", out, "--overwrite")
    assert code == 0, err
    _one_line_error(*run_cli(capsys, "export", run, "--to", "circuit-tracr", "--out", tmp_path / "x"),
                    "--to 'circuit-tracr' is unknown")
    _one_line_error(*run_cli(capsys, "export", run, "--to", "neuronpedia", "--out", tmp_path / "x"),
                    "a graph.json takes")
    _one_line_error(*run_cli(capsys, "export", run, "--to", "sparsify", "--out", tmp_path / "x"), "no CLT format")
    topk = _clt_run(tmp_path, _clt("topk"), "topk")
    _one_line_error(*run_cli(capsys, "export", topk, "--to", "circuit-tracer", "--out", tmp_path / "x"),
                    "cannot export a TopK CLT")
    (tmp_path / "empty").mkdir()
    _one_line_error(*run_cli(capsys, "export", tmp_path / "empty", "--to", "circuit-tracer", "--out", tmp_path / "x"),
                    "no dictionaries found")
    assert not (tmp_path / "x").exists()


def test_cli_graph_targets(tmp_path, capsys):
    """`export GRAPH.json --to neuronpedia` and the `export-graph` alias: same file, same overwrite rule."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    code, _, err = run_cli(capsys, "export", GRAPH, "--to", "neuronpedia", "--out", a, "--slug", "s1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "export-graph", GRAPH, "--out", b, "--slug", "s1")
    assert code == 0, err
    assert json.loads(a.read_text()) == json.loads(b.read_text())
    assert json.loads(a.read_text())["metadata"]["slug"] == "s1"
    _one_line_error(*run_cli(capsys, "export-graph", GRAPH, "--out", b), "already exists; pass --overwrite")
    code, _, err = run_cli(capsys, "export-graph", GRAPH, "--out", b, "--overwrite")
    assert code == 0, err
    _one_line_error(*run_cli(capsys, "export", GRAPH, "--to", "pdf", "--out", tmp_path / "c.json"),
                    "--to 'pdf' is unknown for a graph.json")
    _one_line_error(*run_cli(capsys, "export", tmp_path / "missing.json", "--to", "neuronpedia", "--out",
                             tmp_path / "c.json"), "does not exist")
