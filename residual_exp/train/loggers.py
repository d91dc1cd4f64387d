"""Experiment loggers: W&B (offline unless an API key is configured), CSV, or none.

``logger`` config nodes are ``_target_`` objects (``conf/logger/*.yaml``).  For W&B the
mode is decided here, never by a prompt: ``online`` when ``WANDB_API_KEY`` is set or a
``~/.netrc`` entry exists and ``WANDB_MODE`` does not say otherwise, ``offline`` otherwise;
the offline run folder stays under the Hydra run dir for a later ``wandb sync``.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from hydra.utils import instantiate

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if any("wandb" in host for host in rc.hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def build_logger(logger_cfg, run_dir: Path, config: dict | None = None):
    """Instantiate ``logger_cfg`` (None / ``_target_: null`` → no logger)."""
    if logger_cfg is None or logger_cfg.get("_target_") in (None, "null", "none"):
        return None
    target = str(logger_cfg._target_)
    kwargs = {}
    if target.endswith("WandbLogger"):
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        kwargs = {"save_dir": str(run_dir), "mode": wandb_mode(), "config": config,
                  "settings": _wandb_settings()}
        log.info("W&B logging in %s mode under %s", kwargs["mode"], run_dir)
    elif "save_dir" in logger_cfg or target.endswith("CSVLogger"):
        kwargs = {"save_dir": str(run_dir)}
    # instantiate a partial, then call it: hydra.utils.instantiate's own first parameter is named
    # `config`, which would collide with WandbLogger's `config=` keyword
    logger = instantiate(logger_cfg, _partial_=True, _convert_="all")(**kwargs)
    _drop_anonymous(logger)
    return logger


def _drop_anonymous(logger) -> None:
    """Lightning's WandbLogger always passes ``anonymous=None`` to ``wandb.init``, which current wandb
    answers with "The anonymous setting has no effect" on every run: leave the (deprecated, unused)
    setting out before the run is created."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


def _wandb_settings():
    import wandb
    return wandb.Settings(silent=True, console="off")


def finish_logger(logger, exit_code: int = 0) -> None:
    """End the W&B run (also on failure) so multirun jobs sharing a process don't mix."""
    if logger is None:
        return
    try:
        logger.finalize("success" if exit_code == 0 else "failed")
    finally:
        if type(logger).__name__ == "WandbLogger":
            import wandb
            if wandb.run is not None:
                wandb.finish(exit_code=exit_code)
