"""``run(cfg) -> exit code``: run the task ``cfg.task.name`` selects (callable without Hydra's
entry point: tests compose a config and call it directly).

The config is validated first (:func:`residual_exp.validate.validate`): a bad value raises
:class:`~residual_exp.validate.ConfigError` before any model, data or cache is touched.  Nothing
heavy is imported before that (torch, the tasks), so a refusal takes well under a second.

The tasks live in :mod:`residual_exp.tasks` (the default, ``train``, is resumable through the
results store :mod:`residual_exp.store`).
"""
from __future__ import annotations

from omegaconf import DictConfig

from .validate import ConfigError, validate


def run(cfg: DictConfig) -> int:
    validate(cfg)
    from .runtime import quiet_libraries
    from .config import TASKS
    from .tasks import get_task
    name = cfg.task.name
    if name not in TASKS:       # a task config (YAML) without a schema naming its implementation
        raise ConfigError([f"task.name={name}: no such task is implemented; must be one of "
                           f"{' | '.join(TASKS)}"])
    quiet_libraries()
    return int(get_task(name)(cfg) or 0)
