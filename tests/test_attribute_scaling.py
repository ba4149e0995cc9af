"""Attribution on long prompts: the pieces made linear (not quadratic) in prompt length keep their results.

- frozen attention replays batch-shared probabilities without broadcasting them (same values and grads);
- each site's source vectors are built with whole-site ops (same rows, spans and columns as a loop);
- the running influence estimate uses one merged matrix (same result as summing per-batch blocks).
"""

import copy

import numpy as np
import pytest
import torch
from test_attribute_clt import clt_from, plt_set

from sparsetrace.attribute import ReplacementModel, attribute
from sparsetrace.attribute.build import _Attributor
from sparsetrace.attribute.freeze import FreezeMode
from sparsetrace.attribute.rows import Rows
from sparsetrace.model.adapter import LanguageModel

PROMPT = "The cat sat on the mat because it was tired and then"


@pytest.mark.parametrize("n_q,n_kv", [(6, 2), (4, 4)])
def test_replayed_shared_probs_match_broadcast(n_q, n_kv):
    g = torch.Generator().manual_seed(0)
    B, L, dh = 3, 7, 5
    F = torch.nn.functional
    q1, k1, v1 = (torch.randn(1, h, L, dh, generator=g, dtype=torch.float64) for h in (n_q, n_kv, n_kv))
    rec = FreezeMode(None)
    with rec:
        F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, enable_gqa=n_q != n_kv)
    (_, probs), = rec.tape
    assert probs.shape == (1, n_q, L, L)
    v = torch.randn(B, n_kv, L, dh, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.zeros(B, n_q, L, dh, dtype=torch.float64)
    k = torch.zeros(B, n_kv, L, dh, dtype=torch.float64)
    with FreezeMode(rec.tape):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_q != n_kv)
    rep = n_q // n_kv
    ref = torch.matmul(probs.expand(B, n_q, L, L), v.repeat_interleave(rep, dim=1))
    assert out.shape == ref.shape == (B, n_q, L, dh)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    seed = torch.randn(B, n_q, L, dh, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad(out, v, seed)
    (gb,) = torch.autograd.grad(ref, v, seed)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    # each batch copy gets its own gradient: batch elements do not mix
    assert not torch.allclose(ga[0], ga[1])


def _site_sources_loop(at, t):
    """The per-position loop the vectorised builder replaced (reference)."""
    P = at.P
    srcs = [(s, s.target_keys.index(t.key)) for s in at.feat_sites if t.key in s.target_keys]
    vecs, cols, spans, r = [], [], [], 0
    for p in range(P):
        r0 = r
        for s, ti in srcs:
            m = (s.pos == p).nonzero().flatten()
            if not m.numel():
                continue
            W = s.W_dec[s.feat[m]] if s.W_dec.dim() == 2 else s.W_dec[s.feat[m], ti]
            vecs.append(W * s.act[m, None])
            cols.append(at.feat_offset[s.key] + m)
            r += m.numel()
        vecs.append(t.error[p:p + 1])
        cols.append(torch.tensor([at.err_offset[t.key] + p]))
        r += 1
        spans.append((r0, r))
    return torch.cat(vecs), spans, torch.cat(cols)


@pytest.fixture(scope="module")
def llama64(tiny_llama):
    return LanguageModel(copy.deepcopy(tiny_llama.model).double(), tiny_llama.tokenizer, tiny_llama.model_id)


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_site_sources_match_loop(llama64, kind):
    plts = plt_set(llama64)
    reps = plts[:1] + plts[2:] if kind == "plt" else [clt_from(llama64, plts, off_diagonal=0.3)]  # layer 1: none
    rm = ReplacementModel(llama64, llama64.tokenize(PROMPT), reps)
    at = _Attributor(rm, 4)
    assert at.n_feat > 0
    for t in at.sites:
        dec, spans, cols = at.dec[t.key]
        rdec, rspans, rcols = _site_sources_loop(at, t)
        assert spans == rspans
        assert torch.equal(cols, rcols)
        torch.testing.assert_close(dec, rdec, rtol=0, atol=0)


def test_merged_influence_matches_dense_reference():
    """The row store's influence estimate (one merged float32 CSC, rows normalised by their absolute sums)
    equals a dense float64 propagation over the same rows; its edges are the non-zeros, exactly."""
    rng = np.random.default_rng(0)
    n_cols, n_logits = 40, 2
    rows = Rows(n_cols)
    dense_cols = []  # per row: its weights over the n_cols columns
    for i, nb in enumerate((3, 2, 4, 1)):
        vals = torch.tensor(rng.normal(size=(n_cols, nb)) * (rng.random((n_cols, nb)) < 0.3), dtype=torch.float32)
        if nb == 2:
            vals.zero_()  # a batch without edges
        colid = torch.tensor(rng.permutation(n_cols))
        row_nodes = [n_cols + j % n_logits for j in range(nb)] if i == 0 else rng.choice(n_cols, nb, replace=False).tolist()
        rows.add_batch([(vals, colid)], nb, row_nodes)
        for j in range(nb):
            w = np.zeros(n_cols)
            w[colid.numpy()] = vals[:, j].double().numpy()
            dense_cols.append(w)
    lw = np.array([0.7, 0.3])
    A = np.stack(dense_cols, 1)  # [n_cols, n_rows]
    norm = np.abs(A) / np.maximum(np.abs(A).sum(0), 1e-30)
    row_node = np.asarray(rows.row_node)
    prod = np.zeros(n_cols + n_logits)
    prod[n_cols:] = lw
    ref = np.zeros(n_cols)
    for _ in range(rows.n_rows + 2):
        x = norm @ prod[row_node]
        if not x.any():
            break
        ref += x
        prod[:n_cols] = x
        prod[n_cols:] = 0
    got = rows.influence(lw)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
    assert ref.any()
    r, c, v = rows.arrays()
    rebuilt = np.zeros_like(A)
    rebuilt[c, r] = v
    np.testing.assert_array_equal(rebuilt, A.astype(np.float32))
    assert rows.n_edges == int((A != 0).sum())
    # merging is idempotent and later batches still join the estimate
    np.testing.assert_allclose(rows.influence(lw), got, rtol=1e-12)
    rows.add_batch([(torch.ones(n_cols, 1), torch.arange(n_cols))], 1, [0])
    assert rows.influence(lw).shape == (n_cols,)


def test_graph_unchanged_by_batch_size(llama64):
    """Replay at batch 1 and at batch 8 (batch-shared attention probabilities) gives one graph."""
    plts = plt_set(llama64)
    ids = llama64.tokenize(PROMPT)
    g1 = attribute(llama64, ids, plts, batch_size=1, max_feature_nodes=10**6, prune=False)
    g8 = attribute(llama64, ids, plts, batch_size=8, max_feature_nodes=10**6, prune=False)
    a = {(g1.nodes[s].node_id, g1.nodes[t].node_id): w for s, t, w in zip(*g1.edges.numpy(), strict=True)}
    b = {(g8.nodes[s].node_id, g8.nodes[t].node_id): w for s, t, w in zip(*g8.edges.numpy(), strict=True)}
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-9, atol=1e-12)
