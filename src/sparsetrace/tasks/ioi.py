"""Indirect object identification (Wang et al. 2022).

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object, IO),
not " John" (the subject, S). Metric: logit(IO) - logit(S) at the last position.

Corruptions (same token length as the clean prompt):

- ``"abc"`` (default): the second mention of S is replaced by a third name C, so the prompt no longer
  says which of the first two names is the indirect object;
- ``"swap"``: IO and S are swapped everywhere, so the correct answer flips (the metric is still scored
  against the clean IO/S, so it goes negative).

Names, places and objects come from ``tasks/data/ioi.json``; only those that are a single token with a
leading space for the model's tokenizer are used (filtered at run time; places and objects fall back to
the whole list when fewer than 3 are single tokens), so all prompts of one template have the same length
and every position is the same word in each of them.
"""

from __future__ import annotations

from ..errors import DataError
from .base import Task, TaskBatch, build_batch, check_n, load_data, rng_for, single_tokens

CORRUPTIONS = ("abc", "swap")


class IOITask(Task):
    name = "ioi"
    metric_name = "logit_diff"
    description = "indirect object identification: logit(IO) - logit(S) at the last token"

    def __init__(self, corruption: str = "abc", templates: list[str] | None = None):
        if corruption not in CORRUPTIONS:
            raise DataError(
                f"IOI corruption '{corruption}' is unknown; expected one of {', '.join(CORRUPTIONS)}"
            )
        self.corruption = corruption
        data = load_data("ioi.json")
        self.templates = list(templates) if templates is not None else list(data["templates"])
        self.places = list(data["places"])
        self.objects = list(data["objects"])
        self._names = list(data["names"])
        self._cache: dict[int, list[str]] = {}

    def names(self, lm) -> list[str]:
        """The candidate names that are one token (with a leading space) for ``lm``'s tokenizer."""
        key = id(lm.tokenizer)
        if key not in self._cache:
            names = single_tokens(lm, self._names)
            if len(names) < 3:
                raise DataError(
                    f"only {len(names)} of the IOI names are single tokens for this tokenizer; need at least 3"
                )
            self._cache[key] = names
        return self._cache[key]

    def _single_or_all(self, lm, words: list[str]) -> list[str]:
        single = single_tokens(lm, words)
        return single if len(single) >= 3 else list(words)

    def prompts(self, lm, n: int | None = None, seed: int = 0) -> TaskBatch:
        n = check_n(n, self.default_n)
        rng = rng_for(seed, "ioi")
        names = self.names(lm)
        places = self._single_or_all(lm, self.places)
        objects = self._single_or_all(lm, self.objects)
        rows, io_first = [], []
        for i in range(n):
            template = self.templates[i % len(self.templates)]
            io, s, c = rng.sample(names, 3)
            place = rng.choice(places)
            obj = rng.choice(objects)
            abba = rng.random() < 0.5  # IO first ("Mary and John ..., John gave") or S first
            a, b = (io, s) if abba else (s, io)

            def fill(a_, b_, c_, template=template, place=place, obj=obj):
                return template.format(A=a_, B=b_, C=c_, PLACE=place, OBJECT=obj)

            clean = fill(a, b, s)
            if self.corruption == "abc":
                corrupted = fill(a, b, c)
            else:  # swap IO and S everywhere
                a2, b2 = (s, io) if abba else (io, s)
                corrupted = fill(a2, b2, io)
            rows.append((clean, corrupted, lm.single_token_id(" " + io), lm.single_token_id(" " + s)))
            io_first.append(int(abba))
        return build_batch(lm, self, rows, extra={"io_first": io_first})
