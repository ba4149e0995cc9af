"""sparsetrace.tasks: seeded clean/corrupted prompt suites with a metric each.

>>> task = get_task("ioi")
>>> batch = task.prompts(lm, n=32, seed=0)       # TaskBatch: clean/corrupted ids, last_pos, answers
>>> task.metric(lm.run(batch.clean).logits, batch)  # mean logit(IO) - logit(S)
>>> task.baseline(lm)                             # the clean model's metric

Tasks: ``ioi``, ``greater-than``, ``sva`` (subject-verb agreement), ``facts`` (factual recall) and
``custom`` (``get_task("custom", prompt=..., target=..., contrast=None, corrupted=None)``).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import DataError
from .agreement import AgreementTask
from .base import Task, TaskBatch, last_logits, pair_logit_diff
from .custom import CustomTask
from .facts import FactsTask
from .greater_than import GreaterThanTask
from .ioi import IOITask

TASKS: dict[str, Callable[..., Task]] = {
    "ioi": IOITask,
    "greater-than": GreaterThanTask,
    "sva": AgreementTask,
    "facts": FactsTask,
    "custom": CustomTask,
}
ALIASES = {
    "greater_than": "greater-than",
    "greaterthan": "greater-than",
    "gt": "greater-than",
    "subject-verb-agreement": "sva",
    "agreement": "sva",
    "factual-recall": "facts",
    "fact": "facts",
    "indirect-object-identification": "ioi",
}


def list_tasks() -> list[str]:
    return list(TASKS)


def get_task(name: str, **kwargs) -> Task:
    """A task by name (aliases and ``_``/``-`` spellings accepted); DataError lists the known names."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, ALIASES.get(key.replace("-", "_"), key))
    if key not in TASKS:
        raise DataError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    try:
        return TASKS[key](**kwargs)
    except TypeError as e:
        raise DataError(f"bad arguments for task '{key}': {e}") from e


__all__ = [
    "TASKS",
    "AgreementTask",
    "CustomTask",
    "FactsTask",
    "GreaterThanTask",
    "IOITask",
    "Task",
    "TaskBatch",
    "get_task",
    "last_logits",
    "list_tasks",
    "pair_logit_diff",
]
