"""Greater-than (Hanna et al. 2023), adapted to tokenizers that split years into single digits.

"The war lasted from the year 1732 to the year 173" -> the next token is the end year's units digit.

SmolLM2 (like Llama/Mistral/Qwen tokenizers) writes " 1732" as " ", "1", "7", "3", "2", so the two-digit
"YY" token of the original task does not exist. The prompt therefore ends with the century *and* the
start year's tens digit ``t``: the logits one position before the end predict the end year's tens digit,
the logits at the end predict its units digit given tens = ``t``. From these two distributions (one
forward pass, causal attention makes the earlier position blind to the appended ``t``) we get the
probability that the end year's last two digits are greater / smaller than the start year's ``YY = tu``:

    P(>) = sum_{d > t} p_tens(d) + p_tens(t) * sum_{e > u} p_units(e)
    P(<) = sum_{d < t} p_tens(d) + p_tens(t) * sum_{e < u} p_units(e)

and the metric is ``P(>) - P(<)`` (in [-1, 1]; a model that ignores the start year is near 0 on average
over start years). The corrupted prompt uses the start year ``XX01`` (Hanna et al.'s corruption); its
metric is still scored against the clean ``YY``.

``answer_ids`` / ``wrong_ids`` hold a representative greater / smaller units digit (u+1 / u-1) for tools
that need a single target token at the last position.

Splits: "selection" uses the centuries 11-14, nouns at even indices and the first two templates;
"heldout" uses the centuries 15-18 (so no year is shared), the other nouns and the third template.
Roles: NOUN, YY (the start year's last digit), XX2 (the end year's century) and END (the tens digit t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError
from .base import Task, TaskBatch, build_batch, check_n, fill_spans, last_logits, split_items, split_rng

NOUNS = (
    "war",
    "expedition",
    "reign",
    "drought",
    "project",
    "famine",
    "siege",
    "occupation",
    "journey",
    "strike",
)
TEMPLATES = (
    "The {NOUN} lasted from the year {XX}{YY} to the year {XX}{T}",
    "The {NOUN} started in the year {XX}{YY} and ended in the year {XX}{T}",
    "The {NOUN} went on from the year {XX}{YY} until the year {XX}{T}",
)
CENTURIES = tuple(range(11, 19))
SPLIT_CENTURIES = {"all": CENTURIES, "selection": tuple(range(11, 15)), "heldout": tuple(range(15, 19))}
HELDOUT_TEMPLATES = (TEMPLATES[2],)


class GreaterThanTask(Task):
    name = "greater-than"
    roles = ("NOUN", "YY", "XX2", "END")
    metric_name = "prob_diff"
    description = "greater-than on digit tokens: P(end year > start year) - P(end year < start year)"

    def __init__(
        self, templates: tuple[str, ...] | list[str] = TEMPLATES, nouns: tuple[str, ...] | list[str] = NOUNS
    ):
        self.templates = tuple(templates)
        self.nouns = tuple(nouns)

    def digit_ids(self, lm) -> list[int]:
        ids = []
        for d in range(10):
            try:
                ids.append(lm.single_token_id(str(d)))
            except DataError as e:
                raise DataError(
                    f"the greater-than task needs single-digit tokens; digit {d} is not one token here"
                ) from e
        return ids

    def prompts(self, lm, n: int | None = None, seed: int = 0, split: str = "all") -> TaskBatch:
        from .base import split_templates

        n = check_n(n, self.default_n)
        rng = split_rng(seed, "greater-than", split)
        digits = self.digit_ids(lm)
        templates = split_templates(self.templates, HELDOUT_TEMPLATES, split)
        nouns = split_items(self.nouns, split)
        rows, yy_list, roles = [], [], []
        for i in range(n):
            template = templates[i % len(templates)]
            noun = rng.choice(nouns)
            xx = rng.choice(SPLIT_CENTURIES[split])
            t = rng.randint(1, 8)
            u = rng.randint(1, 8)

            def fill(yy: str, template=template, noun=noun, xx=xx, t=t):
                return fill_spans(template.replace("{XX}{T}", "{XX2}{T}"), NOUN=noun, XX=xx, XX2=xx, YY=yy, T=t)

            clean, ends = fill(f"{t}{u}")
            corrupted = fill("01")[0]
            roles.append({"NOUN": ends["NOUN"], "YY": ends["YY"], "XX2": ends["XX2"]})
            rows.append((clean, corrupted, digits[u + 1], digits[u - 1]))
            yy_list.append([t, u])
        # the prompt must end with the digit t, preceded by the century digits
        for (clean, *_), (t, _u) in zip(rows, yy_list, strict=True):
            if int(lm.tokenize(clean)[0, -1]) != digits[t]:
                raise DataError(
                    "the greater-than task needs a tokenizer that splits years into single digits; "
                    f"prompt {clean!r} does not end with the digit token {t}"
                )
        batch = build_batch(lm, self, rows, extra={"yy": yy_list}, roles=roles)
        batch.extra["digit_ids"] = torch.tensor(digits, device=batch.clean.device).expand(n, 10).clone()
        return batch

    def probabilities(self, logits: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-row (P(end > start), P(end < start))."""
        digits = batch.extra["digit_ids"][0].to(logits.device)
        p_tens = last_logits(logits, batch, offset=-1).float().softmax(-1)[:, digits]  # [n, 10]
        p_units = last_logits(logits, batch).float().softmax(-1)[:, digits]
        t = batch.extra["yy"][:, 0].to(logits.device)
        u = batch.extra["yy"][:, 1].to(logits.device)
        d = torch.arange(10, device=logits.device)[None, :]
        p_t = p_tens.gather(1, t[:, None]).squeeze(1)
        greater = (p_tens * (d > t[:, None])).sum(-1) + p_t * (p_units * (d > u[:, None])).sum(-1)
        smaller = (p_tens * (d < t[:, None])).sum(-1) + p_t * (p_units * (d < u[:, None])).sum(-1)
        return greater, smaller

    def metric_per_example(self, logits: Tensor, batch: TaskBatch) -> Tensor:
        greater, smaller = self.probabilities(logits, batch)
        return greater - smaller
