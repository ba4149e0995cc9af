"""Factual recall on a curated list of facts the model gets right.

"The capital of France is" -> " Paris". ``tasks/data/facts.json`` holds facts (capitals, official
languages, landmarks, birthplaces, opposites) for which SmolLM2-135M-Instruct puts the correct answer as
its top-1 next token (checked when the list was made; each entry records that probability).

For each prompt the corrupted prompt uses another subject of the same relation whose prompt has the same
token length and whose answer differs; that subject's answer is the wrong answer, so the metric
``logit(answer) - logit(wrong)`` compares two answers of the same type and flips sign on the corrupted
prompt. Facts whose answer is not one token for the model's tokenizer, or that have no same-length
partner, are left out at run time.

Splits hold out whole relations: "heldout" = ``HELDOUT_RELATIONS`` (official languages, birthplaces),
"selection" = the others, and a held-out fact whose subject or answer is a subject or answer of a
selection fact (France, Italy, ...) is left out, so the two splits share no entity. Roles: SUBJ (the
subject's last token) and END.
"""

from __future__ import annotations

from collections import defaultdict

from ..errors import DataError
from .base import Task, TaskBatch, build_batch, check_n, check_split, load_data, split_rng

HELDOUT_RELATIONS = ("language", "birthplace")


class FactsTask(Task):
    name = "facts"
    roles = ("SUBJ", "END")
    metric_name = "logit_diff"
    description = "factual recall: logit(answer) - logit(answer of another subject of the same relation)"

    def __init__(self, relations: list[str] | None = None, facts: list[dict] | None = None):
        data = facts if facts is not None else load_data("facts.json")["facts"]
        known = sorted({f["relation"] for f in data})
        if relations is not None:
            bad = [r for r in relations if r not in known]
            if bad:
                raise DataError(f"unknown fact relation(s) {bad}; known relations: {', '.join(known)}")
            data = [f for f in data if f["relation"] in relations]
        self.facts = list(data)
        self._cache: dict[int, list] = {}

    def split_facts(self, split: str) -> list[dict]:
        if check_split(split) == "all":
            return self.facts
        sel = [f for f in self.facts if f["relation"] not in HELDOUT_RELATIONS]
        if split == "selection":
            return sel
        seen = {x.strip() for f in sel for x in (f["subject"], f["answer"])}
        return [f for f in self.facts if f["relation"] in HELDOUT_RELATIONS
                and f["subject"].strip() not in seen and f["answer"].strip() not in seen]

    def usable(self, lm, split: str = "all") -> list:
        """(fact, same-length partners with a different answer) for this tokenizer."""
        key = (id(lm.tokenizer), split)
        if key not in self._cache:
            info = []
            for f in self.split_facts(split):
                try:
                    aid = lm.single_token_id(f["answer"])
                except DataError:
                    continue
                text = f["template"].format(f["subject"])
                info.append((f, text, int(lm.tokenize(text).shape[1]), aid))
            groups = defaultdict(list)
            for item in info:
                groups[(item[0]["relation"], item[2])].append(item)
            out = []
            for f, text, length, aid in info:
                partners = [g for g in groups[(f["relation"], length)] if g[3] != aid]
                if partners:
                    out.append(((f, text, aid), [(p[0], p[1], p[3]) for p in partners]))
            if not out:
                raise DataError(
                    f"no curated fact of the '{split}' split is usable with this tokenizer (answers must be one token and each fact "
                    "needs another subject of the same relation with the same prompt length)"
                )
            self._cache[key] = out
        return self._cache[key]

    def prompts(self, lm, n: int | None = None, seed: int = 0, split: str = "all") -> TaskBatch:
        usable = self.usable(lm, split)
        n = check_n(n, min(self.default_n, len(usable)))
        rng = split_rng(seed, "facts", split)
        order = list(range(len(usable)))
        rng.shuffle(order)
        rows, roles = [], []
        for i in range(n):
            (fact, text, aid), partners = usable[order[i % len(order)]]
            _, ptext, pid = rng.choice(partners)
            rows.append((text, ptext, aid, pid))
            roles.append({"SUBJ": fact["template"].index("{}") + len(fact["subject"])})
        return build_batch(lm, self, rows, roles=roles)
