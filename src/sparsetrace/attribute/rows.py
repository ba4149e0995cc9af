"""Sparse rows of an attribution graph as they are built (see :mod:`.build`): per batch of targets, the
non-zero edges as one compressed-column block (column = target row, float32 weight, int32 source index:
8 bytes an edge), which is both the store the graph's edges come from and, through its absolute values
and per-row sums, the matrix of the running influence estimate that orders the feature rows.

Memory: new blocks are merged into a segment once they hold ``SEGMENT_EDGES`` edges, or when the
estimate is taken (so a merge copies only those, never the whole store), and each propagation step
takes the absolute values of one segment at a time into a reused float32 buffer (each segment's
product is float32, summed in float64). Reading the edges out
(:meth:`Rows.arrays`) filters each segment by the columns that are kept, so edges to features that
never got a row (most of them on long prompts) are never copied."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = ["Rows", "SEGMENT_EDGES"]

SEGMENT_EDGES = 8_000_000  # pending edges merged into one segment (64 MB of weights and indices)


class Rows:
    """Accumulates sparse rows (target row -> source column) produced batch by batch, as CSC segments of
    the raw weights ``[n_cols, rows]`` with each row's sum of absolute weights."""

    def __init__(self, n_cols: int):
        self.n_cols = n_cols
        self.segments: list[tuple[int, sp.csc_matrix]] = []  # (first row, merged block)
        self.pending: list[tuple[int, sp.csc_matrix]] = []  # blocks added since the last merge
        self.sums: list[np.ndarray] = []  # per batch, each row's sum of |w|
        self.row_node: list[int] = []  # row -> column index (features) or n_cols + logit index
        self.n_rows = 0

    def add_batch(self, parts: list[tuple[Tensor, Tensor]], nb: int, row_nodes: list[int]) -> None:
        """``parts``: (values [n, nb], column ids [n]) for this batch's rows (one column of values per row)."""
        r0 = self.n_rows
        vals = torch.cat([p[0] for p in parts])
        cols = torch.cat([p[1] for p in parts])
        ci, r = (vals != 0).nonzero(as_tuple=True)
        sums = np.zeros(nb)
        if r.numel():
            v = vals[ci, r].to(torch.float32).numpy()
            c = cols[ci].to(torch.int32).numpy()
            rn = r.to(torch.int32).numpy()
            sums = np.bincount(rn, weights=np.abs(v), minlength=nb)
            self.pending.append((r0, sp.csc_matrix((v, (c, rn)), shape=(self.n_cols, nb), dtype=np.float32)))
            if sum(int(b.nnz) for _, b in self.pending) >= SEGMENT_EDGES:
                self._merge_pending()
        self.sums.append(sums)
        self.row_node.extend(row_nodes)
        self.n_rows += nb

    def _merge_pending(self) -> None:
        """The blocks added since the last call as one segment (rows without edges included as empty)."""
        if not self.pending:
            return
        first = self.pending[0][0]
        parts, r = [], first
        for r0, block in self.pending:
            if r0 > r:
                parts.append(sp.csc_matrix((self.n_cols, r0 - r), dtype=np.float32))
            parts.append(block)
            r = r0 + block.shape[1]
        self.pending.clear()
        merged = parts[0] if len(parts) == 1 else sp.hstack(parts, format="csc")
        del parts
        merged.indices = merged.indices.astype(np.int32, copy=False)
        merged.indptr = merged.indptr.astype(np.int64, copy=False)
        self.segments.append((first, merged))

    def arrays(self, keep_cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(target row, source column, weight) of every edge (``keep_cols``: a bool mask over columns, only
        the edges from columns where it is True), grouped by target row."""
        self._merge_pending()
        out_r, out_c, out_v = [], [], []
        for r0, m in self.segments:
            rows = np.repeat(np.arange(r0, r0 + m.shape[1], dtype=np.int32), np.diff(m.indptr))
            c, v = m.indices, m.data
            if keep_cols is not None:
                k = keep_cols[c]
                rows, c, v = rows[k], c[k], v[k]
                del k
            out_r.append(rows)
            out_c.append(c.astype(np.int32, copy=False))
            out_v.append(v.astype(np.float32, copy=False))
        if not out_r:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
        cat = (lambda xs: xs[0]) if len(out_r) == 1 else np.concatenate
        return cat(out_r), cat(out_c), cat(out_v)

    @property
    def n_edges(self) -> int:
        return sum(int(b.nnz) for _, b in self.segments) + sum(int(b.nnz) for _, b in self.pending)

    def influence(self, logit_w: np.ndarray) -> np.ndarray:
        """Influence of every column on the logits through the rows computed so far (each row's weights
        normalised by its sum of absolute weights)."""
        self._merge_pending()
        row_node = np.asarray(self.row_node, dtype=np.int64)
        prod = np.zeros(self.n_cols + len(logit_w))
        prod[self.n_cols:] = logit_w
        infl = np.zeros(self.n_cols)
        sums = np.concatenate(self.sums) if self.sums else np.zeros(0)
        scale = 1.0 / np.maximum(sums, 1e-30)
        buf = np.empty(max((m.nnz for _, m in self.segments), default=0), dtype=np.float32)
        for _ in range(self.n_rows + 2):
            y = prod[row_node] * scale
            x = np.zeros(self.n_cols)
            for r0, m in self.segments:
                yr = y[r0:r0 + m.shape[1]]
                if not yr.any():
                    continue
                a = buf[:m.nnz]
                np.abs(m.data, out=a)
                # float32 on both sides: a float64 vector would make scipy copy the data to float64 first
                x += sp.csc_matrix((a, m.indices, m.indptr), shape=m.shape, copy=False) @ yr.astype(np.float32)
            if not x.any():
                break
            infl += x
            prod[: self.n_cols] = x
            prod[self.n_cols:] = 0
        return infl
