"""Experiment loggers: W&B (offline unless an API key is configured), CSV, or none.

``logger`` config nodes are ``_target_`` objects (``conf/logger/*.yaml``).  For W&B the
mode is decided here, never by a prompt: ``online`` when ``WANDB_API_KEY`` is set or a
``~/.netrc`` entry exists and ``WANDB_MODE`` does not say otherwise, ``offline`` otherwise;
the offline run folder stays under the Hydra run dir for a later ``wandb sync``.

Besides the resolved (nested) config, a run's config carries flat ``setting/<key>`` entries
(:func:`setting_config`: model, dataset, method, seed, units, rank, pca_reference, init, lr,
max_epochs, num_classes, the conventions and compat, the run dir, and — once known — the
selected-unit and component counts) for W&B grouping and filters; :func:`log_summary` writes the
run's summary row (``final/*``).  ``task=dashboard`` builds its workspace on these keys.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from hydra.utils import instantiate

from ..results import CONVENTION_KEYS, SETTING_KEYS

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


SETTING_PREFIX = "setting/"
SETTING_CONFIG_KEYS = ("model", "dataset", "method", "seed", *SETTING_KEYS, "n_selected_units", "kept_components",
                       "trainable_params", "num_classes", *CONVENTION_KEYS, "run_dir")
SUMMARY_KEYS = ("val_accuracy", "test_accuracy", "zero_shot_val_accuracy", "zero_shot_test_accuracy", "gain",
                "trainable_params", "kept_components", "n_selected_units", "best_epoch", "epochs", "lr", "wall_seconds")


def setting_config(fields: dict) -> dict:
    """``{setting/<key>: value}`` for the :data:`SETTING_CONFIG_KEYS` present in ``fields`` (scalars)."""
    return {SETTING_PREFIX + k: fields[k] for k in SETTING_CONFIG_KEYS
            if k in fields and (fields[k] is None or isinstance(fields[k], (str, int, float, bool)))}


def log_summary(logger, fields: dict) -> None:
    """The run's summary row: ``final/<key>`` for the numeric :data:`SUMMARY_KEYS` of ``fields``
    (``gain`` = test − zero-shot test) to the logger; on W&B also the run summary's ``flags``
    and the config's ``setting/*`` keys known only now (e.g. selected units, kept components)."""
    if logger is None:
        return
    fields = dict(fields)
    if "test_accuracy" in fields and "zero_shot_test_accuracy" in fields:
        fields["gain"] = fields["test_accuracy"] - fields["zero_shot_test_accuracy"]
    logger.log_metrics({"final/" + k: fields[k] for k in SUMMARY_KEYS
                        if isinstance(fields.get(k), (int, float)) and not isinstance(fields.get(k), bool)})
    if type(logger).__name__ == "WandbLogger":
        run = logger.experiment
        run.config.update(setting_config(fields), allow_val_change=True)
        if fields.get("flags"):
            run.summary["flags"] = "; ".join(map(str, fields["flags"]))


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
