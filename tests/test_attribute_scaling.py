"""Attribution on long prompts: the pieces made linear (not quadratic) in prompt length keep their results.

- frozen attention replays batch-shared probabilities without broadcasting them (same values and grads);
- each site's sources are indices into the decoders (same rows, spans and columns as a loop), and the
  chunked gather-and-multiply gives the dense product's edge values;
- the running influence estimate uses one merged matrix (same result as summing per-batch blocks).
"""

import copy

import numpy as np
import pytest
import torch
from test_attribute_clt import clt_from, plt_set

from sparsetrace.attribute import ReplacementModel, attribute, sources
from sparsetrace.attribute import rows as rows_mod
from sparsetrace.attribute.build import _Attributor
from sparsetrace.attribute.freeze import FreezeMode
from sparsetrace.attribute.rows import Rows
from sparsetrace.model.adapter import LanguageModel
from sparsetrace.util.memory import release_free_memory

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
    """Reference: per position, each source site's ``act * decoder row`` and columns, then the error."""
    P = at.P
    srcs = [(s, s.target_keys.index(t.key)) for s in at.feat_sites if t.key in s.target_keys]
    vecs, cols, counts = [], [], []
    for p in range(P):
        n = 0
        for s, ti in srcs:
            m = (s.pos == p).nonzero().flatten()
            if not m.numel():
                continue
            W = s.W_dec[s.feat[m]] if s.W_dec.dim() == 2 else s.W_dec[s.feat[m], ti]
            vecs.append(W * s.act[m, None])
            cols.append(at.feat_offset[s.key] + m)
            n += m.numel()
        counts.append(n)
    d = t.error.shape[-1]
    return (torch.cat(vecs) if vecs else torch.zeros(0, d, dtype=t.error.dtype)), counts, \
        (torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long))


@pytest.fixture(scope="module")
def llama64(tiny_llama):
    return LanguageModel(copy.deepcopy(tiny_llama.model).double(), tiny_llama.tokenizer, tiny_llama.model_id)


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_site_sources_match_loop(llama64, kind, monkeypatch):
    plts = plt_set(llama64)
    reps = plts[:1] + plts[2:] if kind == "plt" else [clt_from(llama64, plts, off_diagonal=0.3)]  # layer 1: none
    rm = ReplacementModel(llama64, llama64.tokenize(PROMPT), reps)
    at = _Attributor(rm, 4)
    assert at.n_feat > 0
    g = torch.Generator().manual_seed(0)
    for t in at.sites:
        src = at.src[t.key]
        rdec, counts, rcols = _site_sources_loop(at, t)
        assert [r1 - r0 for r0, r1 in src.spans] == counts
        assert torch.equal(src.cols, rcols)
        torch.testing.assert_close(src.dense(), rdec, rtol=0, atol=0)
        # the chunked gather-and-multiply equals the dense product, for any chunking
        Gp = torch.randn(at.P, rdec.shape[-1], 3, generator=g, dtype=rdec.dtype)
        ref = torch.cat([torch.cat([rdec[r0:r1] @ Gp[p] for p, (r0, r1) in enumerate(src.spans)]),
                         torch.einsum("pd,pdb->pb", t.error, Gp)])
        for chunk in (1, 5, 4096):
            monkeypatch.setattr(sources, "CHUNK_ROWS", chunk)
            src = sources.site_sources(t, at.feat_sites, at.feat_offset, t.error, at.err_offset[t.key], at.P,
                                       sources.decoder_matrix(at.feat_sites) if at.multi else None)
            assert sum(c1 - c0 for c0, c1, _, _ in src.chunks) == src.n_f
            torch.testing.assert_close(sources.edge_values(src, Gp), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("segment_edges", [1, 25, 10**9])
def test_merged_influence_matches_dense_reference(monkeypatch, segment_edges):
    """The row store's influence estimate (float32 CSC segments, rows normalised by their absolute sums)
    equals a dense float64 propagation over the same rows, however the blocks are merged into segments;
    its edges are the non-zeros, exactly, and filtering by column keeps exactly those columns' edges."""
    monkeypatch.setattr(rows_mod, "SEGMENT_EDGES", segment_edges)
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
    keep = rng.random(n_cols) < 0.5
    r2, c2, v2 = rows.arrays(keep_cols=keep)
    assert keep[c2].all() and len(c2) == int((A[keep] != 0).sum())
    assert np.all(np.diff(r2) >= 0)  # still grouped by target row
    part = np.zeros_like(A)
    part[c2, r2] = v2
    np.testing.assert_array_equal(part, np.where(keep[:, None], A, 0).astype(np.float32))
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


def test_release_free_memory_hands_pages_back():
    """On glibc, heap blocks freed between live ones stay resident until trimmed; the trim hands them back
    (elsewhere the call may do nothing)."""
    import sys

    if not sys.platform.startswith("linux"):
        assert release_free_memory() in (True, False)
        return

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    blocks, pins = [], []
    for _ in range(4000):  # 256 MB of heap-sized blocks, each followed by a small live one
        blocks.append(bytearray(64 * 1024))
        pins.append(bytearray(4096))
    del blocks
    before = rss()
    assert release_free_memory() is True
    assert rss() < before - 100 * 2**20
    del pins
