"""``run(cfg) -> exit code``: run the task ``cfg.task.name`` selects (callable without Hydra's
entry point: tests compose a config and call it directly).

The tasks live in :mod:`residual_exp.tasks` (the default, ``train``, is resumable through the
results store :mod:`residual_exp.store`).
"""
from __future__ import annotations

from omegaconf import DictConfig

from .runtime import quiet_libraries
from .tasks import get_task


def run(cfg: DictConfig) -> int:
    quiet_libraries()
    return int(get_task(cfg.task.name)(cfg) or 0)
