"""The task registry: ``task=NAME`` → a function ``fn(cfg) -> exit code``.

Each task's schema (:data:`residual_exp.config.TASKS`) names its function (``run``, an import
path) and says whether it is resumable; a task's module is imported only when the task runs, so
that light tasks (``cache``, ``plan``, ``report``) do not pay for torch, timm and open_clip.
Resumable tasks (``train``) are wrapped in the results store (:func:`residual_exp.store.resumable`):
a job whose results are stored for the same resolved config is copied, not run again.
"""
from __future__ import annotations

from typing import Callable

from ..catalog import load
from ..config import TASKS


def get_task(name: str) -> Callable:
    if name not in TASKS:
        raise KeyError(f"task.name={name!r}; valid: {', '.join(TASKS)}")
    schema = TASKS[name]
    task = load(schema.run)
    if schema.resumable:
        from ..store import resumable
        return resumable(task)
    return task
