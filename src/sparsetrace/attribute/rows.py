"""Sparse rows of an attribution graph as they are built (see :mod:`.build`): per batch of targets, the
non-zero edges as one compressed-column block (column = target row, float32 weight, int32 source index:
8 bytes an edge), which is both the store the graph's edges come from and, through its absolute values
and per-row sums, the matrix of the running influence estimate that orders the feature rows."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = ["Rows"]


class Rows:
    """Accumulates sparse rows (target row -> source column) produced batch by batch, as CSC blocks of
    the raw weights ``[n_cols, rows of the batch]`` with each row's sum of absolute weights beside them
    (merged into one matrix when the influence estimate is taken or the edges are read)."""

    def __init__(self, n_cols: int):
        self.n_cols = n_cols
        self.blocks: list[tuple[int, sp.csc_matrix, np.ndarray]] = []  # (first row, raw block, |w| row sums)
        self.row_node: list[int] = []  # row -> column index (features) or n_cols + logit index
        self.n_rows = 0

    def add_batch(self, parts: list[tuple[Tensor, Tensor]], nb: int, row_nodes: list[int]) -> None:
        """``parts``: (values [n, nb], column ids [n]) for this batch's rows (one column of values per row)."""
        r0 = self.n_rows
        vals = torch.cat([p[0] for p in parts])
        cols = torch.cat([p[1] for p in parts])
        ci, r = (vals != 0).nonzero(as_tuple=True)
        if r.numel():
            v = vals[ci, r].to(torch.float32).numpy()
            c = cols[ci].to(torch.int32).numpy()
            rn = r.to(torch.int32).numpy()
            sums = np.bincount(rn, weights=np.abs(v), minlength=nb)
            block = sp.csc_matrix((v, (c, rn)), shape=(self.n_cols, nb), dtype=np.float32)
            self.blocks.append((r0, block, sums))
        self.row_node.extend(row_nodes)
        self.n_rows += nb

    def _merged(self) -> tuple[sp.csc_matrix, np.ndarray]:
        """All blocks as one [n_cols, n_rows] CSC matrix and the row sums (merged once per call, so each
        propagation step is one mat-vec: per-block mat-vecs each allocate and sum an n_cols vector)."""
        if len(self.blocks) > 1 or (self.blocks and self.blocks[0][1].shape[1] != self.n_rows):
            parts, sums, r = [], np.zeros(self.n_rows), 0
            for r0, block, s in self.blocks:
                if r0 > r:  # batches without any edge
                    parts.append(sp.csc_matrix((self.n_cols, r0 - r), dtype=np.float32))
                parts.append(block)
                sums[r0:r0 + block.shape[1]] = s
                r = r0 + block.shape[1]
            if r < self.n_rows:
                parts.append(sp.csc_matrix((self.n_cols, self.n_rows - r), dtype=np.float32))
            merged = sp.hstack(parts, format="csc")
            self.blocks.clear()  # free the parts before anything else is allocated
            self.blocks.append((0, merged, sums))
        if not self.blocks:
            return sp.csc_matrix((self.n_cols, self.n_rows), dtype=np.float32), np.zeros(self.n_rows)
        return self.blocks[0][1], self.blocks[0][2]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(target row, source column, weight) of every edge, grouped by target row (views of the store)."""
        m, _ = self._merged()
        rows = np.repeat(np.arange(m.shape[1], dtype=np.int32), np.diff(m.indptr))
        return rows, m.indices.astype(np.int32, copy=False), m.data.astype(np.float32, copy=False)

    @property
    def n_edges(self) -> int:
        return sum(int(b.nnz) for _, b, _ in self.blocks)

    def influence(self, logit_w: np.ndarray) -> np.ndarray:
        """Influence of every column on the logits through the rows computed so far (each row's weights
        normalised by its sum of absolute weights)."""
        row_node = np.asarray(self.row_node, dtype=np.int64)
        prod = np.zeros(self.n_cols + len(logit_w))
        prod[self.n_cols:] = logit_w
        infl = np.zeros(self.n_cols)
        m, sums = self._merged()
        scale = 1.0 / np.maximum(sums, 1e-30)
        m_abs = sp.csc_matrix((np.abs(m.data), m.indices, m.indptr), shape=m.shape)
        for _ in range(self.n_rows + 2):
            x = m_abs @ (prod[row_node] * scale)
            if not x.any():
                break
            infl += x
            prod[: self.n_cols] = x
            prod[self.n_cols:] = 0
        return infl
