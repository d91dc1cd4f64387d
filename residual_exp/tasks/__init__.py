"""The task registry: ``task=NAME`` → a function ``fn(cfg) -> exit code``.

``train`` is wrapped in the results store (:func:`residual_exp.store.resumable`): a job whose
results are stored for the same resolved config is copied, not run again.
"""
from __future__ import annotations

from typing import Callable

from ..store import resumable
from .analysis import analysis
from .cache import cache_task
from .check_decomposition import check_decomposition
from .evaluate import evaluate
from .export import export
from .inspect_data import inspect_data
from .plan import plan
from .predict import predict
from .pretrain_tiny_clip import pretrain_tiny_clip
from .report import report
from .train import train

TASKS: dict[str, Callable] = {
    "train": resumable(train),
    "check_decomposition": check_decomposition,
    "inspect_data": inspect_data,
    "pretrain_tiny_clip": pretrain_tiny_clip,
    "report": report,
    "analysis": analysis,
    "plan": plan,
    "export": export,
    "cache": cache_task,
    "predict": predict,
    "evaluate": evaluate,
}


def get_task(name: str) -> Callable:
    if name not in TASKS:
        raise KeyError(f"task.name={name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]
