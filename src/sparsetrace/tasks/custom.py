"""A user-given prompt and target token.

Metric: ``logit(target)`` at the last position, or ``logit(target) - logit(contrast)`` when a contrast
token is given. Both must be single tokens (DataError otherwise). The corrupted prompt is optional; it
must tokenise to the same length as the prompt. Without one, the corrupted prompt *is* the prompt (so
patching from it is a no-op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError
from .base import Task, TaskBatch, build_batch, check_n, last_logits


class CustomTask(Task):
    name = "custom"

    def __init__(self, prompt: str, target: str, contrast: str | None = None, corrupted: str | None = None):
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError("the custom task needs a non-empty prompt")
        if not isinstance(target, str) or target == "":
            raise DataError("the custom task needs a target token, e.g. ' Paris'")
        self.prompt = prompt
        self.target = target
        self.contrast = contrast
        self.corrupted = corrupted
        self.metric_name = "logit_diff" if contrast is not None else "logit"
        self.description = (
            f"logit({target!r})"
            + (f" - logit({contrast!r})" if contrast is not None else "")
            + f" after {prompt!r}"
        )

    def prompts(self, lm, n: int | None = None, seed: int = 0, split: str = "all") -> TaskBatch:
        """The prompt, repeated ``n`` times (default once); ``seed`` and ``split`` are unused (the task is
        one fixed prompt, so it has no held-out part)."""
        n = check_n(n, 1)
        target = lm.single_token_id(self.target)
        contrast = lm.single_token_id(self.contrast) if self.contrast is not None else target
        corrupted = self.corrupted if self.corrupted is not None else self.prompt
        rows = [(self.prompt, corrupted, target, contrast)] * n
        batch = build_batch(lm, self, rows)
        batch.extra["has_contrast"] = torch.full((n,), self.contrast is not None, device=batch.clean.device)
        return batch

    def metric_per_example(self, logits: Tensor, batch: TaskBatch) -> Tensor:
        last = last_logits(logits, batch).float()
        rows = torch.arange(last.shape[0], device=last.device)
        value = last[rows, batch.answer_ids.to(last.device)]
        has = batch.extra.get("has_contrast")
        if has is not None and bool(has.any()):
            value = value - last[rows, batch.wrong_ids.to(last.device)] * has.to(last.device).float()
        return value
