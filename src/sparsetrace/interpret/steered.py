"""Measured output effects for dashboards: steer each feature at the maxima of its top examples.

The direct-path ``top_logits`` of a dashboard (decoder row through the unembedding) ignore every later
layer; :func:`add_steered_logits` measures the change of the next-token logits when the feature's decoder
direction is added where it fired most (see :mod:`sparsetrace.intervene.steering`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..intervene.steering import steering_logit_change
from .text import TokenText, rnd

__all__ = ["add_steered_logits"]


@torch.no_grad()
def add_steered_logits(
    lm,
    dictionary,
    dashboards: dict[int, dict],
    windows: Tensor,
    features: list[int] | None = None,
    *,
    n_contexts: int = 8,
    context_len: int = 32,
    steer_scale: float = 1.0,
    n_logits: int = 10,
    use_cache: bool = True,
) -> dict[int, dict]:
    """Measured (not direct-path) output effects: add ``steer_scale × max_act × W_dec[f]`` at the
    max-activation token of the feature's top examples (contexts cut to end there) and average the
    change of the next-token logits. Adds ``steered_logits`` / ``steered_bottom_logits`` (+ ids) to each
    dashboard. Costs one forward pass of ``n_contexts`` short contexts per feature (their prefix; then the
    last token alone, clean and steered in one batch, on its cache; ``use_cache=False``: two full forwards,
    same result up to float rounding), so it is optional (the direct-path ``top_logits`` are free)."""
    text = TokenText(lm.tokenizer)
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    for f in features if features is not None else sorted(dashboards):
        dash = dashboards[f]
        ends = [(e["window"], e["start"] + e["max_pos"]) for e in dash.get("top_examples", [])[:n_contexts]]
        ends = [(w, p) for w, p in ends if p >= 1]
        if not ends or not dash.get("max_act"):
            continue
        L = min(context_len, min(p for _, p in ends))
        ids = torch.stack([windows[w, p - L + 1 : p + 1] for w, p in ends])
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos), ids], 1)
        d = steering_logit_change(lm, dictionary, f, ids, typical_act=float(dash["max_act"]), scale=steer_scale,
                                  use_cache=use_cache)
        v, i = d.topk(n_logits)
        vb, ib = d.topk(n_logits, largest=False)
        dash["steered_logits"] = [[s, rnd(x)] for s, x in zip(text(i.tolist()), v.tolist(), strict=True)]
        dash["steered_logit_ids"] = i.tolist()
        dash["steered_bottom_logits"] = [[s, rnd(x)] for s, x in zip(text(ib.tolist()), vb.tolist(), strict=True)]
        dash["steered_bottom_logit_ids"] = ib.tolist()
        dash["steered_config"] = {"n_contexts": len(ends), "context_len": L, "steer_scale": steer_scale}
    return dashboards
