"""Subject-verb agreement across a prepositional phrase or a relative clause.

"The key to the cabinets" -> " is" (not " are"); "The pilots that the guard liked" -> " are" / " were".

The intervening noun (the "attractor") has a random number, independent of the subject. The metric is a
logit difference between the verbs that agree with the subject and those that do not:
``logsumexp(logits[correct verbs]) - logsumexp(logits[wrong verbs])`` over (is/was/has) vs (are/were/have),
which does not depend on which tense the model prefers. The corrupted prompt flips the subject's number
(same token length: only nouns whose singular and plural are both one token are used).

``answer_ids`` / ``wrong_ids`` are " is" / " are" (or the reverse) for tools that need one target token.

Splits: "selection" and "heldout" draw nouns, containers and clause verbs from disjoint halves of the
lists and use disjoint templates (``HELDOUT_TEMPLATES``). Roles: SUBJ (the subject noun), OTHER (the
attractor noun, where it is not the last token) and END (the last token: the attractor or the clause verb,
where the agreeing verb is predicted).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError
from .base import (
    Task,
    TaskBatch,
    build_batch,
    check_n,
    fill_spans,
    last_logits,
    load_data,
    split_items,
    split_rng,
    split_templates,
)

HELDOUT_TEMPLATES = (2, 5)  # one prepositional ("next to") and one relative-clause ("who") template


def _pairs(lm, pairs: list[list[str]]) -> list[tuple[str, str]]:
    out = []
    for sing, plur in pairs:
        ok = all(len(lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in (sing, plur))
        if ok:
            out.append((sing, plur))
    return out


class AgreementTask(Task):
    name = "sva"
    roles = ("SUBJ", "OTHER", "END")
    metric_name = "logit_diff"
    description = "subject-verb agreement: logit(agreeing verbs) - logit(disagreeing verbs)"

    def __init__(self):
        self.data = load_data("sva.json")
        self._cache: dict[int, dict] = {}

    def vocab(self, lm) -> dict:
        key = id(lm.tokenizer)
        if key not in self._cache:
            people = _pairs(lm, self.data["nouns"])
            things = _pairs(lm, self.data["things"])
            containers = _pairs(lm, self.data["containers"])
            if len(people) < 2 or len(containers) < 1:
                raise DataError("too few nouns of the agreement task are single tokens for this tokenizer")
            sing = [lm.single_token_id(" " + v) for v in self.data["singular_verbs"]]
            plur = [lm.single_token_id(" " + v) for v in self.data["plural_verbs"]]
            self._cache[key] = {
                "people": people,
                "things": things or people,
                "containers": containers,
                "sing": sing,
                "plur": plur,
            }
        return self._cache[key]

    def prompts(self, lm, n: int | None = None, seed: int = 0, split: str = "all") -> TaskBatch:
        n = check_n(n, self.default_n)
        rng = split_rng(seed, "sva", split)
        v = dict(self.vocab(lm))
        for k in ("people", "things", "containers"):
            v[k] = split_items(v[k], split)
        if len(v["people"]) < 2 or not v["containers"]:
            raise DataError(f"the agreement '{split}' split has too few single-token nouns")
        clause_verbs = split_items(self.data["clause_verbs"], split)
        all_t = self.data["templates"]
        templates = split_templates(all_t, [all_t[i] for i in HELDOUT_TEMPLATES], split)
        is_id, are_id = v["sing"][0], v["plur"][0]
        rows, plural, roles = [], [], []
        for i in range(n):
            tpl = templates[i % len(templates)]
            if tpl["kind"] == "rc":
                subj, other = rng.sample(v["people"], 2)
            else:
                subj = rng.choice(v["things"] + v["people"])
                other = rng.choice(v["containers"])
            subj_plural = rng.random() < 0.5
            other_plural = rng.random() < 0.5
            verb = rng.choice(clause_verbs)

            def fill(s_plural: bool, tpl=tpl, subj=subj, other=other, other_plural=other_plural, verb=verb):
                return fill_spans(tpl["text"], SUBJ=subj[int(s_plural)], OTHER=other[int(other_plural)], VERB=verb)

            clean, ends = fill(subj_plural)
            corrupted = fill(not subj_plural)[0]
            roles.append({"SUBJ": ends["SUBJ"], "OTHER": ends["OTHER"]})
            ans, wrong = (are_id, is_id) if subj_plural else (is_id, are_id)
            rows.append((clean, corrupted, ans, wrong))
            plural.append(int(subj_plural))
        batch = build_batch(lm, self, rows, extra={"plural": plural}, roles=roles)
        batch.extra["singular_ids"] = torch.tensor(v["sing"], device=batch.clean.device).expand(n, -1).clone()
        batch.extra["plural_ids"] = torch.tensor(v["plur"], device=batch.clean.device).expand(n, -1).clone()
        return batch

    def metric_per_example(self, logits: Tensor, batch: TaskBatch) -> Tensor:
        last = last_logits(logits, batch).float()
        sing = last.gather(1, batch.extra["singular_ids"].to(last.device)).logsumexp(-1)
        plur = last.gather(1, batch.extra["plural_ids"].to(last.device)).logsumexp(-1)
        sign = batch.extra["plural"].to(last.device).float() * 2 - 1  # +1 plural subject, -1 singular
        return sign * (plur - sing)
