"""Train one adapter under the paper's protocol and test its best-val checkpoint.

Protocol (DESIGN.md §1): Schedule-Free AdamW, at most ``trainer.max_epochs`` (30) epochs,
early stopping on val accuracy (patience 5), test on the best-val checkpoint; the per-epoch
history goes to ``history.csv`` in the run dir (:class:`~.callbacks.HistoryWriter`).  With
``trainer.lr_find=true`` Lightning's LR finder picks the learning rate first.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from ..atomic import save_figure
from ..results import HISTORY_FILE
from .callbacks import HistoryWriter, LambdaMonitor
from .module import AdapterModule

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    val_accuracy: float
    test_accuracy: float
    best_epoch: int
    epochs_run: int
    lr: float
    seconds: float
    checkpoint: str
    lr_finder: dict | None = None     # trainer.lr_find: suggested / preset / used lr (and why the preset was kept)


def _accelerator(trainer_cfg, device: str) -> str:
    if trainer_cfg.accelerator != "auto":
        return trainer_cfg.accelerator
    return "gpu" if str(device).startswith("cuda") else "cpu"


def fit_and_test(module: AdapterModule, loaders: dict, trainer_cfg, out_dir: Path, logger=None,
                 device: str = "cpu", grad_clip: float | None = None, seed: int = 0) -> FitResult:
    """``loaders``: ``{"train", "val", "test"}`` DataLoaders of batch dicts."""
    t0 = time.time()
    ckpt_dir = Path(out_dir) / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/acc", mode="max",
                                 save_top_k=1, save_weights_only=True, enable_version_counter=False)
    stopper = EarlyStopping(monitor="val/acc", mode="max", patience=trainer_cfg.patience)
    monitors = [LambdaMonitor()] if logger is not None else []   # λ histograms, trainable params
    common = dict(accelerator=_accelerator(trainer_cfg, device), devices=trainer_cfg.devices,
                  precision=trainer_cfg.precision, enable_model_summary=False, num_sanity_val_steps=0,
                  gradient_clip_val=grad_clip, default_root_dir=str(out_dir), deterministic=False,
                  plugins=_no_requeue_plugins())
    trainer = pl.Trainer(
        max_epochs=trainer_cfg.max_epochs, logger=logger if logger is not None else False,
        callbacks=[checkpoint, stopper, HistoryWriter(Path(out_dir) / HISTORY_FILE), *monitors], enable_progress_bar=trainer_cfg.progress_bar,
        log_every_n_steps=10, **common)
    if trainer_cfg.lr_find:
        find_lr(module, loaders, trainer_cfg, common, Path(out_dir))
    trainer.fit(module, train_dataloaders=loaders["train"], val_dataloaders=loaders["val"])
    best_val = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
    test = trainer.test(module, dataloaders=loaders["test"], ckpt_path=checkpoint.best_model_path or None,
                        verbose=False, weights_only=True)
    best_epoch = _best_epoch(checkpoint)
    return FitResult(best_val, float(test[0]["test/acc"]), best_epoch, trainer.current_epoch,
                     float(module.lr), time.time() - t0, checkpoint.best_model_path,
                     getattr(module, "lr_finder", None))


LR_FIND_STEPS = 100


def find_lr(module: AdapterModule, loaders: dict, trainer_cfg, common: dict, out_dir: Path) -> None:
    """Lightning's LR finder (schedule-free aware, see :mod:`.module`) on a trainer of its own,
    so that it gets its :data:`LR_FIND_STEPS` steps however few batches an epoch has; sets
    ``module.lr`` to the suggestion (kept unchanged, with a warning, when there is none) and
    saves ``lr_find.png``.  The finder restores the module's initial weights afterwards."""
    from lightning.pytorch.tuner import Tuner
    epochs = math.ceil(LR_FIND_STEPS / max(1, len(loaders["train"]))) + 1
    tuner = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       **common)
    before = module.lr
    finder = Tuner(tuner).lr_find(module, train_dataloaders=loaders["train"], num_training=LR_FIND_STEPS,
                                  update_attr=True)
    suggestion = finder.suggestion() if finder is not None else None
    why = implausible_lr(suggestion, before)
    module.lr_finder = {"suggested": None if suggestion is None else float(suggestion), "preset": float(before),
                        "used": float(before) if why else float(suggestion)}
    if why:
        module.lr = before
        module.lr_finder["kept_preset"] = why
        log.warning("LR finder: %s; keeping the preset lr=%.3g (method.lr; the loss curve is in lr_find.png)",
                    why, before)
    else:
        module.lr = float(suggestion)
        log.info("LR finder suggests lr=%.3g (was %.3g)", module.lr, before)
    if finder is not None:
        save_figure(finder.plot(suggest=suggestion is not None), out_dir / "lr_find.png")


# An LR finder's pick is used only within a factor LR_FIND_FACTOR of the preset (method.lr, the paper's value)
# and inside LR_FIND_RANGE; anything else is a loss curve without a usable slope (a tiny, already well-fitted
# adapter: the steepest descent sits at the finder's lower bound), and the preset is kept, with a warning.
LR_FIND_FACTOR = 100.0
LR_FIND_RANGE = (1e-6, 10.0)


def implausible_lr(suggestion: float | None, preset: float) -> str | None:
    """Why the finder's ``suggestion`` should not replace ``preset`` (None: use it)."""
    if suggestion is None or not math.isfinite(suggestion):
        return "no suggestion (loss curve without a usable slope)"
    if suggestion < preset / LR_FIND_FACTOR:
        return (f"its suggestion lr={suggestion:.3g} is more than {LR_FIND_FACTOR:g}x below the preset "
                f"{preset:.3g}")
    if suggestion > preset * LR_FIND_FACTOR:
        return (f"its suggestion lr={suggestion:.3g} is more than {LR_FIND_FACTOR:g}x above the preset "
                f"{preset:.3g}")
    lo, hi = LR_FIND_RANGE
    if not lo <= suggestion <= hi:
        return f"its suggestion lr={suggestion:.3g} is outside the sane range [{lo:g}, {hi:g}]"
    return None


def _best_epoch(checkpoint: ModelCheckpoint) -> int:
    path = checkpoint.best_model_path
    if not path:
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=True).get("epoch", -1))


def _no_requeue_plugins() -> list:
    """Under SLURM, leave requeueing to submitit: Lightning's auto-requeue is switched off.

    Only where Lightning itself would pick its SLURM environment (``SLURMEnvironment.detect()``:
    launched through ``srun``, as submitit does, and not an interactive ``bash``/``interactive``
    job); passing it merely because ``SLURM_JOB_ID`` is set would, inside an ``salloc`` shell with
    several tasks, make a single process wait for ``SLURM_NTASKS`` ranks.  With
    ``auto_requeue=False`` Lightning installs no SIGUSR1 handler and saves no ``hpc_ckpt``:
    submitit's own signal handling requeues the job (``hydra.launcher.max_num_timeout``) and
    the results store skips it if it had finished (``residual_exp/sweep.py``).
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


@contextmanager
def training_threads(adapter, trainer_cfg, batch_size: int, device: str, in_loop: bool):
    """Torch CPU threads while λ trains.  Steps over cached tensors of a small adapter are
    far below the cost of waking a thread pool (10× slower on a busy 2-core machine), so
    ``trainer.cpu_threads=null`` uses one thread when ``batch × adapter size < 2·10⁸``."""
    n = trainer_cfg.cpu_threads
    if n is None and str(device) == "cpu" and not in_loop:
        size = sum(t.numel() for t in list(adapter.parameters()) + list(adapter.buffers()))
        n = 1 if size * batch_size < 2e8 else None
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
