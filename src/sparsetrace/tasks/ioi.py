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

Splits (``prompts(..., split=...)``): "selection" and "heldout" draw names, places and objects from
disjoint halves of the lists (even / odd indices) and use disjoint templates (``HELDOUT_TEMPLATES``, 3 of
the 10, are held out). Roles (``batch.roles``): S1 and IO (first mentions), S2 (the second mention of S,
or the name C that replaces it in the corrupted prompt) and END.
"""

from __future__ import annotations

from ..errors import DataError
from .base import (
    Task,
    TaskBatch,
    build_batch,
    check_n,
    fill_spans,
    load_data,
    single_tokens,
    split_items,
    split_rng,
    split_templates,
)

CORRUPTIONS = ("abc", "swap")
HELDOUT_TEMPLATES = (1, 5, 8)  # indices into ioi.json's templates


class IOITask(Task):
    name = "ioi"
    roles = ("S1", "IO", "S2", "END")
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
        self.heldout_templates = [data["templates"][i] for i in HELDOUT_TEMPLATES]
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

    def prompts(self, lm, n: int | None = None, seed: int = 0, split: str = "all") -> TaskBatch:
        n = check_n(n, self.default_n)
        rng = split_rng(seed, "ioi", split)
        names = split_items(self.names(lm), split)
        places = split_items(self._single_or_all(lm, self.places), split)
        objects = split_items(self._single_or_all(lm, self.objects), split)
        templates = split_templates(self.templates, self.heldout_templates, split)
        if len(names) < 3:
            raise DataError(f"the IOI '{split}' split has {len(names)} single-token names; need at least 3")
        rows, io_first, roles = [], [], []
        for i in range(n):
            template = templates[i % len(templates)]
            io, s, c = rng.sample(names, 3)
            place = rng.choice(places)
            obj = rng.choice(objects)
            abba = rng.random() < 0.5  # IO first ("Mary and John ..., John gave") or S first
            a, b = (io, s) if abba else (s, io)

            def fill(a_, b_, c_, template=template, place=place, obj=obj):
                return fill_spans(template, A=a_, B=b_, C=c_, PLACE=place, OBJECT=obj)

            clean, ends = fill(a, b, s)
            roles.append({"IO": ends["A" if abba else "B"], "S1": ends["B" if abba else "A"], "S2": ends["C"]})
            if self.corruption == "abc":
                corrupted = fill(a, b, c)[0]
            else:  # swap IO and S everywhere
                a2, b2 = (s, io) if abba else (io, s)
                corrupted = fill(a2, b2, io)[0]
            rows.append((clean, corrupted, lm.single_token_id(" " + io), lm.single_token_id(" " + s)))
            io_first.append(int(abba))
        return build_batch(lm, self, rows, extra={"io_first": io_first}, roles=roles)
