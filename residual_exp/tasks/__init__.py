"""The task registry: ``task=NAME`` → a function ``fn(cfg) -> exit code``.

Entries name the module and function; a task's module is imported only when the task runs, so
that light tasks (``cache``, ``plan``, ``report``) do not pay for torch, timm and open_clip.
``train`` is wrapped in the results store (:func:`residual_exp.store.resumable`): a job whose
results are stored for the same resolved config is copied, not run again.
"""
from __future__ import annotations

import importlib
from typing import Callable

TASKS: dict[str, str] = {
    "train": "train:train",
    "check_decomposition": "check_decomposition:check_decomposition",
    "inspect_data": "inspect_data:inspect_data",
    "pretrain_tiny_clip": "pretrain_tiny_clip:pretrain_tiny_clip",
    "report": "report:report",
    "dashboard": "dashboard:dashboard",
    "analysis": "analysis:analysis",
    "plan": "plan:plan",
    "export": "export:export",
    "cache": "cache:cache_task",
    "predict": "predict:predict",
    "evaluate": "evaluate:evaluate",
}


def get_task(name: str) -> Callable:
    if name not in TASKS:
        raise KeyError(f"task.name={name!r}; valid: {', '.join(TASKS)}")
    module, fn = TASKS[name].split(":")
    task = getattr(importlib.import_module(f"{__name__}.{module}"), fn)
    if name == "train":
        from ..store import resumable
        return resumable(task)
    return task
