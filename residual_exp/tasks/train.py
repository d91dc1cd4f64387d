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

from omegaconf import DictConfig, OmegaConf

from ..catalog import EVAL_SPLITS, RUN_SPLITS, Split, needs_bases
from ..classifiers import record_kind, top1_accuracy
from ..decompose.selection import select
from ..methods import build_adapter
from ..pipeline import Session
from ..results import (BELOW_ZERO_SHOT_MARGIN, LAMBDA_FILE, result_flags, results_table, save_lambda, setting_of,
                       write_classes, write_results)
from ..runtime import run_dir_of
from ..train.data import TrainingData
from ..train.fit import fit_and_test, training_threads
from ..train.loggers import build_logger, finish_logger, log_summary, setting_config
from ..train.module import AdapterModule

log = logging.getLogger(__name__)
EVAL_BATCH_GPU = 8192                # validation / test batches on a GPU (the metric does not depend on it)


def train(cfg: DictConfig) -> int:
    """Zero-shot and ``cfg.method`` on ``cfg.dataset``: the stages below, in order."""
    t_start = time.time()
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = Session.data(cfg.dataset, RUN_SPLITS)                       # the data is checked before the model
    s = Session.open(cfg)
    selected = select(cfg.units, s.backbone.layout, cfg.model.name)      # refused here, before any encoding
    s.preprocess(splits)
    log.info("%s: %s", cfg.dataset.name, {name: len(d) for name, d in splits.items()})
    train = splits[Split.train]
    enc: dict = {}
    encoded = lambda name: enc[name] if name in enc else enc.setdefault(name, s.encode_dataset(splits[name], cfg.dataset))
    # the head first: a text head whose classes cannot be told apart is refused before any image is encoded
    # (a prototype head needs the train encoding, and checks it before training)
    head = s.classifier(cfg.dataset, train.classnames, train.templates, train_encoding=lambda: encoded(Split.train))
    for name in RUN_SPLITS:
        encoded(name)
    write_classes(train.classnames, train.templates, run_dir)

    zs = {name: top1_accuracy(head, enc[name].features, enc[name].labels) for name in EVAL_SPLITS}
    common = dict(model=cfg.model.name, dataset=train.label or cfg.dataset.name, seed=int(cfg.seed),
                  **({"dataset_split": dict(train.record, sizes={n: len(d) for n, d in splits.items()})}
                     if train.record else {}),
                  zero_shot_val_accuracy=zs["val"], zero_shot_test_accuracy=zs["test"],
                  **conventions_record(cfg, s.backbone.has_text), num_classes=len(train.classnames))
    records = [dict(common, method="base", trainable_params=0, val_accuracy=zs["val"], test_accuracy=zs["test"],
                    wall_seconds=round(time.time() - t_start, 2))]
    if cfg.method.spec.trains:
        records.append(dict(common, **train_method(cfg, s, splits, enc, head, run_dir, common, selected)))
        warn_below_zero_shot(records[-1], zs["val"])
    for rec in records:                       # results that look fine and are not: said in the table and the record
        rec["flags"] = result_flags(rec, head.num_classes)

    path = write_results(records, run_dir)
    print(results_table(records))
    print(f"results: {path}")
    return 0


def warn_below_zero_shot(rec: dict, zero_shot_val: float, margin: float = BELOW_ZERO_SHOT_MARGIN) -> bool:
    """Say so when a trained method ends clearly below the frozen model on val (its best epoch
    included): a learning rate, epoch budget or initialisation that did not let it train."""
    if rec["val_accuracy"] >= zero_shot_val - margin:
        return False
    log.warning("%s ended below zero-shot on val (%.4f < %.4f, best epoch %s of %s): the result is reported as "
                "is; check method.lr, method.init and trainer.max_epochs", rec["method"], rec["val_accuracy"],
                zero_shot_val, rec.get("best_epoch"), rec.get("epochs"))
    return True


def selection_record(adapter, layout, selected: list[int]) -> dict:
    """The units a trained method reweighted (names, count) and, for λ per principal component,
    how many components it kept (its λ count)."""
    rec = {"selected_units": [layout.names[i] for i in selected], "n_selected_units": len(selected)}
    if adapter.kept_components() is not None:            # spectral methods: one λ per kept PC
        rec["kept_components"] = adapter.kept_components()
    return rec


def conventions_record(cfg, has_text: bool) -> dict:
    """What a result was computed under (FIDELITY.md): unit definition, classifier (``text`` |
    ``prototype-mean`` | ``prototype-cosine``, the head ``classifier=`` chose), EVR rule, compat
    mode, cache layout."""
    c = cfg.conventions
    return {"units_convention": c.units, "classifier": record_kind(cfg.get("classifier", "auto"), has_text, c.prototype),
            "evr_rule": c.evr_rule, "compat": cfg.compat, "cache_layout": cfg.cache.layout}


def train_method(cfg, s: Session, splits: dict, enc: dict, head, run_dir: Path, common: dict | None = None,
                 selected: list[int] = ()) -> dict:
    """Build the adapter on the ``selected`` units, train it (cached tensors or backbone in the loop),
    test the best-val checkpoint, save λ.  Returns the method's result fields (``common``: the job's
    shared fields, for the logger's ``setting/*`` config keys and summary row)."""
    t0, method = time.time(), cfg.method.name
    config = OmegaConf.to_container(cfg, resolve=True)
    setting = setting_of(config)
    unit_basis = output_basis = None
    if needs_bases(cfg.method):
        unit_basis, output_basis = s.reference_bases()
    adapter = build_adapter(cfg.method, s.source, s.backbone.output_dim, unit_basis, output_basis,
                            backbone=s.backbone, seed=cfg.seed, evr_rule=cfg.conventions.evr_rule,
                            compat=cfg.compat, units=selected, rank=cfg.rank).float().to(s.device)
    data = TrainingData(adapter, splits, enc, s.device, cache=cfg.method.cache,
                        memory_budget_gb=cfg.cache.memory_budget_gb, backbone=s.backbone, layout=s.layout)
    eval_batch = cfg.method.batch_size if s.device == "cpu" else max(cfg.method.batch_size, EVAL_BATCH_GPU)
    loaders = data.loaders(cfg.method.batch_size, eval_batch, cfg.trainer.num_workers, cfg.seed)
    module = AdapterModule(adapter, head, cfg.method.lr, cfg.method.weight_decay, feed=data.feed)
    fields = dict(common or {}, method=method, **setting, run_dir=str(run_dir))
    logger = build_logger(cfg.get("logger"), run_dir, {**config, **setting_config(fields)})
    code = 1
    try:
        with training_threads(adapter, cfg.trainer, cfg.method.batch_size, s.device,
                              data.mode != "prepared"):
            res = fit_and_test(module, loaders, cfg.trainer, run_dir, logger, s.device,
                               grad_clip=cfg.method.grad_clip, seed=cfg.seed)
        save_lambda(adapter, s.backbone.layout, run_dir / LAMBDA_FILE, method)
        rec = dict(method=method, trainable_params=adapter.trainable_params(), val_accuracy=res.val_accuracy,
                   test_accuracy=res.test_accuracy, best_epoch=res.best_epoch, epochs=res.epochs_run,
                   lr=res.lr, wall_seconds=round(time.time() - t0, 2),
                   **{k: setting[k] for k in ("units", "rank", "pca_reference", "init", "max_epochs")},
                   **selection_record(adapter, s.backbone.layout, selected),
                   **({"lr_finder": res.lr_finder} if res.lr_finder else {}))
        log_summary(logger, dict(fields, **rec))
        code = 0
        return rec
    finally:
        finish_logger(logger, code)
