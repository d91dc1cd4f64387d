"""Lightning glue: an adapter + a frozen classifier head, trained with Schedule-Free AdamW.

Schedule-free optimisers keep two parameter sequences and must be told which one the
model should hold: ``optimizer.train()`` before any training step (also before the LR
finder's steps, which run before ``on_fit_start``: hence the call right where the
optimizer is created) and ``optimizer.eval()`` before validation, testing and
checkpointing, so that the checkpoint holds the averaged weights that were validated.
"""
from __future__ import annotations

import lightning.pytorch as pl
import schedulefree
import torch
import torch.nn.functional as F
import torchmetrics



class TrainingDiverged(RuntimeError):
    """The loss or a trained parameter became NaN or infinite: nothing of the job is stored."""


class AdapterModule(pl.LightningModule):
    """``head(adapter(**feed(batch)))`` with cross-entropy; ``feed`` is the job's
    :class:`~residual_exp.train.data.Feed` (default: batches already hold the adapter's inputs)."""

    def __init__(self, adapter, head, lr: float, weight_decay: float = 0.0, feed=None) -> None:
        super().__init__()
        self.adapter = adapter
        self.feed = feed                  # a plain object (train/data.py Feed): not in the state dict
        self.head = head
        self.lr = lr                      # attribute name read by Lightning's LR finder
        self.weight_decay = weight_decay
        nc = head.num_classes
        # micro-averaged top-1 (torchmetrics defaults to macro for multiclass)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(nc, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(nc, average="micro")
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(nc, average="micro")

    # --- forward ------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        inputs = self.feed(batch) if self.feed is not None else {k: v for k, v in batch.items() if k != "label"}
        return self.head(self.adapter(**inputs))

    def _step(self, batch: dict, metric) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["label"])
        metric.update(logits, batch["label"])
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, self.train_acc)
        if not bool(torch.isfinite(loss)):
            raise TrainingDiverged(f"training diverged: loss {float(loss)} at epoch {self.current_epoch}, step "
                                   f"{self.global_step} (lr {self.lr:g}); lower method.lr or check the data and "
                                   "the bases — nothing of this job is stored")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def on_train_epoch_end(self) -> None:
        self._check_finite()
        self.log("train/acc", self.train_acc.compute()); self.train_acc.reset()

    def validation_step(self, batch, batch_idx):
        loss = self._step(batch, self.val_acc)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch["label"]))

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc.compute(), prog_bar=True); self.val_acc.reset()

    def test_step(self, batch, batch_idx):
        loss = self._step(batch, self.test_acc)
        self.log("test/loss", loss, on_epoch=True, batch_size=len(batch["label"]))

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute()); self.test_acc.reset()

    # --- schedule-free bookkeeping --------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = schedulefree.AdamWScheduleFree(params, lr=self.lr, weight_decay=self.weight_decay)
        opt.train()
        return opt

    def _sf(self, mode: str) -> None:
        if self._trainer is None:
            return
        for opt in self.trainer.optimizers:
            if hasattr(opt, mode):
                getattr(opt, mode)()

    def on_train_epoch_start(self) -> None:
        self._sf("train")

    def on_validation_epoch_start(self) -> None:
        self._sf("eval")

    def on_test_epoch_start(self) -> None:
        self._sf("eval")

    def on_save_checkpoint(self, checkpoint) -> None:
        self._sf("eval")
        # re-read the (now averaged) weights into the checkpoint being written
        checkpoint["state_dict"] = self.state_dict()

    def _check_finite(self) -> None:
        bad = [n for n, p in self.adapter.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingDiverged(f"training diverged: non-finite values in {', '.join(bad)} after epoch "
                                   f"{self.current_epoch} (lr {self.lr:g}); nothing of this job is stored")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # after validation (eval mode) training resumes: swap back to the training sequence
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None and hasattr(opt, "param_groups") and not opt.param_groups[0].get("train_mode", True):
            opt.train()
