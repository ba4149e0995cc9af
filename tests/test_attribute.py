"""Attribution: exact replacement model, linear frozen model, sparse graphs, pruning, paths, weight-only."""

import copy
import json

import numpy as np
import pytest
import torch

from sparsetrace.attribute import (
    Edges,
    Graph,
    Node,
    ReplacementModel,
    attribute,
    check_edges,
    find_paths,
    graph_scores,
    node_influence,
    prune_graph,
    select_circuit,
)
from sparsetrace.attribute import weights as W
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.errors import ConfigError, DataError, DictionaryFileError
from sparsetrace.model.adapter import LanguageModel
from sparsetrace.model.hookpoints import Hookpoint

PROMPT = "The cat sat on the mat because it"
ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-neox"]


def make_dicts(d_model=64, n_features=96, spec=((0, "transcoder"), (1, "skip_transcoder"), (3, "transcoder")),
               dtype=torch.float32, bias=-0.08):
    out = []
    for layer, kind in spec:
        hp = {"sae": ("resid_pre",) * 2, "sae_post": ("resid_post",) * 2}.get(kind, ("mlp_in", "mlp_out"))
        kind = "sae" if kind.startswith("sae") else kind
        cfg = DictionaryConfig(kind=kind, d_in=d_model, d_out=d_model, n_features=n_features, layer=layer,
                               hookpoint_in=hp[0], hookpoint_out=hp[1])
        d = SparseDictionary(cfg, seed=10 + layer)
        with torch.no_grad():
            d.b_enc.fill_(0.0 if kind == "sae" else bias)
            if d.W_skip is not None:
                d.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(layer))
        out.append(d.to(dtype).eval())
    return out


@pytest.fixture(scope="module")
def llama64(tiny_llama):
    """A float64 copy of tiny-llama (the session fixture stays float32)."""
    return LanguageModel(copy.deepcopy(tiny_llama.model).double(), tiny_llama.tokenizer, tiny_llama.model_id)


@pytest.fixture(scope="module")
def graph64(llama64):
    dicts = make_dicts(dtype=torch.float64, spec=((0, "transcoder"), (1, "skip_transcoder"), (2, "sae"),
                                                  (3, "transcoder")))
    g = attribute(llama64, PROMPT, dicts, batch_size=16, max_feature_nodes=150, prune=False)
    return g, dicts


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", ARCHS)
def test_replacement_is_exact_and_frozen_model_linear(tiny_lms, name):
    lm = tiny_lms[name]
    ids = lm.tokenize(PROMPT)
    rm = ReplacementModel(lm, ids, make_dicts(spec=((0, "transcoder"), (1, "skip_transcoder"), (2, "sae"),
                                                    (3, "transcoder"))))
    assert rm.exactness <= 1e-5
    real = lm.run(ids).logits[0]
    assert rm.replacement_logits.shape == (1, lm.vocab_size)
    assert (rm.replacement_logits - real[-1:]).abs().max() <= 1e-5
    # replaying the taped constants (query/key projections skipped) reproduces the same logits
    assert (rm.run(1, logits=True).logits[0] - real).abs().max() <= 1e-5
    # the replayed (frozen) forward is linear in every constant
    leaves = rm.make_leaves(3)
    delta = torch.randn(rm.n_pos, lm.d_model, generator=torch.Generator().manual_seed(0))
    for key in ("emb", "mlp_out.0", "resid_pre.2"):
        lv = {k: v.clone() for k, v in leaves.items()}
        lv[key][1] += delta
        lv[key][2] += 2.5 * delta
        r = rm.run(3, leaves=lv, logits=True)
        f = torch.cat([r.logits, r.reads["resid_pre.2"]], -1)  # the SAE at resid_pre.2 screens earlier constants
        lin = (f[2] - f[0]) - 2.5 * (f[1] - f[0])
        assert (f[1] - f[0]).abs().max() > 1e-3  # the constant matters ...
        assert lin.abs().max() <= 1e-4 * (f[1] - f[0]).abs().max() + 1e-5  # ... linearly
    # the unfrozen model is not linear (attention and norms are live)
    lv = {k: v.clone() for k, v in leaves.items()}
    lv["emb"][1] += delta
    lv["emb"][2] += 2.5 * delta
    f = rm.run(3, mode=None, leaves=lv).reads["resid_pre.2"]
    assert ((f[2] - f[0]) - 2.5 * (f[1] - f[0])).abs().max() > 1e-3


def test_bad_dictionaries(tiny_llama):
    ids = tiny_llama.tokenize(PROMPT)
    with pytest.raises(DictionaryFileError, match="d_model"):
        ReplacementModel(tiny_llama, ids, make_dicts(d_model=32))
    with pytest.raises(ConfigError, match="at most one"):
        ReplacementModel(tiny_llama, ids, make_dicts(spec=((1, "transcoder"), (1, "skip_transcoder"))))


# ------------------------------------------------------------------------------------------ edges
def test_edges_match_finite_differences_float64(graph64):
    g, _ = graph64
    assert g.metadata["exactness"] <= 1e-10
    res = check_edges(g, k=120, unfrozen=True)
    assert res["n"] == 120
    # float64 model; the edge weights themselves are stored as float32
    assert res["frozen"]["max_rel_err"] <= 1e-5
    assert res["frozen"]["sign_agreement"] == 1.0
    assert {"median_rel_err", "sign_agreement"} <= set(res["causal_agreement"])
    kinds = {g.node(e["source"]).kind for e in res["edges"]} | {g.node(e["target"]).kind for e in res["edges"]}
    assert {"feature", "logit"} <= kinds


def test_batched_rows_match_single_backward(graph64):
    """Rows from the batched, replayed backward equal a plain per-target gradient in record mode."""
    g, _ = graph64
    rm = g.replacement
    src, dst, w = g.edges.numpy()
    feats = [i for i, n in enumerate(g.nodes) if n.kind == "feature"][:3]
    logit = next(i for i, n in enumerate(g.nodes) if n.kind == "logit")
    for t in [logit, *feats]:
        node = g.nodes[t]
        leaves = rm.make_leaves(1, requires_grad=True)
        out = rm.run(1, mode="record", leaves=leaves)
        if node.kind == "logit":
            pre = out.final[0, node.position] @ rm.logit_direction(node.token_id)
        else:
            pre = out.reads[node.hookpoint][0, node.position] @ rm.sites[node.hookpoint].W_enc[node.feature]
        grads = dict(zip(leaves, torch.autograd.grad(pre, list(leaves.values()), allow_unused=True), strict=True))
        m = np.flatnonzero(dst == t)
        assert len(m) > 0
        for j in m:
            s = g.nodes[src[j]]
            key = "emb" if s.kind == "embedding" else s.hookpoint
            G = grads[key][0, s.position]
            if s.kind == "feature":
                site = rm.sites[key]
                ref = site.activation(s.position, s.feature) * (G @ site.W_dec[s.feature])
            elif s.kind == "error":
                ref = G @ rm.sites[key].error[s.position]
            else:
                ref = G @ rm.emb[s.position]
            assert abs(float(ref) - float(w[j])) <= 1e-6 * max(1.0, abs(float(ref)))


def test_sparse_storage_and_structure(graph64):
    g, _ = graph64
    n = len(g.nodes)
    assert isinstance(g.edges, Edges)
    assert g.edges.src.dim() == g.edges.dst.dim() == g.edges.weight.dim() == 1
    assert (g.edges.weight != 0).all()  # exact zeros dropped
    assert g.edges.nbytes == 12 * len(g.edges) < 4 * n * n
    for v in vars(g).values():  # nothing dense n x n is kept on the graph
        assert not (isinstance(v, torch.Tensor) and v.numel() >= n * n)
    src, dst, _ = g.edges.numpy()
    pos = np.array([nd.position for nd in g.nodes])
    layer = np.array([nd.layer for nd in g.nodes])
    assert (pos[src] <= pos[dst]).all()  # causal
    assert (layer[src] <= layer[dst]).all()
    kinds = [nd.kind for nd in g.nodes]
    assert kinds.count("embedding") == len(g.metadata["prompt_tokens"])
    assert g.metadata["n_feature_rows"] == kinds.count("feature") <= 150
    assert any(nd.node_id.startswith("resid_pre.2/F") for nd in g.nodes)  # residual SAE features
    assert any(nd.node_id.startswith("L2/ERR@") for nd in g.nodes)  # MLP 2 has no transcoder: an error node
    sc = g.scores
    assert 0 <= sc["replacement"] <= 1 and 0 <= sc["graph_completeness"] <= 1


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-neox"])
def test_attribute_other_architectures(tiny_lms, name):
    lm = tiny_lms[name]
    g = attribute(lm, PROMPT, make_dicts(spec=((0, "transcoder"), (1, "skip_transcoder"), (2, "sae_post"))),
                  batch_size=32)
    full = g.unpruned
    assert full.metadata["exactness"] <= 1e-5
    assert any(n.node_id.startswith("resid_post.2/F") for n in full.nodes)
    res = check_edges(full, k=100, unfrozen=False)
    assert res["frozen"]["max_rel_err"] <= 1e-2
    assert len(g.nodes) < len(full.nodes)


# ------------------------------------------------------------------------------------------ JSON
def test_json_round_trip_and_bad_files(graph64, tmp_path):
    g, _ = graph64
    path = g.save(tmp_path / "graph.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "sparsetrace-graph/1"
    assert set(doc) == {"format", "metadata", "nodes", "links"}
    assert {"model", "prompt", "prompt_tokens", "targets", "node_threshold", "edge_threshold", "scores",
            "n_layers"} <= set(doc["metadata"])
    h = Graph.load(path)
    assert [n.to_dict() for n in h.nodes] == [n.to_dict() for n in g.nodes]
    assert torch.equal(h.edges.src, g.edges.src) and torch.equal(h.edges.dst, g.edges.dst)
    assert torch.equal(h.edges.weight, g.edges.weight)
    assert h.scores == g.scores
    assert graph_scores(h) == pytest.approx(g.scores)

    (tmp_path / "bad.json").write_text(path.read_text()[:1000])
    with pytest.raises(DataError, match="not valid JSON"):
        Graph.load(tmp_path / "bad.json")
    (tmp_path / "np.json").write_text(json.dumps({"metadata": {"scan": "x"}, "qParams": {}, "nodes": [], "links": []}))
    with pytest.raises(DataError, match="expected 'sparsetrace-graph/1'"):
        Graph.load(tmp_path / "np.json")
    doc["links"].append({"source": "E@0", "target": "nope", "weight": 1.0})
    (tmp_path / "dangling.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="unknown node"):
        Graph.load(tmp_path / "dangling.json")
    with pytest.raises(DataError, match="does not exist"):
        Graph.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ prune / scores
def _toy_graph():
    """E0 -> F1 -> LOGIT, E0 -> LOGIT, ERR -> F1; |weights| make the scores easy to compute by hand."""
    nodes = [Node("E@0", "embedding", -1, 0), Node("L0/F1@0", "feature", 0, 0, feature=1, activation=2.0),
             Node("L0/ERR@0", "error", 0, 0), Node("LOGIT/5@0", "logit", 1, 0, token_id=5, prob=1.0)]
    edges = Edges(torch.tensor([0, 2, 1, 0]), torch.tensor([1, 1, 3, 3]), torch.tensor([3.0, -1.0, 2.0, 2.0]))
    return Graph(nodes, edges, {"scores": {}})


def test_scores_by_hand():
    g = _toy_graph()
    infl = node_influence(g)
    # logit: half from F1, half from E0; F1: 3/4 from E0, 1/4 from ERR
    assert infl == pytest.approx([0.5 + 0.5 * 0.75, 0.5, 0.5 * 0.25, 0.0])
    sc = graph_scores(g)
    assert sc["replacement"] == pytest.approx(0.875 / (0.875 + 0.125))
    # completeness: F1 is 3/4 complete with weight 0.5, the logit complete with weight 1, E0/ERR complete
    w = np.array([0.875, 0.5, 0.125, 1.0])
    assert sc["graph_completeness"] == pytest.approx((w * [1, 0.75, 1, 1]).sum() / w.sum())


def test_pruning_keeps_logits_and_reduces(graph64):
    g, _ = graph64
    p = prune_graph(g, 0.5, 0.9)
    kinds = [n.kind for n in p.nodes]
    assert kinds.count("logit") == sum(n.kind == "logit" for n in g.nodes)
    assert kinds.count("embedding") == sum(n.kind == "embedding" for n in g.nodes)
    assert len(p.nodes) < len(g.nodes) and len(p.edges) < len(g.edges)
    # every kept edge is an edge of the full graph with the same weight
    full = {(g.nodes[s].node_id, g.nodes[t].node_id): w for s, t, w in zip(*g.edges.numpy(), strict=True)}
    for s, t, w in zip(*p.edges.numpy(), strict=True):
        assert full[(p.nodes[s].node_id, p.nodes[t].node_id)] == w
    # kept features have incoming and outgoing edges
    src, dst, _ = p.edges.numpy()
    for i, n in enumerate(p.nodes):
        if n.kind == "feature":
            assert (src == i).any() and (dst == i).any()
    assert p.metadata["node_threshold"] == 0.5
    looser = prune_graph(g, 0.9, 0.99)
    assert len(looser.nodes) >= len(p.nodes)
    with pytest.raises(DataError):
        prune_graph(g, 0.0)
    ke = prune_graph(g, 0.5, 0.9, keep_errors=True)
    assert ke.metadata["keep_errors"] and len(ke.nodes) > len(p.nodes)
    # errors bypass the node threshold (those left with outgoing edges stay); features are ranked alone
    src_k = set(ke.edges.numpy()[0].tolist())
    assert all(i in src_k for i, n in enumerate(ke.nodes) if n.kind == "error")
    assert sum(n.kind == "feature" for n in ke.nodes) >= sum(n.kind == "feature" for n in p.nodes)


# ------------------------------------------------------------------------------------------ paths
def test_find_paths_and_select_circuit(graph64):
    g, _ = graph64
    p = prune_graph(g, 0.8, 0.98)
    paths = find_paths(p, None, num_iters=6, num_branches=4)
    assert paths
    target = max((n for n in p.nodes if n.kind == "logit"), key=lambda n: n.prob).node_id
    edges = {(p.nodes[s].node_id, p.nodes[t].node_id): w for s, t, w in zip(*p.edges.numpy(), strict=True)}
    scores = [q.score for q in paths]
    assert scores == sorted(scores, reverse=True)
    for q in paths:
        assert q.nodes[-1] == target and len(q.weights) == len(q.nodes) - 1
        for a, b, w in zip(q.nodes, q.nodes[1:], q.weights, strict=False):
            assert edges[(a, b)] == pytest.approx(w)
        assert q.product == pytest.approx(np.prod(q.weights))
        assert 0 < q.score <= 1
    assert any(q.complete for q in paths)
    circuit = select_circuit(g, max_features=10)
    assert len(circuit) == 10 and all(g.node(c).kind == "feature" for c in circuit)
    infl = [g.node(c).influence for c in circuit]
    assert infl == sorted(infl, reverse=True)
    others = [n.influence for n in g.nodes if n.kind == "feature" and n.node_id not in circuit]
    assert max(others) <= min(infl)
    with pytest.raises(DataError):
        find_paths(p, "not-a-node")


def test_target_must_be_single_token(tiny_llama):
    dicts = make_dicts(spec=((1, "transcoder"),))
    with pytest.raises(DataError, match="single token"):
        attribute(tiny_llama, PROMPT, dicts, target=" hello wonderful world")
    g = attribute(tiny_llama, PROMPT, dicts, target=" the", batch_size=32, max_feature_nodes=40)
    assert [t["token"] for t in g.metadata["targets"]] == [" the"]
    assert sum(n.kind == "logit" for n in g.nodes) == 1


# ------------------------------------------------------------------------------------------ weight-only
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox", "tiny-gptneo"])
def test_norms_and_head_ov_match_model(tiny_lms, name):
    lm = tiny_lms[name]
    L = 1
    x = torch.randn(5, lm.d_model, generator=torch.Generator().manual_seed(1))
    for which, layer in (("mlp", L), ("attn", L), ("final", None)):
        m = W._norm_module(lm, layer, which)
        gamma, centred = W.norm_linear(lm, layer, which)
        xc = x - x.mean(-1, keepdim=True) if centred else x
        s = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + (m.eps if hasattr(m, "eps") else m.variance_epsilon))
        bias = m.bias if getattr(m, "bias", None) is not None else 0.0
        assert torch.allclose(m(x), gamma * xc * s + bias, atol=1e-5)
    # OV circuits: with a single token, attention is exactly sum_h OV_h (linear in its input)
    cap = []
    h = lm.arch.attn(L).register_forward_pre_hook(
        lambda _m, a, k: cap.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    try:
        outs = [lm.run(torch.tensor([[t]]), read=[Hookpoint("attn_out", L)]).acts[Hookpoint("attn_out", L)][0, 0]
                for t in (5, 77)]
    finally:
        h.remove()
    W_V, W_O = W.head_ov(lm, L)
    OV = torch.einsum("hdk,hke->de", W_O, W_V)
    assert torch.allclose(outs[0] - outs[1], OV @ (cap[0][0, 0] - cap[1][0, 0]), atol=1e-5)


@torch.no_grad()
def test_weight_only_scores_match_brute_force(tiny_llama):
    lm = tiny_llama
    tc0, tc2, sae3 = make_dicts(spec=((0, "transcoder"), (2, "transcoder"), (3, "sae")))
    up = W.find_upstream_features(7, sae3, tc0)
    ref = torch.stack([tc0.W_dec[i] @ sae3.W_enc[7] for i in range(tc0.n_features)])
    assert torch.allclose(up, ref, atol=1e-6)
    with pytest.raises(ConfigError):
        W.find_upstream_features(7, make_dicts(spec=((0, "sae"),))[0], tc2)  # writes after the SAE reads

    gamma, _ = W.norm_linear(lm, 2, "mlp")
    vw = W.virtual_weights(tc0, tc2, [3, 9], lm=lm, norm_scale=0.5)
    for row, f in zip(vw, [3, 9], strict=True):
        ref = torch.stack([tc2.W_enc[f] @ (0.5 * gamma * tc0.W_dec[i]) for i in range(tc0.n_features)])
        assert torch.allclose(row, ref, atol=1e-5)
    assert torch.allclose(W.virtual_weights(tc0, sae3, 4), tc0.W_dec @ sae3.W_enc[4], atol=1e-6)

    ov = W.ov_virtual_weights(lm, 1, tc0, tc2, 3)
    W_V, W_O = W.head_ov(lm, 1)
    g_attn, _ = W.norm_linear(lm, 1, "attn")
    for h in (0, 3):
        for i in (0, 11, 50):
            ref = tc2.W_enc[3] @ (gamma * (W_O[h] @ (W_V[h] @ (g_attn * tc0.W_dec[i]))))
            assert float(ov[h, i]) == pytest.approx(float(ref), abs=1e-5)
    with pytest.raises(ConfigError):
        W.ov_virtual_weights(lm, 3, tc0, tc2, 3)  # attention 3 comes after the target reads

    top, scores = W.feature_input_tokens(lm, tc2, 3, k=5, return_scores=True)
    E = lm.arch.embed.weight
    for v in (0, 17, 1000):
        assert float(scores[v]) == pytest.approx(float(E[v] @ (gamma * tc2.W_enc[3])), abs=1e-5)
    assert top[0][1] == pytest.approx(float(scores.max()))
    eff = W.feature_logit_effects(lm, tc2, 3, k=4, return_scores=True)
    with torch.no_grad():
        ref = lm.arch.unembed(W.norm_linear(lm, None, "final")[0] * tc2.W_dec[3])
    assert torch.allclose(eff["scores"], ref, atol=1e-5)
    assert eff["top"][0][1] == pytest.approx(float(ref.max())) and eff["bottom"][0][1] == pytest.approx(float(ref.min()))
    scales = W.estimate_norm_scales(lm, [lm.tokenize(PROMPT)], layers=[0, 2])
    assert set(scales) == {0, 2} and all(v > 0 for v in scales.values())
