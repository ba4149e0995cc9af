"""Circuit selection by effect: the first-order estimate of the ablation `verify` performs, per feature and
token (position from the end, role, or every position), from one forward and backward pass."""

from __future__ import annotations

from ..model.adapter import LanguageModel


def effect_scores(lm: LanguageModel, dictionaries: list, batch, task, mode: str, positions: str) -> dict[str, float]:
    """{node id: mean over prompts of the estimated drop of the task metric when that feature is ablated
    (``mode``) at that position}: ``-(a_ablated - a) . dm/da`` from one forward + backward of the batch."""
    import torch

    from ..model.hookpoints import Hookpoint
    from .core import bos_position_mask, feature_acts

    ids = batch.clean.to(lm.device)
    real = batch.mask.to(lm.device) & ~bos_position_mask(lm, ids)  # [B, T] real, non-BOS tokens
    sites = {}
    for d in dictionaries:
        sites[int(d.cfg.layer)] = (d, Hookpoint(d.cfg.hookpoint_in, int(d.cfg.layer)),
                                   Hookpoint(d.cfg.hookpoint_out, int(d.cfg.layer)))
    deltas: dict[Hookpoint, torch.Tensor] = {}

    def add_delta(hp):
        def edit(x):
            deltas[hp] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[hp]
        return edit

    edits = {hp_out: add_delta(hp_out) for _, _, hp_out in sites.values()}
    out = lm.run(ids, read=[hp_in for _, hp_in, _ in sites.values()], edit=edits, grad=True)
    metric = task.metric_per_example(out.logits, batch).float().mean()
    grads = torch.autograd.grad(metric, [deltas[hp_out] for _, _, hp_out in sites.values()])
    corrupted = feature_acts(lm, dictionaries, batch.corrupted.to(lm.device)) if mode == "patch" else None
    B, T = ids.shape
    last = batch.last_pos.to(lm.device)
    rel = torch.arange(T, device=ids.device)[None, :] - last[:, None] - 1  # [B, T] position from the end
    scores: dict[str, float] = {}
    with torch.no_grad():
        for (layer, (d, hp_in, _)), g in zip(sites.items(), grads, strict=True):
            x = out.acts[hp_in].to(d.W_enc.dtype)
            a = d.features(x.reshape(B * T, -1)).float().view(B, T, -1)  # [B, T, F]
            if mode == "patch":
                target = corrupted[layer].float()
            elif mode == "mean":
                target = (a * real[..., None]).sum((0, 1)) / real.sum().clamp_min(1)
            else:
                target = torch.zeros(())
            dm_da = g.float() @ d.W_dec.detach().float().t()  # [B, T, F]
            # estimated m(clean) - m(ablated); m is the batch mean, so each prompt's term already has its 1/B
            # only active features are circuit candidates (as in the graphs), so a node is always a feature
            # the prompt uses, never the absence of one
            drop = -(target - a) * dm_da * (real[..., None] & (a > 0))
            if positions == "any":
                per = drop.sum((0, 1))  # [F]
                nz = per.nonzero().flatten().tolist()
                for f in nz:
                    scores[f"{layer}:{f}"] = float(per[f])
            elif positions == "role":
                # the feature at the token of each role, wherever that token sits in each prompt
                rows = torch.arange(B, device=ids.device)
                for role, pos in batch.roles.items():
                    pos = pos.to(ids.device)
                    ok = pos >= 0
                    per = drop[rows[ok], pos[ok]].sum(0)
                    for f in per.nonzero().flatten().tolist():
                        scores[f"L{layer}/F{f}@{role}"] = float(per[f])
            else:
                # same-length prompts: aggregate by position from the end
                for r in sorted(set(rel[real].tolist())):
                    sel = (rel == r) & real
                    per = drop[sel].sum(0)
                    for f in per.nonzero().flatten().tolist():
                        scores[f"L{layer}/F{f}@{int(r)}"] = float(per[f])
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))
