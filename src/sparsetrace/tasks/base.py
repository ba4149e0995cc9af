"""Common machinery for task suites: batches of clean/corrupted prompt pairs and metrics.

A task generates ``n`` prompts deterministically from a seed. Prompts of one batch may have different
lengths: they are *left-aligned* (token 0 is the first token of every row) and padded on the right, so
no attention mask is needed for a causal model (padding only comes after the real tokens).
``last_pos[i]`` is the index of the last real token of row ``i``; metrics read the logits there.
Clean and corrupted prompts of one row always have the same length, so positions line up for patching.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch
from torch import Tensor

from ..errors import DataError


@dataclass
class TaskBatch:
    """``n`` clean/corrupted prompt pairs, right-padded token ids [n, seq]."""

    task: str
    clean: Tensor  # [n, seq] long
    corrupted: Tensor  # [n, seq] long
    last_pos: Tensor  # [n] long: index of each row's last real token (same for clean and corrupted)
    answer_ids: Tensor  # [n] long: the correct next token
    wrong_ids: Tensor  # [n] long: the contrast / wrong next token
    prompts: list[str] = field(default_factory=list)
    corrupted_prompts: list[str] = field(default_factory=list)
    extra: dict[str, Tensor] = field(default_factory=dict)
    pad_id: int = 0
    metric_name: str = "logit_diff"
    task_obj: Task | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def roles(self) -> dict[str, Tensor]:
        """{role: [n] long}: each row's token position of the role (``S2``, ``END``...; -1 = not in
        that row). Circuit nodes ``L6/F12@S2`` are ablated there."""
        return {k[5:]: v for k, v in self.extra.items() if k.startswith("role:")}

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    @property
    def mask(self) -> Tensor:
        """[n, seq] bool: True on real tokens, False on right padding."""
        pos = torch.arange(self.seq_len, device=self.clean.device)
        return pos[None, :] <= self.last_pos[:, None]

    @property
    def attention_mask(self) -> Tensor:
        return self.mask.long()

    def metric(self, logits: Tensor) -> float:
        if self.task_obj is None:
            raise DataError(
                f"batch of task '{self.task}' has no task attached; call task.metric(logits, batch)"
            )
        return self.task_obj.metric(logits, self)

    def subset(self, index: Sequence[int] | Tensor) -> TaskBatch:
        idx = torch.as_tensor(index, dtype=torch.long)
        keep = idx.tolist()
        n_seq = int(self.last_pos[idx].max().item()) + 1 if len(keep) else 0
        return TaskBatch(
            task=self.task,
            clean=self.clean[idx, :n_seq],
            corrupted=self.corrupted[idx, :n_seq],
            last_pos=self.last_pos[idx],
            answer_ids=self.answer_ids[idx],
            wrong_ids=self.wrong_ids[idx],
            prompts=[self.prompts[i] for i in keep] if self.prompts else [],
            corrupted_prompts=[self.corrupted_prompts[i] for i in keep] if self.corrupted_prompts else [],
            extra={k: v[idx] for k, v in self.extra.items()},
            pad_id=self.pad_id,
            metric_name=self.metric_name,
            task_obj=self.task_obj,
        )

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(
            task=self.task,
            clean=self.clean.to(device),
            corrupted=self.corrupted.to(device),
            last_pos=self.last_pos.to(device),
            answer_ids=self.answer_ids.to(device),
            wrong_ids=self.wrong_ids.to(device),
            prompts=list(self.prompts),
            corrupted_prompts=list(self.corrupted_prompts),
            extra={k: v.to(device) for k, v in self.extra.items()},
            pad_id=self.pad_id,
            metric_name=self.metric_name,
            task_obj=self.task_obj,
        )


def last_logits(logits: Tensor, batch: TaskBatch, offset: int = 0) -> Tensor:
    """Logits [n, vocab] at each row's last real token (``offset`` -1 = the token before it)."""
    if logits.dim() == 2:  # already [n, vocab]
        if offset:
            raise DataError(
                "these logits are only for the last position; offset needs [n, seq, vocab] logits"
            )
        return logits
    if logits.dim() != 3 or logits.shape[0] != len(batch):
        raise DataError(
            f"logits of shape {tuple(logits.shape)} do not match a batch of {len(batch)} prompts; "
            "expected [n, seq, vocab]"
        )
    pos = batch.last_pos.to(logits.device) + offset
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, pos]


def pair_logit_diff(logits: Tensor, batch: TaskBatch) -> Tensor:
    """Per-row logit(answer) - logit(wrong) at the last position."""
    last = last_logits(logits, batch).float()
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, batch.answer_ids.to(last.device)] - last[rows, batch.wrong_ids.to(last.device)]


class Task:
    """Base class: a seeded prompt generator and a metric (higher = the model does the task better)."""

    name: str = "task"
    metric_name: str = "logit_diff"
    description: str = ""
    default_n: int = 32

    roles: tuple[str, ...] = ("END",)  # token roles every prompt of the task marks (batch.roles)

    def prompts(self, lm, n: int | None = None, seed: int = 0, split: str = "all") -> TaskBatch:
        """``n`` prompts from ``seed``; ``split`` = "selection" | "heldout" (disjoint vocabularies and
        templates, different random streams) or "all" (the whole prompt space)."""
        raise NotImplementedError

    def metric_per_example(self, logits: Tensor, batch: TaskBatch) -> Tensor:
        return pair_logit_diff(logits, batch)

    def metric(self, logits: Tensor, batch: TaskBatch) -> float:
        """Mean of :meth:`metric_per_example` over the batch."""
        return float(self.metric_per_example(logits, batch).mean().item())

    def baseline(self, lm, n: int | None = None, seed: int = 0, batch: TaskBatch | None = None) -> float:
        """The clean model's metric on ``n`` prompts (or on ``batch``)."""
        batch = batch if batch is not None else self.prompts(lm, n, seed)
        logits = lm.run(batch.clean.to(lm.device)).logits
        return self.metric(logits, batch)

    def corrupted_baseline(
        self, lm, n: int | None = None, seed: int = 0, batch: TaskBatch | None = None
    ) -> float:
        """The metric on the corrupted prompts (scored against the clean answers)."""
        batch = batch if batch is not None else self.prompts(lm, n, seed)
        logits = lm.run(batch.corrupted.to(lm.device)).logits
        return self.metric(logits, batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------- helpers


def load_data(name: str) -> dict | list:
    """A JSON file from ``sparsetrace/tasks/data``."""
    path = resources.files("sparsetrace.tasks") / "data" / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:  # pragma: no cover - packaging error
        raise DataError(f"task data file '{name}' is missing from the installed package") from e


def rng_for(seed: int, salt: str) -> random.Random:
    """A private RNG: the same (seed, salt) gives the same stream on every machine and Python run."""
    return random.Random(f"{salt}:{int(seed)}")


SPLITS = ("all", "selection", "heldout")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"prompt split '{split}' is unknown; expected one of {', '.join(SPLITS)}")
    return split


def split_items(items: Sequence, split: str) -> list:
    """The part of a vocabulary list a split draws from: selection = even indices, heldout = odd ones."""
    items = list(items)
    if check_split(split) == "all":
        return items
    return items[0::2] if split == "selection" else items[1::2]


def split_templates(templates: Sequence, heldout: Sequence, split: str) -> list:
    """Templates of a split: ``heldout`` ones only in the heldout split, the rest in selection. When a
    side would be empty (the task was restricted to held-out or selection templates only), it keeps all."""
    templates = list(templates)
    if check_split(split) == "all":
        return templates
    side = [t for t in templates if (t in heldout) == (split == "heldout")]
    return side or templates


def split_rng(seed: int, salt: str, split: str) -> random.Random:
    """The split's private RNG: selection and heldout never share a random stream, even for one seed."""
    return rng_for(seed, salt if check_split(split) == "all" else f"{salt}:{split}")


def fill_spans(template: str, **values) -> tuple[str, dict[str, int]]:
    """``template.format(**values)`` and, per field, the character index where its (last) value ends."""
    out, ends = [], {}
    for literal, field_name, spec, _conv in string.Formatter().parse(template):
        out.append(literal)
        if field_name is None:
            continue
        text = format(values[field_name], spec or "")
        out.append(text)
        ends[field_name] = sum(len(x) for x in out)
    return "".join(out), ends


def role_positions(lm, text: str, ends: dict[str, int]) -> dict[str, int]:
    """{role: index of the token that ends at that character} in ``lm.tokenize(text)`` (with BOS)."""
    full = lm.tokenize(text)[0].tolist()
    out = {}
    for role, end in ends.items():
        prefix = lm.tokenize(text[:end])[0].tolist()
        pos = len(prefix) - 1
        if full[: pos + 1] != prefix:
            raise DataError(f"role {role} of {text!r} does not end on a token boundary for this tokenizer")
        out[role] = pos
    return out


def single_tokens(lm, words: Sequence[str], *, prefix: str = " ") -> list[str]:
    """The words that are one token (with ``prefix`` prepended) for this model's tokenizer."""
    out = []
    for w in words:
        ids = lm.tokenizer(prefix + w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out.append(w)
    return out


def token_id(lm, text: str) -> int:
    """The id of a text that must be one token (DataError otherwise)."""
    return lm.single_token_id(text)


def build_batch(
    lm,
    task: Task,
    rows: list[tuple[str, str, int, int]],
    *,
    extra: dict[str, list] | None = None,
    check_equal_length: bool = True,
    roles: list[dict[str, int]] | None = None,
) -> TaskBatch:
    """Tokenise (clean, corrupted, answer_id, wrong_id) rows into a right-padded :class:`TaskBatch`.

    ``roles``: per row {role: character index where the role's word ends in the clean prompt}; stored as
    ``extra["role:NAME"]`` token positions (-1 where a row lacks the role, or where the role's token is the
    last one, which is always ``role:END``)."""
    if not rows:
        raise DataError(f"task '{task.name}' produced no prompts")
    clean_ids, corr_ids = [], []
    for clean, corr, _, _ in rows:
        a = lm.tokenize(clean)[0].tolist()
        b = lm.tokenize(corr)[0].tolist()
        if check_equal_length and len(a) != len(b):
            raise DataError(
                f"task '{task.name}': clean and corrupted prompts tokenise to different lengths "
                f"({len(a)} vs {len(b)}): {clean!r} / {corr!r}"
            )
        clean_ids.append(a)
        corr_ids.append(b)
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(lm.tokenizer, "eos_token_id", None)
    pad = int(pad) if pad is not None else 0
    seq = max(len(x) for x in clean_ids + corr_ids)
    n = len(rows)
    clean_t = torch.full((n, seq), pad, dtype=torch.long)
    corr_t = torch.full((n, seq), pad, dtype=torch.long)
    last = torch.empty(n, dtype=torch.long)
    for i, (a, b) in enumerate(zip(clean_ids, corr_ids, strict=True)):
        clean_t[i, : len(a)] = torch.tensor(a)
        corr_t[i, : len(b)] = torch.tensor(b)
        last[i] = len(a) - 1
    ex = {k: torch.as_tensor(v) for k, v in (extra or {}).items()}
    if roles is not None:
        names = sorted({r for row in roles for r in row})
        pos_rows = [role_positions(lm, r[0], e) for r, e in zip(rows, roles, strict=True)]
        for name in names:
            # a role on the last token is that row's END (one name per token, so a circuit never holds the
            # same feature twice under two names): it is marked absent (-1) there
            pos = torch.tensor([p.get(name, -1) for p in pos_rows], dtype=torch.long)
            ex[f"role:{name}"] = torch.where(pos == last, -1, pos)
    ex["role:END"] = last.clone()
    return TaskBatch(
        task=task.name,
        clean=clean_t.to(lm.device),
        corrupted=corr_t.to(lm.device),
        last_pos=last.to(lm.device),
        answer_ids=torch.tensor([r[2] for r in rows], dtype=torch.long, device=lm.device),
        wrong_ids=torch.tensor([r[3] for r in rows], dtype=torch.long, device=lm.device),
        prompts=[r[0] for r in rows],
        corrupted_prompts=[r[1] for r in rows],
        extra={k: v.to(lm.device) for k, v in ex.items()},
        pad_id=pad,
        metric_name=task.metric_name,
        task_obj=task,
    )


def check_n(n: int | None, default: int) -> int:
    n = default if n is None else n
    if not isinstance(n, int) or n <= 0:
        raise DataError(f"n={n!r} is invalid; expected a positive number of prompts")
    return n


MetricFn = Callable[[Tensor, TaskBatch], float]
