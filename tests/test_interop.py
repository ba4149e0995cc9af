"""Interop with SAELens / sparsify dictionary folders and circuit-tracer / Neuronpedia graph JSON.

The fixtures under tests/fixtures/peers were written by the real peer packages (see each
SOURCE.txt and bench/peers/make_fixtures.py); these tests need none of them installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sparsetrace.attribute.export import (  # noqa: E402
    GraphFormatError,
    cantor,
    export_graph_file,
    from_neuronpedia,
    to_neuronpedia,
    uncantor,
)
from sparsetrace.dictionary import interop  # noqa: E402
from sparsetrace.dictionary.interop import (  # noqa: E402
    export_saelens,
    export_sparsify,
    load_saelens,
    load_sparsify,
    parse_hf_module,
    parse_tl_hook,
)
from sparsetrace.dictionary.load import load_dictionary  # noqa: E402
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402
from sparsetrace.errors import DictionaryFileError  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "peers"

# fixture -> (kind, activation, k, layer, hookpoint_in, hookpoint_out, model_id, d_out)
EXPECTED = {
    "saelens_standard": ("sae", "relu", None, 6, "resid_pre", "resid_pre", "gpt2", 64),
    "saelens_topk": ("sae", "topk", 8, 4, "resid_post", "resid_post", "gpt2", 64),
    "saelens_jumprelu": ("sae", "jumprelu", None, 2, "mlp_out", "mlp_out", "gemma-2-2b", 64),
    "saelens_transcoder": ("transcoder", "relu", None, 3, "mlp_in", "mlp_out", "gpt2", 48),
    "saelens_skip_transcoder": ("skip_transcoder", "relu", None, 1, "mlp_in", "mlp_out", "gpt2", 64),
    "saelens_jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu", None, 5, "mlp_in", "mlp_out", "gemma-2-2b", 64),
    "sparsify_topk/layers.6": ("sae", "topk", 8, 6, "resid_post", "resid_post", "EleutherAI/pythia-70m", 64),
    "sparsify_transcoder/layers.3.mlp": ("transcoder", "topk", 8, 3, "mlp_in", "mlp_out", "HuggingFaceTB/SmolLM2-135M", 64),
    "sparsify_skip_transcoder/layers.2.mlp": (
        "skip_transcoder", "topk", 8, 2, "mlp_in", "mlp_out", "HuggingFaceTB/SmolLM2-135M", 64),
    # trained by the peers' own training code (SAETrainer.step / sparsify's SignSGD loop), not just saved
    "saelens_trained": ("sae", "relu", None, 6, "resid_pre", "resid_pre", "gpt2", 64),
    "sparsify_trained/layers.4": ("sae", "topk", 8, 4, "resid_post", "resid_post", "EleutherAI/pythia-70m", 64),
}
TOL = dict(atol=1e-5, rtol=1e-5)


def _run(d: SparseDictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return d(x), d.features(x)


def test_every_fixture_is_listed():
    found = {str(p.parent.relative_to(FIX)) for p in FIX.rglob("reference.safetensors")}
    assert found == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_matches_peer_output(name):
    folder = FIX / name
    d = load_dictionary(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    y, f = _run(d, ref["x"])
    torch.testing.assert_close(y, ref["y"], **TOL)
    torch.testing.assert_close(f, ref["features"], **TOL)
    kind, act, k, layer, hp_in, hp_out, model_id, d_out = EXPECTED[name]
    c = d.cfg
    assert (c.kind, c.activation, c.k, c.layer, c.hookpoint_in, c.hookpoint_out, c.model_id, c.d_out) == (
        kind, act, k, layer, hp_in, hp_out, model_id, d_out)
    assert (c.d_in, c.n_features) == (64, 256)


def test_detect():
    assert interop.detect(FIX / "saelens_standard") is load_saelens
    assert interop.detect(FIX / "sparsify_topk" / "layers.6") is load_sparsify
    assert interop.detect(FIX / "sparsify_topk") is None  # a run folder, not a dictionary
    assert interop.detect(FIX / "saelens_standard" / "cfg.json") is None
    assert interop.detect(FIX / "nope") is None


def test_load_chooses_the_format(tmp_path):
    from sparsetrace.dictionary.io import save_dictionary
    from sparsetrace.dictionary.load import detect_format

    assert detect_format(FIX / "saelens_standard") == "saelens"
    assert detect_format(FIX / "sparsify_topk" / "layers.6") == "sparsify"
    assert detect_format(FIX / "sparsify_topk") is None
    graph = FIX / "circuit_tracer_graph" / "graph.json"
    assert detect_format(graph) == "circuit-tracer"
    with pytest.raises(DictionaryFileError, match="attribution graph"):
        load_dictionary(graph)
    cfg = DictionaryConfig(kind="sae", d_in=8, d_out=8, n_features=16, activation="relu", layer=0)
    save_dictionary(SparseDictionary(cfg), tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "sparsetrace"
    assert load_dictionary(tmp_path / "ours").cfg.n_features == 16


def test_io_and_interop_do_not_import_each_other():
    import ast

    src = Path(interop.__file__).parent

    def imported(name: str) -> set[str]:
        tree = ast.parse((src / name).read_text(encoding="utf-8"))
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                out.add(node.module or "")
                out.update(a.name for a in node.names)
        return out

    assert not {"interop", "load"} & imported("io.py")
    assert "load" not in imported("interop.py")


def test_unrecognised_folder_is_refused(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert interop.detect(tmp_path) is None
    with pytest.raises(DictionaryFileError, match="no weights.safetensors"):
        load_dictionary(tmp_path)


def test_hook_name_parsing():
    assert parse_tl_hook("blocks.6.hook_resid_pre") == (6, "resid_pre")
    assert parse_tl_hook("blocks.11.ln2.hook_normalized") == (11, "mlp_in")
    assert parse_tl_hook("blocks.2.hook_resid_mid") == (2, "blocks.2.hook_resid_mid")
    assert parse_tl_hook("hook_embed") == (None, "hook_embed")
    assert parse_hf_module("layers.6") == (6, "resid_pre", "resid_post")
    assert parse_hf_module("gpt_neox.layers.3.mlp") == (3, "mlp_in", "mlp_out")
    assert parse_hf_module("model.layers.2.self_attn")[::2] == (2, "attn_out")
    assert parse_hf_module("embed_tokens") == (None, "embed_tokens", "embed_tokens")


# --------------------------------------------------------------------------- SAELens variants
def _copy(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name.replace("/", "_")
    shutil.copytree(FIX / name, dest)
    return dest


def _edit_cfg(folder: Path, **changes) -> dict:
    cfg = json.loads((folder / "cfg.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def test_saelens_pre_v6_config(tmp_path):
    folder = _copy("saelens_standard", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg.pop("metadata")
    cfg.pop("architecture")
    cfg.update(hook_point=meta["hook_name"], model_name="gpt2-small", activation_fn_str="relu")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    d = load_dictionary(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    torch.testing.assert_close(_run(d, ref["x"])[0], ref["y"], **TOL)
    assert (d.cfg.layer, d.cfg.hookpoint_in, d.cfg.model_id) == (6, "resid_pre", "gpt2-small")


def test_saelens_log_threshold(tmp_path):
    folder = _copy("saelens_jumprelu", tmp_path)
    t = load_file(str(folder / "sae_weights.safetensors"))
    t["log_threshold"] = t.pop("threshold").log()
    save_file(t, str(folder / "sae_weights.safetensors"))
    ref = load_file(str(folder / "reference.safetensors"))
    torch.testing.assert_close(_run(load_dictionary(folder), ref["x"])[0], ref["y"], **TOL)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_saelens_runtime_norm_refused(tmp_path, norm):
    folder = _copy("saelens_standard", tmp_path)
    _edit_cfg(folder, normalize_activations=norm)
    with pytest.raises(DictionaryFileError, match=norm):
        load_dictionary(folder)


def test_saelens_scaling_factor(tmp_path):
    folder = _copy("saelens_standard", tmp_path)
    _edit_cfg(folder, normalize_activations="expected_average_only_in")
    with pytest.raises(DictionaryFileError, match="scaling factor"):
        load_dictionary(folder)
    c = 2.5
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": c, "has_whitening": False}))
    d = load_dictionary(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    # the SAE was trained on x * c: the folded dictionary maps raw x' to orig(c x') / c
    torch.testing.assert_close(_run(d, ref["x"] / c)[0] * c, ref["y"], **TOL)


def test_saelens_whitening(tmp_path):
    folder = _copy("saelens_topk", tmp_path)
    _edit_cfg(folder, normalize_activations="covariance_whitening")
    with pytest.raises(DictionaryFileError, match="whitening"):
        load_dictionary(folder)
    g = torch.Generator().manual_seed(0)
    M = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g)
    mean = torch.randn(64, generator=g)
    M_inv = torch.linalg.inv(M.double()).float().contiguous()
    save_file({"mean": mean, "matrix": M, "inverse_matrix": M_inv}, str(folder / "activation_whitening.safetensors"))
    d = load_dictionary(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    # the SAE saw z = (x - mean) @ M: feed x with z == reference x, expect y @ M^-1 + mean
    x_raw = (ref["x"].double() @ M_inv.double() + mean.double()).float()
    y, f = _run(d, x_raw)
    torch.testing.assert_close(f, ref["features"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, (ref["y"].double() @ M_inv.double() + mean.double()).float(), atol=1e-4, rtol=1e-4)


def test_saelens_unsupported_architecture(tmp_path):
    folder = _copy("saelens_standard", tmp_path)
    _edit_cfg(folder, architecture="gated")
    with pytest.raises(DictionaryFileError, match="'gated' has no sparsetrace equivalent"):
        load_dictionary(folder)


def test_saelens_bad_shape(tmp_path):
    folder = _copy("saelens_standard", tmp_path)
    _edit_cfg(folder, d_sae=128)
    with pytest.raises(DictionaryFileError, match="W_enc.*shape"):
        load_dictionary(folder)


def test_sparsify_groupmax_refused_and_seed_folder(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIX / "sparsify_topk", run)
    seeded = run / "layers.6" / "seed1"
    seeded.mkdir()
    for f in ("cfg.json", "sae.safetensors"):
        shutil.copy(run / "layers.6" / f, seeded / f)
    d = load_dictionary(seeded)
    assert (d.cfg.layer, d.cfg.hookpoint_out, d.cfg.model_id) == (6, "resid_post", "EleutherAI/pythia-70m")
    _edit_cfg(run / "layers.6", activation="groupmax")
    with pytest.raises(DictionaryFileError, match="groupmax"):
        load_dictionary(run / "layers.6")


# --------------------------------------------------------------------------------- export round trip
def _ours(kind: str, activation: str, seed: int, d_out: int = 64) -> SparseDictionary:
    hp = ("resid_pre", "resid_pre") if kind == "sae" else ("mlp_in", "mlp_out")
    cfg = DictionaryConfig(kind=kind, d_in=64, d_out=64 if kind == "sae" else d_out, n_features=256,
                           activation=activation, k=8 if activation in ("topk", "batchtopk") else None, layer=7,
                           hookpoint_in=hp[0], hookpoint_out=hp[1], model_id="stories260k")
    d = SparseDictionary(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.b_enc.copy_(0.1 * torch.randn(256, generator=g) - 0.05)
        d.b_dec.copy_(0.5 * torch.randn(cfg.d_out, generator=g))
        if d.W_skip is not None:
            d.W_skip.copy_(0.05 * torch.randn(cfg.d_out, 64, generator=g))
        if d.log_threshold is not None:
            d.log_threshold.copy_((0.05 + 0.2 * torch.rand(256, generator=g)).log())
        if d.batch_threshold is not None:
            d.batch_threshold.fill_(0.1)
    return d.eval()


CASES = [("sae", "relu"), ("sae", "topk"), ("sae", "jumprelu"), ("sae", "batchtopk"), ("transcoder", "relu"),
         ("transcoder", "jumprelu"), ("skip_transcoder", "relu"), ("skip_transcoder", "jumprelu")]


@pytest.mark.parametrize("kind,act", CASES)
def test_export_saelens_round_trip(tmp_path, kind, act):
    d = _ours(kind, act, seed=len(kind) + len(act), d_out=48)
    folder = export_saelens(d, tmp_path / "out")
    assert {p.name for p in folder.iterdir()} >= {"cfg.json", "sae_weights.safetensors"}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == ("blocks.7.hook_resid_pre" if kind == "sae" else "blocks.7.ln2.hook_normalized")
    assert cfg["metadata"]["model_name"] == "stories260k"
    assert load_file(str(folder / "sae_weights.safetensors"))["W_enc"].shape == (64, 256)
    back = load_dictionary(folder)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 2
    y0, f0 = _run(d, x)
    y1, f1 = _run(back, x)
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f1, f0, atol=1e-6, rtol=1e-6)
    assert (back.cfg.kind, back.cfg.layer, back.cfg.hookpoint_in, back.cfg.hookpoint_out) == (
        kind, 7, d.cfg.hookpoint_in, d.cfg.hookpoint_out)


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
def test_export_sparsify_round_trip(tmp_path, kind):
    d = _ours(kind, "topk", seed=11)
    folder = export_sparsify(d, tmp_path / "run" / "layers.7.mlp")
    back = load_dictionary(folder)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_run(back, x)[0], _run(d, x)[0], atol=1e-5, rtol=1e-5)
    assert back.cfg.kind == kind and back.cfg.layer == 7


def test_export_refusals(tmp_path):
    with pytest.raises(DictionaryFileError, match="SAELens"):
        export_saelens(_ours("transcoder", "topk", 1), tmp_path / "a")
    with pytest.raises(DictionaryFileError, match="sparsify"):
        export_sparsify(_ours("sae", "relu", 1), tmp_path / "b")
    with pytest.raises(DictionaryFileError, match="d_in == d_out"):
        export_sparsify(_ours("transcoder", "topk", 1, d_out=48), tmp_path / "c")


# ------------------------------------------------------------------------------------- graphs
def _small_graph() -> dict:
    return json.loads((FIX / "graph_sparsetrace_small.json").read_text())


def test_cantor():
    for a in range(20):
        for b in range(0, 400, 7):
            assert uncantor(cantor(a, b)) == (a, b)


def test_to_neuronpedia_fields():
    g = _small_graph()
    np_graph = to_neuronpedia(g)
    meta = np_graph["metadata"]
    assert meta["scan"] == "stories260k" and meta["prompt"] == "The cat sat" and meta["schema_version"] == 1
    assert meta["prompt_tokens"] == g["metadata"]["prompt_tokens"] and meta["node_threshold"] == 0.8
    assert meta["slug"] == "the-cat-sat"
    assert np_graph["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    by_id = {n["node_id"]: n for n in np_graph["nodes"]}
    f = by_id["2_31_3"]
    assert (f["feature"], f["layer"], f["ctx_idx"], f["feature_type"], f["jsNodeId"], f["clerp"]) == (
        cantor(2, 31), "2", 3, "cross layer transcoder", "2_31-0", "sitting")
    e = by_id["0_1_3"]
    assert (e["feature"], e["layer"], e["feature_type"], e["jsNodeId"]) == (-1, "1", "mlp reconstruction error", "1_3-0")
    t = by_id["E_450_1"]
    assert (t["feature"], t["layer"], t["feature_type"], t["jsNodeId"]) == (1, "E", "embedding", "E_450-1")
    lo = by_id["4_373_3"]
    assert (lo["feature"], lo["layer"], lo["feature_type"], lo["jsNodeId"], lo["is_target_logit"]) == (
        373, "4", "logit", "L_373-3", True)
    assert lo["clerp"] == 'Output " on" (p=0.410)' and lo["token_prob"] == pytest.approx(0.41)
    assert not by_id["4_1623_3"]["is_target_logit"]
    for n in np_graph["nodes"]:
        assert list(n) == ["node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                           "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"]
    assert len(np_graph["links"]) == len(g["links"])
    assert all(lk["source"] in by_id and lk["target"] in by_id for lk in np_graph["links"])
    assert "sparsetrace" not in to_neuronpedia(g, extras=False)["metadata"]


def test_graph_round_trip():
    g = _small_graph()
    assert from_neuronpedia(to_neuronpedia(g)) == g
    # without our extras the structure still survives
    bare = from_neuronpedia(to_neuronpedia(g, extras=False))
    key = ("node_id", "kind", "layer", "position", "feature", "activation", "influence", "token")
    assert [tuple(n[k] for k in key) for n in bare["nodes"]] == [tuple(n[k] for k in key) for n in g["nodes"]]
    assert bare["links"] == g["links"]
    assert bare["metadata"]["targets"] == g["metadata"]["targets"]
    assert bare["metadata"]["n_layers"] == 3


def test_circuit_tracer_graph_round_trip():
    ct = json.loads((FIX / "circuit_tracer_graph" / "graph.json").read_text())
    ours = from_neuronpedia(ct)
    kinds = [n["kind"] for n in ours["nodes"]]
    assert kinds.count("embedding") == 4 and kinds.count("logit") == 2 and "feature" in kinds
    assert ours["metadata"]["n_layers"] == 2 and ours["metadata"]["model"] == "synthetic-scan"
    assert ours["metadata"]["targets"][0]["token_id"] == 77
    assert {n["node_id"] for n in ours["nodes"] if n["kind"] == "embedding"} == {"E@0", "E@1", "E@2", "E@3"}
    assert to_neuronpedia(ours, extras=False) == ct


def test_graph_errors(tmp_path):
    with pytest.raises(GraphFormatError, match="sparsetrace-graph/1"):
        to_neuronpedia({"format": "other"})
    g = _small_graph()
    g["links"].append({"source": "L9/F1@0", "target": "E@0", "weight": 1.0})
    with pytest.raises(GraphFormatError, match="unknown node"):
        to_neuronpedia(g)
    with pytest.raises(GraphFormatError):
        from_neuronpedia({"nodes": []})
    src = tmp_path / "graph.json"
    src.write_text(json.dumps(_small_graph()))
    out = export_graph_file(src, tmp_path / "np" / "graph.json", slug="s")
    assert json.loads(out.read_text())["metadata"]["slug"] == "s"
