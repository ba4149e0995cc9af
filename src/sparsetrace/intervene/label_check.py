"""Does steering a feature raise the logits of the tokens its label predicts? (a causal check of one label)"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DataError
from .core import LayerIntervention, run_with_interventions
from .ops import steering_vector


def label_intervention_check(
    lm,
    dictionary,
    feature,
    prompts: str | Sequence[str],
    tokens: Sequence[str | int],
    *,
    scale: float = 1.0,
    typical_act: float | None = None,
    threshold: float = 0.9,
    top_k: int = 10,
) -> dict:
    """Does steering the feature raise the logits of ``tokens`` (e.g. the tokens its label predicts)?

    For each prompt the feature's steering vector (see :func:`steering_vector`) is added at every
    position and the next-token logits at the last position are compared with the clean ones.
    Returns per token the mean logit change, the change relative to the mean change over the vocabulary
    (``delta_rel``) and its percentile among all tokens' changes; ``passes`` when the tokens' mean
    percentile is >= ``threshold`` and their mean relative change is > 0. Also lists the ``top_k`` most
    promoted / suppressed tokens.
    """
    from .ops import _resolve_feature

    d, f = _resolve_feature(dictionary, feature)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise DataError("label_intervention_check needs at least one prompt")
    tok_ids = [t if isinstance(t, int) else lm.single_token_id(t) for t in tokens]
    if not tok_ids:
        raise DataError("label_intervention_check needs at least one token")
    layer = int(d.cfg.layer)
    deltas = []
    for p in prompts:
        ids = lm.tokenize(p)
        vec = steering_vector(lm, d, f, scale, typical_act=typical_act, ids=ids)
        clean = lm.run(ids).logits[0, -1].float()
        steered = (
            run_with_interventions(lm, {layer: d}, ids, {layer: LayerIntervention(add=vec)})
            .logits[0, -1]
            .float()
        )
        deltas.append(steered - clean)
    delta = torch.stack(deltas)  # [prompts, vocab]
    rel = delta - delta.mean(-1, keepdim=True)
    pct = torch.stack([(row[None, :] < row[tok_ids][:, None]).float().mean(-1) for row in delta])  # [P, T]
    per_token = []
    for j, tid in enumerate(tok_ids):
        per_token.append(
            {
                "token": lm.tokenizer.decode([tid]),
                "token_id": int(tid),
                "delta_logit": float(delta[:, tid].mean()),
                "delta_rel": float(rel[:, tid].mean()),
                "percentile": float(pct[:, j].mean()),
            }
        )
    mean_rel = rel.mean(0)
    k = min(top_k, mean_rel.numel())
    top = mean_rel.topk(k)
    bottom = (-mean_rel).topk(k)
    mean_pct = sum(t["percentile"] for t in per_token) / len(per_token)
    mean_delta_rel = sum(t["delta_rel"] for t in per_token) / len(per_token)
    return {
        "layer": layer,
        "feature": int(f),
        "scale": float(scale),
        "typical_act": typical_act,
        "n_prompts": len(prompts),
        "tokens": per_token,
        "mean_percentile": mean_pct,
        "mean_delta_rel": mean_delta_rel,
        "passes": bool(mean_pct >= threshold and mean_delta_rel > 0),
        "top_promoted": [
            [lm.tokenizer.decode([int(i)]), float(v)] for v, i in zip(top.values, top.indices, strict=True)
        ],
        "top_suppressed": [
            [lm.tokenizer.decode([int(i)]), -float(v)]
            for v, i in zip(bottom.values, bottom.indices, strict=True)
        ],
    }
