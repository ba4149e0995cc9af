"""Attribution over a full replacement: a transcoder on every MLP (PLT set) or a cross-layer transcoder."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli

from sparsetrace import tasks
from sparsetrace.attribute import (
    Edges,
    Graph,
    ReplacementModel,
    attribute,
    check_edges,
    find_paths,
    graph_scores,
    prune_graph,
)
from sparsetrace.attribute.scores import load_mlp_replacement, score_prompts
from sparsetrace.dictionary.clt import CLTConfig, CrossLayerTranscoder, save_clt
from sparsetrace.dictionary.io import save_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.dictionary.replacement_set import CLTReplacement, PLTSet
from sparsetrace.errors import ConfigError
from sparsetrace.model.adapter import LanguageModel

PROMPT = "The cat sat on the mat because it"
F = 96


@pytest.fixture(scope="module")
def llama64(tiny_llama):
    return LanguageModel(copy.deepcopy(tiny_llama.model).double(), tiny_llama.tokenizer, tiny_llama.model_id)


def plt_set(lm, bias=-0.08):
    out = []
    for layer in range(lm.n_layers):
        cfg = DictionaryConfig(kind="transcoder", d_in=lm.d_model, d_out=lm.d_model, n_features=F, layer=layer,
                               hookpoint_in="mlp_in", hookpoint_out="mlp_out")
        d = SparseDictionary(cfg, seed=20 + layer)
        with torch.no_grad():
            d.b_enc.fill_(bias)
            d.b_dec.normal_(0, 0.01, generator=torch.Generator().manual_seed(layer))
        out.append(d.double().eval())
    return out


def clt_from(lm, plts, off_diagonal: float = 0.0):
    """A CLT whose layer-l encoder and same-layer decoder are transcoder l's; writes to later layers are
    ``off_diagonal`` times random unit rows."""
    L = lm.n_layers
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=lm.d_model, n_features=F, activation="relu",
                                         model_id=lm.model_id), seed=0).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer, d in enumerate(plts):
            clt.W_enc[layer].copy_(d.W_enc)
            clt.b_enc[layer].copy_(d.b_enc)
            clt.b_dec[layer].copy_(d.b_dec)
            w = torch.randn(F, L - layer, lm.d_model, generator=g, dtype=torch.float64)
            w = off_diagonal * w / w.norm(dim=-1, keepdim=True)
            w[:, 0] = d.W_dec
            clt.W_dec[layer].copy_(w)
    return clt.eval()


def _edge_map(g):
    src, dst, w = g.edges.numpy()
    return {(g.nodes[s].node_id, g.nodes[t].node_id): float(x) for s, t, x in zip(src, dst, w, strict=True)}


def test_diagonal_clt_gives_the_plt_graph(llama64):
    plts = plt_set(llama64)
    clt = clt_from(llama64, plts)
    kw = dict(batch_size=16, max_feature_nodes=10_000, prune=False)
    g_plt = attribute(llama64, PROMPT, PLTSet(plts), **kw)
    g_clt = attribute(llama64, PROMPT, [CLTReplacement(clt)], **kw)
    assert g_clt.metadata["mlp_replacement"] == "clt" and g_plt.metadata["mlp_replacement"] == "plt"
    assert [n.node_id for n in g_plt.nodes] == [n.node_id for n in g_clt.nodes]
    assert sum(n.kind == "feature" for n in g_clt.nodes) > 50
    a, b = _edge_map(g_plt), _edge_map(g_clt)
    assert len(a) > 500
    keys = set(a) | set(b)
    scale = max(abs(v) for v in a.values())
    diff = max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)
    assert diff <= 1e-6 * scale
    assert set(a) == set(b)
    for k in ("replacement", "graph_completeness"):
        assert g_plt.scores[k] == pytest.approx(g_clt.scores[k], rel=1e-6)


@pytest.fixture(scope="module")
def clt_graph(llama64):
    clt = clt_from(llama64, plt_set(llama64), off_diagonal=0.3)
    g = attribute(llama64, PROMPT, [clt], batch_size=16, max_feature_nodes=10_000, prune=False)
    return g, clt


def test_clt_errors_and_exactness(llama64, clt_graph):
    g, clt = clt_graph
    rm = g.replacement
    assert rm.exactness <= 1e-10
    ins = [rm.sites[f"mlp_out.{j}"].x_in for j in range(llama64.n_layers)]
    feats = [clt.encode(j, ins[j]) for j in range(llama64.n_layers)]
    for j in range(llama64.n_layers):
        site = rm.sites[f"mlp_out.{j}"]
        assert site.target_keys == tuple(f"mlp_out.{t}" for t in range(j, llama64.n_layers))
        ref = site.out - clt.decode(j, feats[:j + 1]).detach()
        assert (site.error - ref).abs().max() <= 1e-10


def test_clt_frozen_model_is_linear(clt_graph):
    rm = clt_graph[0].replacement
    delta = torch.randn(rm.n_pos, rm.lm.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for key in ("emb", "mlp_out.0", "mlp_out.2"):
        leaves = rm.make_leaves(3)
        leaves[key][1] += delta
        leaves[key][2] += 2 * delta
        out = rm.run(3, leaves=leaves, logits=True).logits
        d1, d2 = out[1] - out[0], out[2] - out[0]
        assert d1.abs().max() > 1e-3
        assert (d2 - 2 * d1).abs().max() <= 1e-8 * d1.abs().max()


def test_clt_edges_match_finite_differences(clt_graph):
    g, _ = clt_graph
    res = check_edges(g, k=150, unfrozen=True)
    assert res["n"] == 150
    assert res["frozen"]["max_rel_err"] <= 1e-5
    assert res["frozen"]["sign_agreement"] == 1.0
    assert "causal_agreement" in res
    # and the strongest edges from a feature to a feature at a later layer (they run through the CLT's
    # writes to several MLPs)
    src, dst, w = g.edges.numpy()
    kind = np.array([n.kind for n in g.nodes])
    layer = np.array([n.layer for n in g.nodes])
    keep = (kind[src] == "feature") & (kind[dst] == "feature") & (layer[dst] > layer[src] + 1)
    assert keep.sum() > 100
    sub = Graph(g.nodes, Edges.from_numpy(src[keep], dst[keep], w[keep]), dict(g.metadata))
    sub.replacement = g.replacement
    res = check_edges(sub, k=100, unfrozen=False)
    assert res["n"] == 100 and res["frozen"]["max_rel_err"] <= 1e-5


def test_clt_rows_are_sums_over_target_layers(clt_graph):
    """An edge from a CLT feature is sum_j act * <W_dec[l][f, j-l], d target / d leaf_j>, by plain autograd."""
    g, _ = clt_graph
    rm = g.replacement
    src, dst, w = g.edges.numpy()
    targets = [i for i, n in enumerate(g.nodes) if n.kind == "feature" and n.layer >= 2][:3]
    targets.append(next(i for i, n in enumerate(g.nodes) if n.kind == "logit"))
    n_checked = 0
    for t in targets:
        node = g.nodes[t]
        leaves = rm.make_leaves(1, requires_grad=True)
        out = rm.run(1, mode="record", leaves=leaves)
        if node.kind == "logit":
            pre = out.final[0, node.position] @ rm.logit_direction(node.token_id)
        else:
            pre = out.reads[node.hookpoint][0, node.position] @ rm.sites[node.hookpoint].W_enc[node.feature]
        grads = dict(zip(leaves, torch.autograd.grad(pre, list(leaves.values()), allow_unused=True), strict=True))
        for j in np.flatnonzero(dst == t):
            s = g.nodes[src[j]]
            if s.kind != "feature":
                continue
            site = rm.sites[s.hookpoint]
            ref = sum(float(grads[k][0, s.position] @ v) if grads[k] is not None else 0.0
                      for k, v in site.writes(s.feature, site.activation(s.position, s.feature)))
            assert abs(ref - float(w[j])) <= 1e-6 * max(1.0, abs(ref))
            n_checked += 1
    assert n_checked > 10


def test_clt_graph_prunes_scores_and_paths(clt_graph):
    g, _ = clt_graph
    s = graph_scores(g)
    assert 0.0 < s["replacement"] <= 1.0 and 0.0 < s["graph_completeness"] <= 1.0
    p = prune_graph(g, 0.8, 0.98)
    assert 0 < len(p.nodes) < len(g.nodes)
    paths = find_paths(g)
    assert paths and all(pth.nodes[-1].startswith("LOGIT/") for pth in paths)


def test_qk_refuses_clt_features(clt_graph):
    from sparsetrace.attribute.qk import node_refs

    with pytest.raises(ConfigError, match="cross-layer transcoder"):
        node_refs(clt_graph[0].replacement, 3)


def test_clt_refuses_transcoders_beside_it(llama64):
    plts = plt_set(llama64)
    ids = llama64.tokenize(PROMPT)
    with pytest.raises(ConfigError, match="cross-layer transcoder replaces every MLP"):
        ReplacementModel(llama64, ids, [clt_from(llama64, plts), plts[1]])


# ------------------------------------------------------------------------------------------ graph scores
def test_score_prompts_packaged():
    prompts = score_prompts()
    assert len(prompts) == 20 and len(set(prompts)) == 20
    # disjoint from the circuit tasks' prompts and fillers
    task_text = " ".join((Path(tasks.__file__).parent / "data" / f).read_text(encoding="utf-8").lower()
                         for f in ("ioi.json", "sva.json", "facts.json"))
    assert not [p for p in prompts if p.lower() in task_text]


def _save_run(lm, folder, clt=None):
    for d in plt_set(lm):
        d = d.float()
        d.cfg.model_id = "tiny-llama"
        save_dictionary(d, folder / f"L{d.cfg.layer:02d}_transcoder")
    if clt is not None:
        save_clt(clt.float(), folder / "clt")


def test_graph_scores_cli(llama64, tmp_path, capsys):
    run = tmp_path / "run"
    _save_run(llama64, run, clt_from(llama64, plt_set(llama64), off_diagonal=0.3))
    prompts = tmp_path / "p.txt"
    prompts.write_text("The dog ran to the\n\n# a comment\nShe opened the door and\n", encoding="utf-8")
    assert isinstance(load_mlp_replacement(run), CLTReplacement)
    assert isinstance(load_mlp_replacement(run, "plt"), PLTSet)
    res = {}
    for kind in ("plt", "clt"):
        code, out, err = run_cli(capsys, "graph-scores", run, "--prompts", prompts, "--kind", kind, "--json",
                                 "--max-feature-nodes", "200")
        assert code == 0, err
        res[kind] = json.loads(out)
        assert res[kind]["kind"] == kind and res[kind]["n_prompts"] == 2
        for r in res[kind]["prompts"]:
            assert 0.0 <= r["replacement"] <= 1.0 and 0.0 <= r["graph_completeness"] <= 1.0
            assert r["n_feature_rows"] <= 200
        m = res[kind]["mean"]["replacement"]
        assert m == pytest.approx(np.mean([r["replacement"] for r in res[kind]["prompts"]]))
    code, out, _ = run_cli(capsys, "graph-scores", run, "--prompts", prompts, "--kind", "plt")
    assert code == 0 and "mean over 2 prompts (plt" in out


def test_graph_scores_cli_mistakes(llama64, tmp_path, capsys):
    run = tmp_path / "run"
    _save_run(llama64, run)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n", encoding="utf-8")
    cases = [
        (("graph-scores", tmp_path / "nope"), "does not exist"),
        (("graph-scores", run, "--kind", "clt"), "no cross-layer transcoder"),
        (("graph-scores", run, "--kind", "both"), "--kind 'both'"),
        (("graph-scores", run, "--prompts", tmp_path / "missing.txt"), "missing.txt"),
        (("graph-scores", run, "--prompts", empty), "holds no prompt"),
        (("graph-scores", run, "--max-feature-nodes", "0"), "--max-feature-nodes 0"),
    ]
    for args, msg in cases:
        code, _, err = run_cli(capsys, *args)
        assert code != 0 and msg in err and "Traceback" not in err, (args, err)
        assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
