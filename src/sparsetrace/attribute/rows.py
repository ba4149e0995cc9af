"""Sparse rows of an attribution graph as they are built (see :mod:`.build`): per batch of targets, the
non-zero edges (int32 target row, int32 source column, float32 weight) and, for the running influence
estimate that orders the feature rows, the row-normalised absolute weights."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = ["Rows"]


class Rows:
    """Accumulates sparse rows (target row -> source column) produced batch by batch, plus one CSC
    block of row-normalised absolute weights per batch (for the running influence estimate; merged
    into one matrix when the estimate is taken)."""

    def __init__(self, n_cols: int):
        self.n_cols = n_cols
        self.rows: list[Tensor] = []
        self.cols: list[Tensor] = []
        self.vals: list[Tensor] = []
        self.blocks: list[tuple[int, sp.csc_matrix]] = []  # (first row, normalised |w| block)
        self.row_node: list[int] = []  # row -> column index (features) or n_cols + logit index
        self.n_rows = 0

    def add_batch(self, parts: list[tuple[Tensor, Tensor]], nb: int, row_nodes: list[int], *,
                  blocks: bool = True) -> None:
        """``parts``: (values [n, nb], column ids [n]) for this batch's rows (one column of values per row)."""
        r0 = self.n_rows
        vals = torch.cat([p[0] for p in parts])
        cols = torch.cat([p[1] for p in parts])
        ci, r = (vals != 0).nonzero(as_tuple=True)
        if r.numel():
            v = vals[ci, r].to(torch.float32)
            c = cols[ci].to(torch.int32)
            r = r.to(torch.int32)
            self.rows.append(r + r0)
            self.cols.append(c)
            self.vals.append(v)
            if blocks:
                a = v.abs().double().numpy()
                rn, cn = r.numpy(), c.numpy()
                sums = np.bincount(rn, weights=a, minlength=nb)
                a = a / np.maximum(sums[rn], 1e-30)
                self.blocks.append((r0, sp.csc_matrix((a, (cn, rn)), shape=(self.n_cols, nb))))
        self.row_node.extend(row_nodes)
        self.n_rows += nb

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.rows:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
        return (torch.cat(self.rows).numpy(), torch.cat(self.cols).numpy(), torch.cat(self.vals).numpy())

    @property
    def n_edges(self) -> int:
        return sum(int(r.numel()) for r in self.rows)

    def _merged(self) -> sp.csc_matrix:
        """All normalised blocks as one [n_cols, n_rows] CSC matrix (merged once per call, so each
        propagation step is one mat-vec: per-block mat-vecs each allocate and sum an n_cols vector)."""
        if len(self.blocks) > 1 or (self.blocks and self.blocks[0][1].shape[1] != self.n_rows):
            parts, r = [], 0
            for r0, block in self.blocks:
                if r0 > r:  # batches without any edge
                    parts.append(sp.csc_matrix((self.n_cols, r0 - r)))
                parts.append(block)
                r = r0 + block.shape[1]
            if r < self.n_rows:
                parts.append(sp.csc_matrix((self.n_cols, self.n_rows - r)))
            self.blocks = [(0, sp.hstack(parts, format="csc"))]
        return self.blocks[0][1] if self.blocks else sp.csc_matrix((self.n_cols, self.n_rows))

    def influence(self, logit_w: np.ndarray) -> np.ndarray:
        """Influence of every column on the logits through the rows computed so far."""
        row_node = np.asarray(self.row_node, dtype=np.int64)
        prod = np.zeros(self.n_cols + len(logit_w))
        prod[self.n_cols:] = logit_w
        infl = np.zeros(self.n_cols)
        M = self._merged()
        for _ in range(self.n_rows + 2):
            x = M @ prod[row_node]
            if not x.any():
                break
            infl += x
            prod[: self.n_cols] = x
            prod[self.n_cols:] = 0
        return infl
