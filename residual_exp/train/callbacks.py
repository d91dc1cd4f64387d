"""Lightning callbacks for experiment tracking.

:class:`LambdaMonitor` logs, once at the start of training and after every validation epoch
(when the schedule-free optimizer holds the averaged weights that were validated and get
checkpointed), the trained λ of the adapter (:meth:`~residual_exp.methods.base.Adapter.lambda_values`;
none for methods without λ):

* summary scalars ``lambda/mean``, ``lambda/std``, ``lambda/min``, ``lambda/max``,
  ``lambda/abs_mean`` and ``lambda/frac_negative`` to every logger (CSV included);
* a histogram ``lambda/hist`` to W&B (``wandb.Histogram``) and TensorBoard loggers;
* the trainable parameter count as the hyperparameter ``trainable_params`` at fit start.

:class:`HistoryWriter` (every trained run, with or without a logger) keeps one row per epoch —
``epoch`` (0-based, as ``best_epoch`` in results.json), ``train_loss`` (the epoch's mean),
``val_loss``, ``val_accuracy`` — and rewrites ``history.csv`` atomically after each epoch; the
same row goes to the loggers as ``history/*`` (W&B: plotted against ``history/epoch``).  It
only reads the metrics the module logged: training is unchanged.
"""
from __future__ import annotations

import logging

from pathlib import Path

import lightning.pytorch as pl
import torch

from ..results import write_history

log = logging.getLogger(__name__)


def trained_lambdas(adapter) -> torch.Tensor | None:
    """The trained λ of ``adapter`` as a flat float tensor, or None if it has none."""
    return None if adapter is None else adapter.lambda_values()


def lambda_stats(lam: torch.Tensor) -> dict[str, float]:
    return {"lambda/mean": float(lam.mean()), "lambda/std": float(lam.std()) if lam.numel() > 1 else 0.0,
            "lambda/min": float(lam.min()), "lambda/max": float(lam.max()),
            "lambda/abs_mean": float(lam.abs().mean()), "lambda/frac_negative": float((lam < 0).float().mean())}


class LambdaMonitor(pl.Callback):
    """Per-epoch λ histograms and summaries (see the module docstring)."""

    def __init__(self, bins: int = 64) -> None:
        self.bins = bins

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        n = int(pl_module.adapter.trainable_params())
        for lg in trainer.loggers:
            try:
                lg.log_hyperparams({"trainable_params": n})
            except Exception as e:  # a logger that cannot take hyperparameters
                log.debug("log_hyperparams failed on %s: %s", type(lg).__name__, e)
            if type(lg).__name__ == "WandbLogger":
                lg.experiment.summary["trainable_params"] = n
        self._log(trainer, pl_module, "init")

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking:
            return
        self._log(trainer, pl_module, "epoch")

    def _log(self, trainer, pl_module, when: str) -> None:
        lam = trained_lambdas(pl_module.adapter)
        if lam is None or lam.numel() == 0 or not trainer.loggers:
            return
        step = trainer.global_step
        stats = lambda_stats(lam)
        for lg in trainer.loggers:
            name = type(lg).__name__
            lg.log_metrics(stats, step=step)
            if name == "WandbLogger":
                import wandb
                lg.experiment.log({"lambda/hist": wandb.Histogram(lam.numpy(), num_bins=self.bins),
                                   "trainer/global_step": step})
            elif name == "TensorBoardLogger":
                lg.experiment.add_histogram("lambda/hist", lam, global_step=step)


def _number(v) -> float | None:
    if v is None:
        return None
    return float(v.item() if isinstance(v, torch.Tensor) else v)


class HistoryWriter(pl.Callback):
    """Per-epoch training history to ``path`` (``history.csv``) and the loggers (module docstring).

    Lightning ≥ 2.0 validates at the end of the training epoch, before ``on_train_epoch_end``,
    so the row holds the validation of the same epoch and the epoch-mean training loss.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        m = trainer.callback_metrics
        row = {"epoch": int(trainer.current_epoch), "train_loss": _number(m.get("train/loss_epoch")),
               "val_loss": _number(m.get("val/loss")), "val_accuracy": _number(m.get("val/acc"))}
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        write_history(self.rows, self.path)
        logged = {f"history/{k}": v for k, v in row.items() if v is not None}
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger" and not self.rows[:-1]:
                lg.experiment.define_metric("history/epoch")
                lg.experiment.define_metric("history/*", step_metric="history/epoch")
            lg.log_metrics(logged, step=trainer.global_step)
