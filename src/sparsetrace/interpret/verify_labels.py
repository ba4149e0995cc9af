"""Causal verification of feature labels, from the label's text alone, on contexts that did not write it.

The verifier never sees the dashboard the label was written from: it reads the label's *text*
(:func:`~.predictions.parse_label`: the words it quotes, the context it names, the kind of token it names,
the outputs it says the feature promotes) and tests those claims on held-out token windows that the
caller keeps disjoint from the label-writing windows (``explain`` records both).

(a) **activation test**: held-out contexts that end in one of the label's words (each spelled as written,
    and with a leading space when that is one token; up to 3 tokens; preceded by the label's context when it names one; when the
    label quotes no word, the most frequent held-out tokens of the category it names) activate the
    feature (at that last token) more than the *same* contexts with the last token swapped for a
    frequency-matched other token (chosen, with a seeded generator, among the ``n_freq_neighbors``
    tokens of nearest held-out frequency that are not a case/space variant of a key token). Contexts
    are natural occurrences in held-out windows; when there are fewer than ``min_natural``, the rest
    are made by writing the word into random held-out positions. Passed when a one-sided Mann–Whitney U
    test gives ``p < alpha`` and the rank-biserial effect size is at least ``min_effect``.

(b) **output (steering) test**: adding ``steer_scale × max_act × W_dec[f]`` to the dictionary's output
    hookpoint at the last position of those held-out contexts (the real model runs on; nothing is
    replaced) should raise the logits of the tokens the label *says* it promotes (the first token of
    each promoted word as written, and the word with a leading space when that is one token) more than those of random tokens. The
    ranking is measured afresh on the held-out contexts; the ranking that wrote the label (steering on
    the top examples of the writing windows, or the direct logit effects) is never read. The promoted
    tokens' logit change, averaged over contexts, is ranked among the same average for ``n_random``
    random tokens (``percentile``; ``empirical_p`` = (1 + #random ≥ it) / (1 + n_random)), and per
    context its excess over the random tokens' mean is tested for consistency. Passed when the
    percentile is at least ``min_percentile``, the mean change is positive, and a one-sided Wilcoxon
    signed-rank test of the per-context excess gives ``p < alpha``.

Verdicts: ``verified`` (both pass), ``associative`` (activation passes, output fails), ``failed``
(activation fails). Each result records the parsed prediction and the held-out (window, position) of
every context used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from scipy import stats
from torch import Tensor

from ..errors import DataError
from ..intervene.steering import clean_and_steered, steer_last
from ..model.hookpoints import Hookpoint
from ..model.prefix_cache import PrefixCache, harvest, last_logits, run_sharing_prefix
from .dashboards import encode_subset
from .labels import Label, _category
from .predictions import Prediction, parse_label, promoted_token_ids, word_token_sequences

VERDICTS = ("verified", "associative", "failed")


@dataclass
class VerifyConfig:
    n_contexts: int = 20
    context_len: int = 16
    use_context: bool = True
    min_natural: int = 8
    alpha: float = 0.01
    min_effect: float = 0.3
    steer_scale: float = 1.0
    n_random: int = 1000
    min_percentile: float = 0.99
    n_freq_neighbors: int = 20
    max_category_tokens: int = 50
    seed: int = 0


class LabelVerifier:
    """Runs both tests for labels of one dictionary against held-out token windows [n, ctx].

    The key contexts, their controls (the same contexts with another last token) and the steered run
    share everything but the last position, so by default the prefix is run once and its key/value cache
    reused for the last token of each (:class:`~.dashboards.PrefixCache`); ``use_cache=False`` runs full
    forward passes instead (same results up to float rounding; also the automatic fallback for models
    whose cache cannot be reused)."""

    def __init__(self, lm, dictionary, heldout: Tensor, cfg: VerifyConfig | None = None, *, use_cache: bool = True):
        self.lm, self.d = lm, dictionary.eval()
        self.cfg = cfg or VerifyConfig()
        self.use_cache = use_cache
        if heldout.dim() != 2 or heldout.shape[1] <= self.cfg.context_len:
            raise DataError(
                f"held-out windows must be [n, ctx] with ctx > context_len={self.cfg.context_len}, "
                f"got {list(heldout.shape)}"
            )
        self.heldout = heldout.cpu()
        self.vocab = int(lm.vocab_size)
        self.bos = getattr(lm.tokenizer, "bos_token_id", None)
        special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
        if self.bos is not None:
            special.add(int(self.bos))
        self.special = special
        counts = torch.bincount(self.heldout.flatten(), minlength=self.vocab)[: self.vocab]
        self.counts = counts
        pool = (counts > 0).clone()
        for s in special:
            if 0 <= s < self.vocab:
                pool[s] = False
        self.pool = pool.nonzero().flatten()  # candidate control tokens
        order = counts[self.pool].argsort(stable=True)
        self.pool = self.pool[order]
        self.pool_counts = counts[self.pool].float()
        self.hp_in = Hookpoint(dictionary.cfg.hookpoint_in, dictionary.cfg.layer)
        self.hp_out = Hookpoint(dictionary.cfg.hookpoint_out, dictionary.cfg.layer)
        self._text: dict[int, str] = {}

    # ------------------------------------------------------------------ helpers
    def _str(self, i: int) -> str:
        if i not in self._text:
            self._text[i] = self.lm.tokenizer.decode([i])
        return self._text[i]

    def contexts(self, keys: list[tuple[int, ...]], gen: torch.Generator) -> tuple[Tensor, Tensor, list[list[int]]]:
        """Contexts [n, L(+1)] ending in one of the token sequences ``keys``, the last token of each, and
        where each came from: ``[held-out window, end position, natural (1) or written in (0)]``."""
        cfg = self.cfg
        L = cfg.context_len
        T = self.heldout.shape[1]
        body = self.heldout[:, L:]  # candidate end positions p >= L (never the BOS slot)
        per_key = []
        for seq in keys:
            hit = body == seq[-1]
            for j, c in enumerate(reversed(seq[:-1])):
                hit &= self.heldout[:, L - 1 - j : T - 1 - j] == c
            w, p = hit.nonzero(as_tuple=True)
            perm = torch.randperm(w.numel(), generator=gen)
            per_key.append(list(zip(w[perm].tolist(), (p[perm] + L).tolist(), strict=True)))
        chosen: list[tuple[int, int, int, int]] = []  # (window, end, key index, natural)
        j = 0
        while len(chosen) < cfg.n_contexts and any(j < len(x) for x in per_key):
            for k, occ in enumerate(per_key):
                if j < len(occ) and len(chosen) < cfg.n_contexts:
                    chosen.append((*occ[j], k, 1))
            j += 1
        if len(chosen) < cfg.min_natural:
            n_fill = cfg.n_contexts - len(chosen)
            ws = torch.randint(0, self.heldout.shape[0], (n_fill,), generator=gen).tolist()
            ps = torch.randint(L, T, (n_fill,), generator=gen).tolist()
            for i, (w, p) in enumerate(zip(ws, ps, strict=True)):
                chosen.append((w, p, i % len(keys), 0))
        rows, last, where = [], [], []
        for w, p, k, natural in chosen:
            ctx = self.heldout[w, p - L + 1 : p + 1].clone()
            seq = keys[k]
            ctx[L - len(seq) :] = torch.tensor(seq)
            if self.bos is not None:
                ctx = torch.cat([torch.tensor([self.bos]), ctx])
            rows.append(ctx)
            last.append(seq[-1])
            where.append([int(w), int(p), int(natural)])
        return torch.stack(rows), torch.tensor(last), where

    def key_sequences(self, pred: Prediction) -> list[tuple[int, ...]]:
        """Token sequences the activation test's contexts end in, from the label's text alone."""
        tok = self.lm.tokenizer
        L = self.cfg.context_len
        ctx = [int(i) for i in tok(pred.context, add_special_tokens=False)["input_ids"]] if pred.context else []
        ctx = [t for t in ctx if t not in self.special]  # e.g. "after <BOS>": the start of a window
        if not self.cfg.use_context:
            ctx = []
        if pred.words:
            words = [s for w in pred.words for s in word_token_sequences(tok, w)]
        elif pred.category:
            words = [(t,) for t in self._category_tokens(pred.category)]
        else:
            words = []
        out: list[tuple[int, ...]] = []
        for seq in words:
            room = max(0, L - len(seq))  # the context is cut from the left to fit the window
            full = tuple(ctx[len(ctx) - min(room, len(ctx)) :] + list(seq))
            if len(full) > L:
                continue
            if all(0 <= t < self.vocab and t not in self.special for t in full) and full not in out:
                out.append(full)
        return out

    def _category_tokens(self, category: str) -> list[int]:
        """The most frequent held-out tokens of a category the label names (``max_category_tokens``)."""
        by_count = self.pool.flip(0).tolist()  # pool is sorted by held-out count, ascending
        out = []
        for t in by_count:
            if _category([self._str(t)]) == category:
                out.append(int(t))
                if len(out) >= self.cfg.max_category_tokens:
                    break
        return out

    def control_tokens(self, key_ids: list[int], keys: Tensor, gen: torch.Generator) -> Tensor:
        """A frequency-matched replacement for each context's key token."""
        banned = {s.strip().lower() for s in (self._str(k) for k in key_ids)}
        key_set = set(key_ids)
        options: dict[int, list[int]] = {}
        for k in key_ids:
            c = float(self.counts[k]) if 0 <= k < self.vocab else 0.0
            pos = int(torch.searchsorted(self.pool_counts, torch.tensor(max(c, 1.0))))
            want = self.cfg.n_freq_neighbors
            lo, hi = max(0, pos - 4 * want), min(self.pool.numel(), pos + 4 * want)
            cand = self.pool[lo:hi]
            dist = (self.pool_counts[lo:hi].log() - torch.tensor(max(c, 1.0)).log()).abs()
            ordered = cand[dist.argsort(stable=True)].tolist()
            ok = [t for t in ordered if t not in key_set and self._str(t).strip().lower() not in banned]
            options[k] = ok[:want] or [t for t in self.pool.tolist()[-want:] if t not in key_set]
        out = []
        for k in keys.tolist():
            opts = options[k]
            out.append(opts[int(torch.randint(0, len(opts), (1,), generator=gen))])
        return torch.tensor(out)

    def _feature_acts(self, x: Tensor, f: int) -> Tensor:
        with torch.no_grad():
            return encode_subset(self.d, x[:, -1].to(self.d.W_enc.dtype), torch.tensor([f]))[:, 0].float().cpu()

    # ------------------------------------------------------------------ tests
    @torch.no_grad()
    def verify(self, feature: int, label: Label | str, *, max_act: float | None = None) -> dict:
        """Test the claims of ``label``'s text (a :class:`Label` or the text itself) for ``feature``.
        ``max_act``: the steering magnitude (a typical activation of the feature; else the largest
        activation on the key contexts, at least 1)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(feature))
        text = label.text if isinstance(label, Label) else str(label)
        pred = parse_label(text)
        keys = self.key_sequences(pred)
        prom = [t for t in promoted_token_ids(self.lm.tokenizer, pred.promoted) if 0 <= t < self.vocab]
        result: dict = {
            "feature": int(feature),
            "label": text,
            "labeler": label.labeler if isinstance(label, Label) else None,
            "prediction": {
                **pred.to_dict(),
                "key_tokens": [self.lm.tokenizer.decode(list(k)) for k in keys][:20],
                "promoted_tokens": [self._str(t) for t in prom],
            },
        }
        if not keys:
            why = "the label's text names no word or token kind found in the tokenizer / held-out text"
            result.update(
                verdict="failed",
                activation_test={"passed": False, "reason": why},
                intervention_test={"passed": False, "reason": "not run"},
            )
            return result
        dev = self.lm.device
        ctx, last, where = self.contexts(keys, gen)
        key_ids = list(dict.fromkeys(k[-1] for k in keys))
        ctrl = ctx.clone()
        ctrl[:, -1] = self.control_tokens(key_ids, last, gen)
        ctx, ctrl = ctx.to(dev), ctrl.to(dev)
        a_key, a_ctrl, dlogits, scale = run_sharing_prefix(
            self.lm, ctx, lambda pc: self._forwards(pc, ctx, ctrl, feature, max_act), use_cache=self.use_cache
        )
        act_test = self._activation_stats(a_key, a_ctrl)
        act_test.update(
            n_contexts=int(ctx.shape[0]),
            n_natural=sum(w[2] for w in where),
            contexts=where,
        )
        act_test["control_tokens"] = sorted({self._str(t) for t in ctrl[:, -1].tolist()})[:10]
        iv = self._intervention_stats(dlogits, prom, gen)
        iv["steer"] = {"hookpoint": str(self.hp_out), "scale": cfg.steer_scale * scale,
                       "scale_from": "max_act" if max_act and max_act > 0 else "key contexts"}
        act_ok, iv_ok = act_test["passed"], iv["passed"]
        result.update(
            verdict="verified" if act_ok and iv_ok else ("associative" if act_ok else "failed"),
            activation_test=act_test,
            intervention_test=iv,
        )
        return result

    def _forwards(
        self, prefix: PrefixCache | None, ctx: Tensor, ctrl: Tensor, feature: int, max_act: float | None
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """Key and control activations, the steered change of the last logits [n, vocab] and the steering
        scale; with ``prefix`` (the cache of ``ctx[:, :-1]``, shared by ``ctrl``) only last tokens are run."""
        W = self.d.W_dec[feature].detach()
        if max_act and max_act > 0:  # the steering is known before the clean run: both in one pass
            scale = float(max_act)
            delta = (self.cfg.steer_scale * scale) * W
            logits_clean, logits_steer, acts = clean_and_steered(
                self.lm, ctx, self.hp_out, delta, [self.hp_in], prefix=prefix
            )
            a_key = self._feature_acts(acts[self.hp_in], feature)
        else:
            # clean run on key contexts (full model: its logits are the intervention baseline)
            logits_clean, acts = last_logits(self.lm, ctx, [self.hp_in], prefix=prefix)
            a_key = self._feature_acts(acts[self.hp_in], feature)
            # steered run, scaled by the largest key activation
            scale = float(a_key.max().clamp_min(1.0))
            delta = (self.cfg.steer_scale * scale) * W
            logits_steer, _ = last_logits(self.lm, ctx, [], {self.hp_out: steer_last(delta)}, prefix=prefix)
        a_ctrl = self._feature_acts(harvest(self.lm, ctrl, self.hp_in, prefix=prefix), feature)
        return a_key, a_ctrl, (logits_steer - logits_clean).cpu(), scale

    def _activation_stats(self, a_key: Tensor, a_ctrl: Tensor) -> dict:
        cfg = self.cfg
        x, y = a_key.double().numpy(), a_ctrl.double().numpy()
        if (x == y).all() or (len(set(x.tolist())) == 1 and len(set(y.tolist())) == 1 and x[0] == y[0]):
            u, p = len(x) * len(y) / 2.0, 1.0
        else:
            res = stats.mannwhitneyu(x, y, alternative="greater")
            u, p = float(res.statistic), float(res.pvalue)
        effect = 2.0 * u / (len(x) * len(y)) - 1.0
        passed = bool(p < cfg.alpha and effect >= cfg.min_effect)
        return {
            "passed": passed,
            "p_value": p,
            "effect_size": round(effect, 4),
            "mean_key": round(float(a_key.mean()), 5),
            "mean_control": round(float(a_ctrl.mean()), 5),
            "fire_rate_key": round(float((a_key > 0).float().mean()), 4),
            "fire_rate_control": round(float((a_ctrl > 0).float().mean()), 4),
        }

    def _intervention_stats(self, dlogits: Tensor, prom: list[int], gen: torch.Generator) -> dict:
        cfg = self.cfg
        if not prom:
            return {"passed": False, "reason": "the label's text names no promoted output"}
        excluded = torch.zeros(dlogits.shape[1], dtype=torch.bool)
        excluded[prom] = True
        for s in self.special:
            if 0 <= s < dlogits.shape[1]:
                excluded[s] = True
        allowed = (~excluded).nonzero().flatten()
        rnd = allowed[torch.randperm(allowed.numel(), generator=gen)[: cfg.n_random]]
        dP = dlogits[:, prom].mean(1)  # [n contexts]: promoted tokens' mean logit change
        dR = dlogits[:, rnd]  # [n contexts, n_random]
        # aggregate: the promoted set's mean change over contexts vs each random token's mean change
        agg_p, agg_r = float(dP.mean()), dR.mean(0)
        n_ge = int((agg_r >= agg_p).sum())
        emp_p = (1 + n_ge) / (1 + agg_r.numel())
        pct = 1.0 - n_ge / agg_r.numel()
        per_ctx = (dR < dP.unsqueeze(1)).float().mean(1)
        excess = (dP - dR.mean(1)).double().numpy()
        if (excess == 0).all():
            p = 1.0
        else:
            p = float(stats.wilcoxon(excess, alternative="greater").pvalue)
        passed = bool(pct >= cfg.min_percentile and p < cfg.alpha and agg_p > 0)
        return {
            "passed": passed,
            "percentile": round(pct, 4),
            "empirical_p": round(emp_p, 5),
            "p_value": p,
            "median_percentile": round(float(per_ctx.median()), 4),
            "promoted_dlogit": round(agg_p, 4),
            "random_dlogit": round(float(dR.mean()), 4),
            "random_dlogit_std": round(float(agg_r.std()), 4),
        }


def verify_labels(
    lm,
    dictionary,
    dashboards: dict[int, dict],
    labels: dict[int, Label],
    heldout: Tensor,
    *,
    cfg: VerifyConfig | None = None,
    features: list[int] | None = None,
    update_dashboards: bool = True,
    progress: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
    split: dict | None = None,
) -> dict[int, dict]:
    """Verify ``labels`` of ``features`` (all labelled ones by default) on the ``heldout`` windows, which
    the caller keeps disjoint from the windows the labels were written from. Sets ``dashboard["verdict"]``
    and ``dashboard["verification"]`` unless ``update_dashboards`` is False (``split``, a description of
    the writing and verification windows, is recorded there). ``use_cache=False``: full forward passes
    instead of a shared prefix cache (see :class:`LabelVerifier`)."""
    verifier = LabelVerifier(lm, dictionary, heldout, cfg, use_cache=use_cache)
    feats = features if features is not None else sorted(labels)
    out: dict[int, dict] = {}
    for i, f in enumerate(feats):
        dash = dashboards.get(f, {})
        res = verifier.verify(f, labels[f], max_act=dash.get("max_act"))
        out[f] = res
        if update_dashboards and f in dashboards:
            dash["verdict"] = res["verdict"]
            dash["verification"] = {k: v for k, v in res.items() if k not in ("feature", "label")}
            dash["verification"]["config"] = asdict(verifier.cfg)
            if split is not None:
                dash["verification"]["windows"] = split
        if progress is not None:
            progress(i + 1, len(feats))
    return out


def summarize_verdicts(results: dict[int, dict]) -> dict:
    """Counts and fractions of each verdict, plus how often each test passed."""
    n = len(results)
    counts = {v: sum(1 for r in results.values() if r.get("verdict") == v) for v in VERDICTS}
    act = sum(1 for r in results.values() if r.get("activation_test", {}).get("passed"))
    iv = sum(1 for r in results.values() if r.get("intervention_test", {}).get("passed"))
    return {
        "n": n,
        **counts,
        "verified_fraction": counts["verified"] / n if n else 0.0,
        "associative_fraction": counts["associative"] / n if n else 0.0,
        "failed_fraction": counts["failed"] / n if n else 0.0,
        "activation_pass_fraction": act / n if n else 0.0,
        "intervention_pass_fraction": iv / n if n else 0.0,
    }
