"""Cross-run feature alignment: which features of two dictionaries (e.g. trained with different seeds)
are the same feature?

>>> res = align(d1, d2, densities1=dens)          # densities from dashboards / evaluation
>>> res["overall"]["fraction"], [b["fraction"] for b in res["by_density"]]
>>> write_alignment(run_dir / "align.json", res)

Similarity of feature i (run 1) and j (run 2) is ``(1 - enc_weight) * cos(W_dec1[i], W_dec2[j]) +
enc_weight * cos(W_enc1[i], W_enc2[j])``. A one-to-one matching maximising the total similarity is
found with ``scipy.optimize.linear_sum_assignment`` (the similarity matrix is built in row chunks);
a pair counts as *matched* when its combined similarity is at least ``threshold``. The fraction matched
is reported overall and per firing-density bucket of run 1 (``dead``, ``<1e-4``, ``1e-4–1e-3``,
``1e-3–1e-2``, ``>=1e-2`` by default), which turns "frequent features align across seeds, the long tail
doesn't" into numbers. The mapping is sorted by run-1 feature, so the same inputs always export the
same JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import DataError


def _weights(d) -> tuple[Tensor, Tensor]:
    if isinstance(d, dict):
        return d["W_enc"], d["W_dec"]
    return d.W_enc, d.W_dec


def _unit(w: Tensor) -> Tensor:
    w = w.detach().float().cpu()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _bucket_label(lo: float, hi: float) -> str:
    if lo == 0:
        return f"<{hi:.3g}"
    if math.isinf(hi):
        return f">={lo:.3g}"
    return f"{lo:.3g}-{hi:.3g}"


def align(
    d1,
    d2,
    *,
    densities1: Sequence[float] | Tensor | None = None,
    densities2: Sequence[float] | Tensor | None = None,
    threshold: float = 0.7,
    enc_weight: float = 0.5,
    bucket_edges: Sequence[float] | str = (1e-4, 1e-3, 1e-2),
    n_quantile_buckets: int = 4,
    chunk: int = 2048,
) -> dict:
    """Match the features of ``d1`` to those of ``d2`` (SparseDictionary or {"W_enc", "W_dec"} dicts).

    ``bucket_edges``: density edges of the run-1 buckets, or ``"quantiles"`` for ``n_quantile_buckets``
    equal-count buckets of the live (density > 0) features. Dead features always get their own bucket.
    """
    E1, D1 = _weights(d1)
    E2, D2 = _weights(d2)
    if D1.shape[1] != D2.shape[1] or E1.shape[1] != E2.shape[1]:
        raise DataError(
            f"dictionaries have different widths (W_dec {list(D1.shape)} vs {list(D2.shape)}); "
            "alignment needs dictionaries of the same model hookpoints"
        )
    if not (0.0 <= enc_weight <= 1.0):
        raise DataError(f"enc_weight={enc_weight} is invalid; expected a value in [0, 1]")
    n1, n2 = D1.shape[0], D2.shape[0]
    D1, D2, E1, E2 = _unit(D1), _unit(D2), _unit(E1), _unit(E2)
    t0 = time.perf_counter()
    sim = np.empty((n1, n2), dtype=np.float32)
    best_dec = torch.empty(n1)
    for s in range(0, n1, chunk):
        dec = D1[s : s + chunk] @ D2.t()
        enc = E1[s : s + chunk] @ E2.t()
        best_dec[s : s + chunk] = dec.max(1).values
        sim[s : s + chunk] = ((1 - enc_weight) * dec + enc_weight * enc).numpy()
    rows, cols = linear_sum_assignment(sim, maximize=True)
    seconds = time.perf_counter() - t0
    match = np.full(n1, -1, dtype=np.int64)
    match[rows] = cols
    combined = np.full(n1, np.nan, dtype=np.float64)
    combined[rows] = sim[rows, cols]
    r_t, c_t = torch.from_numpy(rows), torch.from_numpy(cols)
    dec_cos = torch.full((n1,), float("nan"))
    enc_cos = torch.full((n1,), float("nan"))
    dec_cos[r_t] = (D1[r_t] * D2[c_t]).sum(-1)
    enc_cos[r_t] = (E1[r_t] * E2[c_t]).sum(-1)
    matched = np.nan_to_num(combined, nan=-1.0) >= threshold

    def summary(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        m = int((matched & mask).sum())
        vals = combined[mask & (match >= 0)]
        return {
            "n": n,
            "matched": m,
            "fraction": m / n if n else 0.0,
            "mean_cosine": float(np.mean(vals)) if vals.size else 0.0,
            "fraction_dec_max_cos_above": float((best_dec.numpy()[mask] >= threshold).mean()) if n else 0.0,
        }

    result: dict = {
        "format": "sparsetrace-align/1",
        "bucket_edges": bucket_edges if isinstance(bucket_edges, str) else [float(e) for e in bucket_edges],
        "n_features": [int(n1), int(n2)],
        "threshold": threshold,
        "enc_weight": enc_weight,
        "similarity": "(1 - enc_weight) * decoder cosine + enc_weight * encoder cosine",
        "overall": summary(np.ones(n1, dtype=bool)),
        "seconds": round(seconds, 2),
    }
    dens1 = None
    if densities1 is not None:
        dens1 = np.asarray(torch.as_tensor(densities1, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
        if dens1.shape != (n1,):
            raise DataError(f"densities1 has shape {list(dens1.shape)}; expected [{n1}]")
        if isinstance(bucket_edges, str):
            if bucket_edges != "quantiles":
                raise DataError(f"bucket_edges={bucket_edges!r}; expected a list of densities or 'quantiles'")
            live = dens1[dens1 > 0]
            qs = np.quantile(live, np.linspace(0, 1, n_quantile_buckets + 1)[1:-1]) if live.size else []
            inner = sorted({float(q) for q in qs if q > 0})
        else:
            inner = [float(e) for e in bucket_edges]
        edges = [0.0, *inner, math.inf]
        buckets = [{"label": "dead", "range": [0.0, 0.0], **summary(dens1 <= 0)}]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            mask = (dens1 > 0) & (dens1 >= lo) & (dens1 < hi)
            buckets.append({"label": _bucket_label(lo, hi), "range": [lo, hi if math.isfinite(hi) else None], **summary(mask)})
        result["by_density"] = buckets
    dens2 = None
    if densities2 is not None:
        dens2 = np.asarray(torch.as_tensor(densities2, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
        if dens2.shape != (n2,):
            raise DataError(f"densities2 has shape {list(dens2.shape)}; expected [{n2}]")
    mapping = []
    for i in range(n1):
        j = int(match[i])
        entry = {
            "feature": i,
            "match": j if j >= 0 else None,
            "cosine": round(float(combined[i]), 5) if j >= 0 else None,
            "dec_cos": round(float(dec_cos[i]), 5) if j >= 0 else None,
            "enc_cos": round(float(enc_cos[i]), 5) if j >= 0 else None,
            "matched": bool(matched[i]),
        }
        if dens1 is not None:
            entry["density"] = float(f"{dens1[i]:.4g}")
        if dens2 is not None and j >= 0:
            entry["match_density"] = float(f"{dens2[j]:.4g}")
        mapping.append(entry)
    result["mapping"] = mapping
    return result


def write_alignment(out_path: str | Path, result: dict, **meta) -> Path:
    """Write an alignment result as JSON (``align.json``); extra keyword arguments go under "meta"."""
    from ..dictionary.io import atomic_write_text

    out = dict(result)
    if meta:
        out["meta"] = {**out.get("meta", {}), **meta}
    path = Path(out_path)
    if path.is_dir():
        path = path / "align.json"
    atomic_write_text(path, json.dumps(out, allow_nan=False, separators=(",", ":")))
    return path
