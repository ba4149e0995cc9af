"""What writes into each leaf of the replacement model, and the edge values of a batch of rows there.

A leaf (an MLP output, a residual SAE site, or the embeddings) is written by the active features of
every dictionary that decodes into it, plus one constant per position (the site's error, or the
embedding). The edge from a source to a batch of targets is ``act * <decoder row, gradient at the
source's position>`` for a feature and ``<constant, gradient>`` for the constant.

:class:`SiteSources` keeps only indices: each feature's row in a decoder matrix (the site's own
``W_dec``, or for a cross-layer transcoder one flat matrix of every layer's decoder rows), its
activation and its column, sorted by position. :func:`edge_values` gathers the rows of a few positions
at a time into a small buffer (a few MB: it stays in cache) and multiplies each position's rows with
the gradient there. Materialising ``act * W_dec[f]`` for every active feature instead costs
``n_active * d_model`` floats per site: 3 GB at 1,024 tokens on 30 layers of SmolLM2, and for a
cross-layer transcoder once per layer a feature writes to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CHUNK_ROWS", "SiteSources", "decoder_matrix", "edge_values", "site_sources"]

CHUNK_ROWS = 2048  # decoder rows gathered at once (x d_model floats: ~4.7 MB at d_model 576)


@dataclass
class SiteSources:
    """The sources of one leaf, feature rows sorted by (position, source site)."""

    W: Tensor | None  # [R, d] decoder rows the features index into (None: no feature writes here)
    rows: Tensor  # [n_f] long: each feature's row in W
    scale: Tensor  # [n_f] its activation
    cols: Tensor  # [n_f] long: its column in the graph builder's numbering
    spans: list[tuple[int, int]]  # per position: (first, end) of its feature rows
    chunks: list[tuple[int, int, int, int]]  # (first row, end row, first position, end position)
    max_chunk: int  # rows of the largest chunk
    const: Tensor  # [P, d] the error (or embedding) vector at each position
    const_cols: Tensor  # [P] long: their columns

    @property
    def n_f(self) -> int:
        return int(self.rows.numel())

    def dense(self) -> Tensor:
        """``act * decoder row`` of every feature row (for tests and small prompts)."""
        if self.W is None:
            return self.const.new_zeros(0, self.const.shape[-1])
        return self.W[self.rows] * self.scale[:, None]


def decoder_matrix(sites) -> tuple[Tensor | None, dict[str, int]]:
    """For cross-layer transcoders (decoders ``[F, n_targets, d]``): every site's decoder rows in one
    flat ``[sum F * n_targets, d]`` matrix, and each site's first row in it. Row ``f * n_targets + i`` of a
    site is feature ``f``'s write to its ``i``-th target."""
    if not sites:
        return None, {}
    base, off = {}, 0
    for s in sites:
        base[s.key] = off
        off += s.W_dec.shape[0] * (s.W_dec.shape[1] if s.W_dec.dim() == 3 else 1)
    flat = torch.cat([s.W_dec.reshape(-1, s.W_dec.shape[-1]) for s in sites])
    return flat, base


def site_sources(t, feat_sites, feat_offset: dict[str, int], const: Tensor, const_col0: int, n_pos: int,
                 flat: tuple[Tensor | None, dict[str, int]] | None = None) -> SiteSources:
    """The sources of leaf ``t`` (a site, or None for the embeddings): the features of every site in
    ``feat_sites`` that write to it, numbered from ``feat_offset[site]``, and the per-position constant
    ``const`` with columns from ``const_col0``. ``flat`` (from :func:`decoder_matrix`) when a source
    writes to several sites; otherwise each leaf has one source, its own dictionary."""
    P = n_pos
    key = None if t is None else t.key
    srcs = [(s, s.target_keys.index(key)) for s in feat_sites if key in s.target_keys]
    rows, scale, cols, pos, rank = [], [], [], [], []
    W = None
    for j, (s, ti) in enumerate(srcs):
        if flat is not None:
            n_t = s.W_dec.shape[1] if s.W_dec.dim() == 3 else 1
            rows.append(flat[1][s.key] + s.feat.cpu() * n_t + ti)
            W = flat[0]
        else:
            assert len(srcs) == 1 and s.W_dec.dim() == 2, "a leaf with several sources needs the flat decoder matrix"
            rows.append(s.feat.cpu())
            W = s.W_dec
        scale.append(s.act)
        cols.append(feat_offset[s.key] + torch.arange(s.n_active))
        p = s.pos.cpu()
        pos.append(p)
        rank.append(p * len(srcs) + j)  # sort key: position, then source site (stable within a site)
    if rows:
        order = torch.argsort(torch.cat(rank), stable=True)
        f_pos = torch.cat(pos)[order]
        rows_t, cols_t = torch.cat(rows)[order], torch.cat(cols)[order]
        scale_t = torch.cat(scale)[order.to(const.device)].to(const.dtype)
        counts = torch.bincount(f_pos, minlength=P)
    else:
        rows_t = cols_t = torch.zeros(0, dtype=torch.long)
        scale_t = const.new_zeros(0)
        counts = torch.zeros(P, dtype=torch.long)
    ends = counts.cumsum(0)
    spans = list(zip((ends - counts).tolist(), ends.tolist(), strict=True))
    chunks = _chunks(spans)
    return SiteSources(W, rows_t.to(const.device), scale_t, cols_t, spans, chunks,
                       max((c1 - c0 for c0, c1, _, _ in chunks), default=0), const.contiguous(), const_col0 + torch.arange(P))


def _chunks(spans: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Consecutive positions grouped into chunks: a chunk ends at the first position that brings it to
    ``CHUNK_ROWS`` rows or more (so one can exceed it by a position's rows); chunks without rows are dropped."""
    out, p0 = [], 0
    for p, (_, r1) in enumerate(spans):
        if r1 - spans[p0][0] >= CHUNK_ROWS or p == len(spans) - 1:
            if r1 > spans[p0][0]:
                out.append((spans[p0][0], r1, p0, p + 1))
            p0 = p + 1
    return out


def edge_values(src: SiteSources, Gp: Tensor, buf: Tensor | None = None) -> Tensor:
    """``[n_f + P, nb]``: the edge values of each source of ``src`` (feature rows, then the constants)
    to ``nb`` targets whose gradients at the leaf are ``Gp`` ``[P, d, nb]`` (in ``src.const``'s dtype).
    ``buf``: a ``[>= src.max_chunk, d]`` scratch buffer of the decoders' dtype, reused across calls
    (allocated here when missing or too small)."""
    n_f = src.n_f
    P, _, nb = Gp.shape
    vals = torch.empty(n_f + P, nb, dtype=Gp.dtype, device=Gp.device)
    if n_f:
        if buf is None or buf.shape[0] < src.max_chunk or buf.dtype != src.W.dtype or buf.device != src.W.device:
            buf = torch.empty(src.max_chunk, src.W.shape[1], dtype=src.W.dtype, device=src.W.device)
        for c0, c1, p0, p1 in src.chunks:
            g = buf[: c1 - c0]
            torch.index_select(src.W, 0, src.rows[c0:c1], out=g)
            for p in range(p0, p1):
                r0, r1 = src.spans[p]
                if r1 > r0:
                    torch.mm(g[r0 - c0:r1 - c0], Gp[p], out=vals[r0:r1])
        vals[:n_f].mul_(src.scale[:, None])
    torch.bmm(src.const[:, None, :], Gp, out=vals[n_f:].view(P, 1, nb))
    return vals
