"""The full replacement's section of the report: its summary figures and an inline SVG of the error
growth with depth (CE and KL as the first k replaced layers are substituted), drawn here in Python.

Reads eval.json's ``replacement`` object (:mod:`sparsetrace.evaluate.replacement`); anything malformed
gives no section rather than a broken one.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

__all__ = ["depth_svg", "replacement_summary"]

_KEYS = ("kind", "clean_ce", "ce", "ce_increase", "ce_zero_ablation", "ce_mean_ablation", "ce_recovered",
         "ce_recovered_vs_mean", "kl", "top1_agreement", "n_windows", "mean_ablation_reference", "seconds")
W, H = 300, 210  # one panel
PAD_L, PAD_R, PAD_T, PAD_B = 52, 12, 26, 36


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _panel(x0: float, title: str, ks: list[int], ys: list[float], band: list[tuple[float, float]] | None,
           ref: tuple[float, str] | None, cls: str) -> str:
    lo = min([*ys, *(b[0] for b in band or []), *([ref[0]] if ref else [])])
    hi = max([*ys, *(b[1] for b in band or []), *([ref[0]] if ref else [])])
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    kmax = max(ks[-1], 2)

    def px(k: float) -> float:
        return x0 + PAD_L + (k - 1) / (kmax - 1) * (W - PAD_L - PAD_R)

    def py(y: float) -> float:
        return PAD_T + (hi - y) / (hi - lo) * (H - PAD_T - PAD_B)

    out = [f'<text class="dp-title" x="{x0 + PAD_L}" y="16">{escape(title)}</text>',
           f'<rect class="dp-frame" x="{x0 + PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" '
           f'height="{H - PAD_T - PAD_B}" fill="none" stroke="#999"/>']
    for t in _ticks(lo, hi):
        out.append(f'<text class="dp-tick" x="{x0 + PAD_L - 4}" y="{py(t) + 3:.1f}" text-anchor="end">'
                   f'{t:.3g}</text>')
    for k in sorted({1, *range(5, kmax + 1, 5), kmax}):
        out.append(f'<text class="dp-tick" x="{px(k):.1f}" y="{H - PAD_B + 13}" text-anchor="middle">{k}</text>')
    out.append(f'<text class="dp-axis" x="{x0 + (W + PAD_L) / 2:.0f}" y="{H - 6}" text-anchor="middle">'
               f'first k replaced layers substituted</text>')
    if band:
        pts = [(px(k), py(b[1])) for k, b in zip(ks, band, strict=True)]
        pts += [(px(k), py(b[0])) for k, b in reversed(list(zip(ks, band, strict=True)))]
        out.append('<polygon class="dp-band" fill="#88aadd" fill-opacity="0.3" stroke="none" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
    if ref:
        out.append(f'<line class="dp-ref" x1="{x0 + PAD_L}" x2="{x0 + W - PAD_R}" y1="{py(ref[0]):.1f}" '
                   f'y2="{py(ref[0]):.1f}" stroke="#888" stroke-dasharray="4 3"/>'
                   f'<text class="dp-tick" x="{x0 + W - PAD_R - 2}" y="{py(ref[0]) - 3:.1f}" text-anchor="end">'
                   f'{escape(ref[1])}</text>')
    line = " ".join(f"{px(k):.1f},{py(y):.1f}" for k, y in zip(ks, ys, strict=True))
    out.append(f'<polyline class="{cls}" fill="none" stroke="#2255aa" stroke-width="1.6" points="{line}"/>')
    for k, y in zip(ks, ys, strict=True):
        out.append(f'<circle class="dp-dot" cx="{px(k):.1f}" cy="{py(y):.1f}" r="2.2" fill="#2255aa">'
                   f'<title>k={k}: {y:.4g}</title></circle>')
    return "".join(out)


def depth_svg(by_depth: list[dict], clean_ce: float | None) -> str | None:
    """Two panels, CE and KL(clean || substituted) against k, with their bootstrap intervals as bands."""
    rows = [r for r in by_depth if isinstance(r, dict) and isinstance(r.get("k"), int)
            and _num(r.get("ce")) is not None and _num(r.get("kl")) is not None]
    if not rows:
        return None
    ks = [r["k"] for r in rows]

    def band(key: str) -> list[tuple[float, float]] | None:
        cis = [r.get(f"{key}_ci") for r in rows]
        if all(isinstance(c, list) and len(c) == 2 and all(_num(v) is not None for v in c) for c in cis):
            return [(float(c[0]), float(c[1])) for c in cis]
        return None

    ref = (clean_ce, f"clean CE {clean_ce:.3f}") if _num(clean_ce) is not None else None
    body = (_panel(0, "CE (nats/token)", ks, [float(r["ce"]) for r in rows], band("ce"), ref, "dp-line dp-ce")
            + _panel(W, "KL to the clean model (nats/token)", ks, [float(r["kl"]) for r in rows], band("kl"),
                     (0.0, "0"), "dp-line dp-kl"))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="depth-plot" viewBox="0 0 {2 * W} {H}" '
            f'width="{2 * W}" height="{H}" role="img" aria-label="error growth with depth" '
            f'font-family="sans-serif" font-size="10">{body}</svg>')


def replacement_summary(eval_data: dict | None) -> dict | None:
    """What the report shows of eval.json's ``replacement`` (None when there is none)."""
    rep = (eval_data or {}).get("replacement")
    if not isinstance(rep, dict):
        return None
    out: dict[str, Any] = {k: rep.get(k) for k in _KEYS if isinstance(rep.get(k), (int, float, str))}
    layers = rep.get("layers")
    out["layers"] = [x for x in layers if isinstance(x, int)] if isinstance(layers, list) else []
    by_depth = [r for r in rep.get("by_depth") or [] if isinstance(r, dict)]
    out["by_depth"] = [{k: r.get(k) for k in ("k", "last_layer", "ce", "ce_increase", "kl", "top1_agreement")}
                       for r in by_depth]
    nmse = rep.get("nmse_by_layer")
    out["nmse_by_layer"] = {str(k): v for k, v in nmse.items() if _num(v) is not None} if isinstance(nmse, dict) else {}
    out["svg"] = depth_svg(by_depth, _num(rep.get("clean_ce")))
    return out
