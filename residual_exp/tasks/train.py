"""``task=train`` (the default): zero-shot and ``method`` on ``dataset``, in named stages::

    backbone ─► encode train / val / test once (cache)              ─► zero-shot accuracy
             ─► classifier (zero-shot text head, or train-split prototypes)
             ─► PCA bases per unit on pca.reference (cache)          (spectral methods)
             ─► adapter (method) ─► Schedule-Free AdamW, early stopping on val
             ─► test on the best-val checkpoint ─► results.json + λ + table

The task registry wraps it in the results store (:func:`residual_exp.store.resumable`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..classifiers import top1_accuracy
from ..data.registry import build_split
from ..methods import build_adapter, needs_bases
from ..pipeline import Session
from ..results import LAMBDA_FILE, result_flags, results_table, save_lambda, write_classes, write_results
from ..runtime import run_dir_of
from ..train.data import ImageItems, StreamedEncoded, batches, prepare_encoded, prepared_bytes
from ..train.fit import fit_and_test, training_threads
from ..train.loggers import build_logger, finish_logger
from ..train.module import AdapterModule

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
EVAL_BATCH_GPU = 8192                # validation / test batches on a GPU (the metric does not depend on it)


def train(cfg: DictConfig) -> int:
    """Zero-shot and ``cfg.method`` on ``cfg.dataset``: the stages below, in order."""
    t_start = time.time()
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = {name: build_split(cfg.dataset, name) for name in SPLITS}    # the data is checked before the model
    s = Session.open(cfg)
    for d in splits.values():
        d.transform = s.backbone.transform
    log.info("%s: %s", cfg.dataset.name, {name: len(d) for name, d in splits.items()})
    enc: dict = {}
    encoded = lambda name: enc[name] if name in enc else enc.setdefault(name, s.encode_dataset(splits[name], cfg.dataset))
    # the head first: a text head whose classes cannot be told apart is refused before any image is encoded
    # (prototype heads need the train encoding, and check it before training)
    head = s.classifier(cfg.dataset, splits["train"].classnames, splits["train"].templates,
                        train_encoding=lambda: encoded("train"))
    for name in SPLITS:
        encoded(name)
    write_classes(splits["train"].classnames, splits["train"].templates, run_dir)

    zs = {name: top1_accuracy(head, enc[name].features, enc[name].labels) for name in ("val", "test")}
    train_split = splits["train"]
    common = dict(model=cfg.model.name, dataset=train_split.label or cfg.dataset.name, seed=int(cfg.seed),
                  **({"dataset_split": dict(train_split.record, sizes={n: len(d) for n, d in splits.items()})}
                     if train_split.record else {}),
                  zero_shot_val_accuracy=zs["val"], zero_shot_test_accuracy=zs["test"],
                  **conventions_record(cfg, s.backbone.has_text))
    records = [dict(common, method="base", trainable_params=0, val_accuracy=zs["val"], test_accuracy=zs["test"],
                    wall_seconds=round(time.time() - t_start, 2))]
    if cfg.method.name != "base":
        records.append(dict(common, **train_method(cfg, s, splits, enc, head, run_dir)))
        warn_below_zero_shot(records[-1], zs["val"])
    for rec in records:                       # results that look fine and are not: said in the table and the record
        rec["flags"] = result_flags(rec, head.num_classes)

    path = write_results(records, run_dir)
    print(results_table(records))
    print(f"results: {path}")
    return 0


def warn_below_zero_shot(rec: dict, zero_shot_val: float, margin: float = 0.02) -> bool:
    """Say so when a trained method ends clearly below the frozen model on val (its best epoch
    included): a learning rate, epoch budget or initialisation that did not let it train."""
    if rec["val_accuracy"] >= zero_shot_val - margin:
        return False
    log.warning("%s ended below zero-shot on val (%.4f < %.4f, best epoch %s of %s): the result is reported as "
                "is; check method.lr, method.init and trainer.max_epochs", rec["method"], rec["val_accuracy"],
                zero_shot_val, rec.get("best_epoch"), rec.get("epochs"))
    return True


def conventions_record(cfg, has_text: bool) -> dict:
    """What a result was computed under (FIDELITY.md): unit definition, classifier, EVR rule,
    compat mode, cache layout."""
    c = cfg.conventions
    return {"units_convention": c.units, "classifier": "text" if has_text else f"prototype-{c.prototype}",
            "evr_rule": c.evr_rule, "compat": cfg.compat, "cache_layout": cfg.cache.layout}


def train_method(cfg, s: Session, splits: dict, enc: dict, head, run_dir: Path) -> dict:
    """Build the adapter, train it (cached tensors or backbone in the loop), test the best-val
    checkpoint, save λ.  Returns the method's result fields."""
    t0, method = time.time(), cfg.method.name
    unit_basis = output_basis = None
    if needs_bases(cfg.method):
        unit_basis, output_basis = s.reference_bases()
    adapter = build_adapter(cfg.method, s.source, s.backbone.output_dim, unit_basis, output_basis,
                            backbone=s.backbone, seed=cfg.seed, evr_rule=cfg.conventions.evr_rule,
                            compat=cfg.compat).float().to(s.device)
    data, in_loop = training_data(cfg, adapter, splits, enc, s.device)
    eval_batch = cfg.method.batch_size if s.device == "cpu" else max(cfg.method.batch_size, EVAL_BATCH_GPU)
    loaders = {name: batches(d, cfg.method.batch_size if name == "train" else eval_batch, name == "train",
                             cfg.trainer.num_workers if in_loop else 0, cfg.seed)
               for name, d in data.items()}
    module = AdapterModule(adapter, head, cfg.method.lr, cfg.method.weight_decay, prepare_on_the_fly=in_loop,
                           backbone=s.backbone, layout=s.layout)
    logger = build_logger(cfg.get("logger"), run_dir, OmegaConf.to_container(cfg, resolve=True))
    code = 1
    try:
        with training_threads(adapter, cfg.trainer, cfg.method.batch_size, s.device, in_loop):
            res = fit_and_test(module, loaders, cfg.trainer, run_dir, logger, s.device,
                               grad_clip=cfg.method.grad_clip, seed=cfg.seed)
        save_lambda(adapter, s.backbone.layout, run_dir / LAMBDA_FILE, method)
        rec = dict(method=method, trainable_params=adapter.trainable_params(), val_accuracy=res.val_accuracy,
                   test_accuracy=res.test_accuracy, best_epoch=res.best_epoch, epochs=res.epochs_run,
                   lr=res.lr, wall_seconds=round(time.time() - t0, 2),
                   **({"lr_finder": res.lr_finder} if res.lr_finder else {}))
        if logger is not None:
            logger.log_metrics({"final/" + k: v for k, v in rec.items() if isinstance(v, (int, float))})
        code = 0
        return rec
    finally:
        finish_logger(logger, code)


def training_data(cfg, adapter, splits: dict, enc: dict, device: str) -> tuple[dict, bool]:
    """``({split: dataset}, prepare_on_the_fly)``: images (finetune, ``method.cache=false``); the
    cache prepared once and kept on the training device when it fits there (no per-step
    host→device copies); otherwise the stored rows streamed in batches (from memmaps when over
    ``cache.memory_budget_gb``) and prepared per batch."""
    if cfg.method.name == "finetune" or not cfg.method.cache:
        return {name: ImageItems(splits[name]) for name in splits}, True
    need = sum(prepared_bytes(adapter, e, torch.float32) for e in enc.values())
    if device.startswith("cuda"):
        budget = torch.cuda.mem_get_info(torch.device(device))[0] * 0.5
    else:
        budget = cfg.cache.memory_budget_gb * 2**30
    if any(e.streamed for e in enc.values()) or need > budget:
        log.info("prepared training data would take %.2f GiB > %.2f GiB available: streaming and preparing "
                 "per batch", need / 2**30, budget / 2**30)
        return {name: StreamedEncoded(e, torch.float32, device) for name, e in enc.items()}, True
    return {name: prepare_encoded(adapter, e, torch.float32, device=device) for name, e in enc.items()}, False
