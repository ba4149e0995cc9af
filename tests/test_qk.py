"""QK attribution: exact bilinear pair terms of attention scores (RoPE, GQA, LayerNorm), ablation checks,
per-head loadings of attention-mediated edges, graph.json's "qk" key and `trace --qk`."""

import copy
import json

import numpy as np
import pytest
import torch
from cli_runner import run_cli

from sparsetrace.attribute import Graph, ReplacementModel, attribute
from sparsetrace.attribute.heads import add_qk, attention_edges, head_loadings
from sparsetrace.attribute.qk import check_qk, qk_terms
from sparsetrace.dictionary.io import save_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.errors import ConfigError, DataError, ModelError
from sparsetrace.model.adapter import LanguageModel

PROMPT = "The cat sat on the mat because it"
ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-neox"]
EDGES = [(3, 1, 8, 4), (2, 3, 8, 2), (1, 0, 5, 5), (3, 2, 6, 1), (2, 1, 8, 0)]


def make_dicts(d_model=64, spec=((0, "transcoder"), (1, "skip_transcoder"), (2, "sae"), (3, "transcoder")),
               dtype=torch.float32):
    out = []
    for layer, kind in spec:
        hp = ("resid_pre", "resid_pre") if kind == "sae" else ("mlp_in", "mlp_out")
        cfg = DictionaryConfig(kind=kind, d_in=d_model, d_out=d_model, n_features=96, layer=layer,
                               hookpoint_in=hp[0], hookpoint_out=hp[1], model_id="tiny-llama")
        d = SparseDictionary(cfg, seed=10 + layer)
        with torch.no_grad():
            d.b_enc.fill_(0.0 if kind == "sae" else -0.08)
            d.b_dec.normal_(0, 0.05, generator=torch.Generator().manual_seed(layer))
            if d.W_skip is not None:
                d.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(layer))
        out.append(d.to(dtype).eval())
    return out


@pytest.fixture(scope="module")
def rms(tiny_lms):
    return {name: ReplacementModel(tiny_lms[name], tiny_lms[name].tokenize(PROMPT), make_dicts()) for name in ARCHS}


def _eager_pattern(lm: LanguageModel, ids, layer: int) -> torch.Tensor:
    """The real attention probabilities from transformers' own eager attention ([H, P, P])."""
    model = copy.deepcopy(lm.model)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    return out.attentions[layer][0]


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", ARCHS)
def test_pair_terms_sum_to_the_real_score(rms, tiny_lms, name):
    """RoPE (llama, neox: partial rotary), GQA (llama: 4 query heads on 2 key/value heads), LayerNorm with
    biases (gpt2, neox), a skip transcoder, a residual SAE and b_dec biases: the pair terms add up to the
    real model's attention score, and that score's softmax is transformers' own eager attention pattern."""
    lm, rm = tiny_lms[name], rms[name]
    eager = {L: _eager_pattern(lm, rm.input_ids, L) for L in {e[0] for e in EDGES}}
    for L, h, q, k in EDGES:
        t = qk_terms(rm, L, h, q, k)
        assert t.exactness <= 1e-5 * max(1.0, abs(t.score)), (L, h, q, k)
        assert abs(t.pattern - float(eager[L][h, q, k])) <= 1e-5
        assert t.q_nodes[-1] == t.k_nodes[-1] == "BIAS"
        P = t.pairs()
        assert P.shape == (len(t.q_nodes), len(t.k_nodes))
        # the node ids are the graph's: features, errors and embeddings at positions up to q (k)
        assert all(n == "BIAS" or int(n.rsplit("@", 1)[1]) <= q for n in t.q_nodes)
        assert all(n == "BIAS" or int(n.rsplit("@", 1)[1]) <= k for n in t.k_nodes)
        # no feature of a layer at or after L reaches layer L's attention; the SAE at resid_pre.2 screens
        # everything before it for L >= 2
        for n in t.q_nodes + t.k_nodes:
            if n.startswith("L") and "/" in n:
                assert int(n[1:n.index("/")]) < L
            if L >= 2 and n.startswith(("L0/", "L1/", "E@")):
                pytest.fail(f"{n} should be screened by the SAE at resid_pre.2")
    if name == "tiny-llama":
        assert [qk_terms(rm, 3, h, 8, 4).kv_head for h in range(4)] == [0, 0, 1, 1]


def test_rotation_matters(rms):
    """With RoPE, the same two residual vectors score differently at other positions: the terms at (q, k)
    are not those at (q-1, k-1) even where the inputs agree (here: pair terms of the embeddings alone)."""
    rm = rms["tiny-llama"]
    a = qk_terms(rm, 0, 1, 6, 3)
    b = qk_terms(rm, 0, 1, 5, 2)
    # layer 0's input is the embedding only: one node per side (plus BIAS)
    assert a.q_nodes == ["E@6", "BIAS"] and a.k_nodes == ["E@3", "BIAS"]
    assert abs(a.exactness) <= 1e-5 and abs(b.exactness) <= 1e-5


def test_bad_requests(rms, tiny_lms):
    rm = rms["tiny-llama"]
    with pytest.raises(ConfigError, match="layer 9"):
        qk_terms(rm, 9, 0, 3, 1)
    with pytest.raises(ConfigError, match="k <= q"):
        qk_terms(rm, 1, 0, 2, 5)
    with pytest.raises(ConfigError, match="head 7"):
        qk_terms(rm, 1, 7, 3, 1)
    t = qk_terms(rm, 1, 0, 3, 1)
    with pytest.raises(DataError, match="no term|not a node"):
        check_qk(rm, t, ["L3/F1@2"])
    neo = tiny_lms.get("tiny-gptneo") or LanguageModel.load("tiny-gptneo")
    with pytest.raises(ModelError, match="sdpa"):
        qk_terms(ReplacementModel(neo, neo.tokenize(PROMPT), []), 1, 0, 3, 1)


# ------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize("name", ARCHS)
def test_ablation_matches_prediction_with_norms_frozen(rms, name):
    rm = rms[name]
    n = 0
    for L, h, q, k in EDGES[:4]:
        t = qk_terms(rm, L, h, q, k)
        rows = check_qk(rm, t, k=3)
        for r in rows:
            n += 1
            assert r["rel_err_frozen"] <= 1e-3, r
            assert {"live", "real", "key_side"} <= set(r)
    assert n >= 8


def test_ablation_exact_in_float64(tiny_lms):
    """In float64 the prediction is exact to rounding. (GPT-2: its LayerNorm runs in float64; Llama's RMSNorm
    upcasts to float32 whatever the model's dtype, which puts float32 rounding into any Llama check.)"""
    base = tiny_lms["tiny-gpt2"]
    lm = LanguageModel(copy.deepcopy(base.model).double(), base.tokenizer, base.model_id)
    rm = ReplacementModel(lm, lm.tokenize(PROMPT), make_dicts(dtype=torch.float64))
    t = qk_terms(rm, 3, 1, 8, 4)
    assert t.exactness <= 1e-10
    # features at the key position and an error node (each reaches both sides through earlier attention)
    feats = [n for n in t.k_nodes if "/F" in n and n.endswith("@4")][:2]
    rows = check_qk(rm, t, [*feats, "resid_pre.2/ERR@4"], real=False)
    assert len(rows) == 3
    assert max(r["rel_err_frozen"] for r in rows) <= 1e-8


# ------------------------------------------------------------------------------------------ heads
@pytest.fixture(scope="module")
def graphs(tiny_lms):
    return {name: attribute(tiny_lms[name], PROMPT, make_dicts(), batch_size=16, max_feature_nodes=150, prune=False)
            for name in ARCHS}


@pytest.mark.parametrize("name", ARCHS)
def test_head_loadings_sum_to_the_edge_weight(graphs, name):
    g = graphs[name]
    idx = attention_edges(g, 25)
    src, dst, w = g.edges.numpy()
    assert len(idx) == 25 and all(g.nodes[src[e]].position != g.nodes[dst[e]].position for e in idx)
    load, at_key = head_loadings(g.replacement, [(g.nodes[src[e]], g.nodes[dst[e]]) for e in idx])
    assert load.shape == (25, 4, 4)
    rel = np.abs(load.sum((1, 2)) - w[idx]) / np.abs(w[idx])
    assert rel.max() <= 1e-4
    # a head of a layer after the target's read carries nothing
    for i, e in enumerate(idx):
        t = g.nodes[dst[e]]
        if t.kind == "feature":
            assert np.all(load[i, t.layer + 1:] == 0)


def test_graph_json_round_trip_with_qk(graphs, tmp_path):
    g = copy.copy(graphs["tiny-llama"])
    qk = add_qk(g, n_edges=3, n_heads=2, n_pairs=4, n_checks=1)
    assert len(qk) == 3
    for e in qk:
        assert abs(e["sum_of_loadings"] - e["weight"]) <= 1e-4 * abs(e["weight"])
        assert len(e["heads"]) == 2 and len(e["qk"]) == 2
        for hd, d in zip(e["heads"], e["qk"], strict=True):
            assert (d["layer"], d["head"]) == (hd["layer"], hd["head"])
            assert d["query_pos"] == g.node(e["target"]).position and d["key_pos"] == g.node(e["source"]).position
            assert abs(d["sum_of_terms"] - d["score"]) <= 1e-5
            assert len(d["top_pairs"]) == 4 and len(d["checks"]) <= 1
    path = g.save(tmp_path / "graph.json")
    doc = json.loads(path.read_text())
    assert doc["qk"] == json.loads(json.dumps(qk))
    back = Graph.load(path)
    assert back.qk == doc["qk"]
    assert back.to_json()["qk"] == doc["qk"]
    # graphs without the key still load (and write none)
    del doc["qk"]
    (tmp_path / "plain.json").write_text(json.dumps(doc))
    plain = Graph.load(tmp_path / "plain.json")
    assert plain.qk is None and "qk" not in plain.to_json()
    doc["qk"] = "nope"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="'qk'"):
        Graph.load(tmp_path / "bad.json")


def _cli(capsys, *args):
    code, _, err = run_cli(capsys, *args)
    return code, err


def test_cli_trace_qk_writes_the_key(tmp_path, capsys):
    for d in make_dicts(spec=((0, "transcoder"), (2, "transcoder"))):
        save_dictionary(d, tmp_path / "dicts" / f"L{d.cfg.layer:02d}_transcoder")
    common = ["trace", "-d", tmp_path / "dicts", "--model", "tiny-llama", "--prompt", PROMPT, "--target", " the",
              "--max-features", "3"]
    code, err = _cli(capsys, *common, "--qk", "--out", tmp_path / "trace")
    assert code == 0, err
    doc = json.loads((tmp_path / "trace" / "graph.json").read_text())
    assert isinstance(doc.get("qk"), list) and doc["qk"]
    e = doc["qk"][0]
    assert {"source", "target", "weight", "heads", "qk", "other_heads", "sum_of_loadings"} <= set(e)
    assert abs(e["sum_of_loadings"] - e["weight"]) <= 1e-4 * abs(e["weight"])
    assert e["qk"][0]["top_pairs"] and abs(e["qk"][0]["sum_of_terms"] - e["qk"][0]["score"]) <= 1e-5
    assert Graph.load(tmp_path / "trace" / "graph.json").qk == doc["qk"]
    # without --qk the key is absent
    code, err = _cli(capsys, *common, "--out", tmp_path / "plain")
    assert code == 0, err
    assert "qk" not in json.loads((tmp_path / "plain" / "graph.json").read_text())
