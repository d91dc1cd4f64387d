"""The stages of one experiment, callable without Hydra: ``run(cfg) -> exit code``.

``task=train`` (the default)::

    backbone ─► classifier (zero-shot text head, or train-split prototypes)
             ─► encode train / val / test once (cache)            ─► zero-shot accuracy
             ─► PCA bases per unit on the reference split (cache)
             ─► adapter (method) ─► Schedule-Free AdamW, early stopping on val
             ─► test on the best-val checkpoint ─► results.json + table

Other tasks (``task=check_decomposition``, ``inspect_data``, ``pretrain_tiny_clip``, …)
are dispatched from :data:`TASKS`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

RESULT_KEYS = ("model", "dataset", "method", "trainable_params", "val_accuracy", "test_accuracy",
               "zero_shot_val_accuracy", "zero_shot_test_accuracy", "seed", "wall_seconds")


# --- helpers ------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available on this machine")
    return device


def run_dir_of(cfg) -> Path:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # outside a Hydra run (tests calling run(cfg) directly)
        return Path(os.getcwd())


def format_table(records: list[dict]) -> str:
    cols = [("model", "model"), ("dataset", "dataset"), ("method", "method"), ("params", "trainable_params"),
            ("zero-shot test", "zero_shot_test_accuracy"), ("val", "val_accuracy"), ("test", "test_accuracy"),
            ("seconds", "wall_seconds")]
    def fmt(key: str, v) -> str:
        if isinstance(v, float):
            return f"{v:.1f}" if key == "wall_seconds" else f"{v:.4f}"
        return str(v)
    rows = [[h for h, _ in cols]] + [[fmt(k, r.get(k, "")) for _, k in cols] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    line = lambda row: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def write_results(records: list[dict], run_dir: Path) -> Path:
    from .atomic import atomic_write_text
    path = run_dir / "results.json"
    atomic_write_text(path, json.dumps(records, indent=2))
    return path


# --- the train task -----------------------------------------------------------------------
def train(cfg: DictConfig) -> int:
    """Zero-shot and ``cfg.method`` on ``cfg.dataset``: the stages below, in order."""
    from .cache import Cache
    from .classifiers import frozen_classifier
    from .data.registry import build_split
    from .encode import model_identity

    t_start = time.time()
    seed_everything(cfg.seed)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cache = Cache(cfg.cache.dir, enabled=cfg.cache.enabled)

    backbone = frozen_backbone(cfg.model, device)
    splits = {s: build_split(cfg.dataset, s, backbone.transform) for s in ("train", "val", "test")}
    log.info("%s: %s", cfg.dataset.name, {s: len(d) for s, d in splits.items()})
    enc = {s: encode(cfg, backbone, splits[s], cache, device) for s in splits}
    head = frozen_classifier(backbone, splits["train"].classnames, splits["train"].templates, cache,
                             model_identity(cfg.model, cfg.seed), lambda: enc["train"], device,
                             cfg.trainer.progress_bar)

    zs = {s: accuracy(head, enc[s]) for s in ("val", "test")}
    common = dict(model=cfg.model.name, dataset=cfg.dataset.name, seed=int(cfg.seed),
                  zero_shot_val_accuracy=zs["val"], zero_shot_test_accuracy=zs["test"])
    records = [dict(common, method="base", trainable_params=0, val_accuracy=zs["val"], test_accuracy=zs["test"],
                    wall_seconds=round(time.time() - t_start, 2))]
    if cfg.method.name != "base":
        records.append(dict(common, **train_method(cfg, backbone, splits, enc, head, cache, device, run_dir)))

    path = write_results(records, run_dir)
    print(format_table(records))
    print(f"results: {path}")
    return 0


def frozen_backbone(model_cfg, device: str):
    """The backbone in eval mode with every parameter frozen."""
    from .backbones.base import build_backbone
    backbone = build_backbone(model_cfg).to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def encode(cfg, backbone, split_ds, cache, device: str):
    """Stage 1: decompose every image of a split once (cached)."""
    from .encode import dataset_identity, encode_split, model_identity
    ident = {"model": model_identity(cfg.model, cfg.seed),
             "dataset": dataset_identity(cfg.dataset, split_ds.split, len(split_ds), backbone.transform)}
    return encode_split(backbone, split_ds, cache, ident, device, cfg.dataset.batch_size, cfg.dataset.num_workers,
                        cfg.cache.dtype, cfg.cache.memory_budget_gb, cfg.trainer.progress_bar)


def bases(cfg, backbone, cache, device: str):
    """Stage 3: per-unit PCA bases on ``pca.reference`` / ``pca.split`` (cached)."""
    from .data.registry import build_split
    from .encode import fit_bases, model_identity, subsample_split
    ref_cfg = cfg.dataset if cfg.pca.reference is None else _reference_dataset_cfg(cfg)
    ref, ref_ident = subsample_split(build_split(ref_cfg, cfg.pca.split, backbone.transform), ref_cfg,
                                     cfg.pca.split, backbone.transform, cfg.pca.max_samples, cfg.seed)
    ident = {"model": model_identity(cfg.model, cfg.seed), "dataset": ref_ident}
    return fit_bases(backbone, ref, cache, ident, device, ref_cfg.batch_size, ref_cfg.num_workers,
                     cfg.trainer.progress_bar)


def train_method(cfg, backbone, splits, enc, head, cache, device: str, run_dir: Path) -> dict:
    """Stage 4: build the adapter, train it (cached tensors or backbone in the loop), test the
    best-val checkpoint, save λ.  Returns the method's result fields."""
    from .methods import NEEDS_BASES, build_adapter
    from .train.data import ImageItems, StreamedEncoded, batches, prepare_encoded
    from .train.fit import fit_and_test
    from .train.loggers import build_logger, finish_logger
    from .train.module import AdapterModule

    t0, method = time.time(), cfg.method.name
    unit_basis = output_basis = None
    if method in NEEDS_BASES or cfg.method.others == "mean":
        unit_basis, output_basis = bases(cfg, backbone, cache, device)
    adapter = build_adapter(cfg.method, cfg.pca, backbone.layout, backbone.output_dim, unit_basis,
                            output_basis, backbone=backbone, seed=cfg.seed).float()

    in_loop = method == "finetune" or not cfg.method.cache
    if in_loop:
        data = {s: ImageItems(splits[s]) for s in splits}
    else:   # encodings over the memory budget are streamed and prepared per batch
        stream = any(isinstance(e.units, np.memmap) for e in enc.values())
        data = {s: (StreamedEncoded(e, adapter.needs, torch.float32) if stream
                    else prepare_encoded(adapter, e, torch.float32)) for s, e in enc.items()}
        in_loop = stream
    loaders = {s: batches(d, cfg.trainer.batch_size, s == "train", cfg.trainer.num_workers, cfg.seed)
               for s, d in data.items()}
    lr = cfg.trainer.lr if cfg.trainer.lr is not None else cfg.method.lr
    module = AdapterModule(adapter, head, lr, cfg.method.weight_decay, prepare_on_the_fly=in_loop,
                           backbone=backbone)
    trainer_cfg = cfg.trainer
    if method == "finetune" and device.startswith("cuda") and trainer_cfg.precision == "32-true":
        # fine-tuning a ViT-L in fp32 is needlessly slow: bf16 autocast (fp32 master weights)
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"precision": "bf16-mixed"})

    logger = build_logger(cfg.get("logger"), run_dir, OmegaConf.to_container(cfg, resolve=True))
    code = 1
    try:
        with training_threads(adapter, trainer_cfg, device, in_loop):
            res = fit_and_test(module, loaders, trainer_cfg, run_dir, logger, device,
                               grad_clip=cfg.method.grad_clip, seed=cfg.seed)
        save_trained(adapter, backbone.layout, run_dir / "lambda.safetensors", method)
        rec = dict(method=method, trainable_params=adapter.trainable_params(), val_accuracy=res.val_accuracy,
                   test_accuracy=res.test_accuracy, best_epoch=res.best_epoch, epochs=res.epochs_run,
                   lr=res.lr, wall_seconds=round(time.time() - t0, 2))
        if logger is not None:
            logger.log_metrics({"final/" + k: v for k, v in rec.items() if isinstance(v, (int, float))})
        code = 0
        return rec
    finally:
        finish_logger(logger, code)


@contextmanager
def training_threads(adapter, trainer_cfg, device: str, in_loop: bool):
    """Torch CPU threads while λ trains.  Steps over cached tensors of a small adapter are
    far below the cost of waking a thread pool (10× slower on a busy 2-core machine), so
    ``trainer.cpu_threads=null`` uses one thread when ``batch × adapter size < 2·10⁸``."""
    n = trainer_cfg.cpu_threads
    if n is None and str(device) == "cpu" and not in_loop:
        size = sum(t.numel() for t in list(adapter.parameters()) + list(adapter.buffers()))
        n = 1 if size * trainer_cfg.batch_size < 2e8 else None
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def accuracy(head, enc) -> float:
    """Micro top-1 accuracy of ``head`` on cached features."""
    f = torch.from_numpy(np.asarray(enc.features)).float()
    with torch.no_grad():
        pred = torch.cat([head(f[i:i + 4096]).argmax(-1) for i in range(0, len(f), 4096)])
    return float((pred == torch.from_numpy(np.asarray(enc.labels))).double().mean())


def _reference_dataset_cfg(cfg):
    """The ``dataset`` node of ``pca.reference`` (its ``conf/dataset`` file, resolved against ``paths``)."""
    from .config import DatasetConfig
    name = cfg.pca.reference
    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.exists():
        from .data.registry import list_datasets
        raise KeyError(f"pca.reference={name!r} is not a dataset config; valid: {', '.join(list_datasets())}")
    node = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(path))
    ctx = OmegaConf.create({"paths": OmegaConf.to_container(cfg.paths, resolve=True), "dataset": node})
    return OmegaConf.create(OmegaConf.to_container(ctx, resolve=True)["dataset"])


def save_trained(adapter, layout, path: Path, method: str) -> None:
    """The trained parameters as safetensors, written atomically.

    Spectral methods: ``lambda`` ``[S, K]`` (dense; pruned PCs hold ``dropped_value``) and
    ``mask`` ``[S, K]``; ``residual_coarse``: ``lambda`` ``[S]``; metadata ``units`` lists the
    S unit names (``["output"]`` for ``spectral_adapter``).  ``linear_adapter``: its weight
    and bias.  ``finetune``: nothing here (the tower is in ``checkpoints/best.ckpt``).
    """
    from safetensors.torch import save_file

    from .atomic import atomic_path
    if method == "finetune":
        return
    meta = {"method": method}
    if hasattr(adapter, "lambdas"):
        tensors = {"lambda": adapter.lambdas(), "mask": adapter.mask}
        meta["units"] = json.dumps(["output"] if adapter.from_feature
                                   else [layout.names[i] for i in adapter.selected.tolist()])
    elif hasattr(adapter, "selected"):
        tensors = {"lambda": adapter.lam}
        meta["units"] = json.dumps([layout.names[i] for i in adapter.selected.tolist()])
    else:
        tensors = dict(adapter.state_dict())
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


# --- dispatch -----------------------------------------------------------------------------
def _task(name: str):
    if name == "train":
        return train
    if name == "check_decomposition":
        from .tasks.check_decomposition import check_decomposition
        return check_decomposition
    if name == "inspect_data":
        from .tasks.inspect_data import inspect_data
        return inspect_data
    if name == "pretrain_tiny_clip":
        return _pretrain
    if name == "report":
        from .tasks.report import report
        return report
    if name == "analysis":
        from .tasks.analysis import analysis
        return analysis
    raise KeyError(f"task.name={name!r}; valid: train, check_decomposition, inspect_data, "
                   "pretrain_tiny_clip, report, analysis")


def _pretrain(cfg) -> int:
    from .backbones.tiny_clip import CHECKPOINT, pretrain_tiny_clip
    t = cfg.task
    meta = pretrain_tiny_clip(out=t.out or CHECKPOINT, n_images=t.n_images, epochs=t.epochs,
                              batch_size=t.batch_size, lr=t.lr, seed=t.seed, progress=True)
    print(f"tiny CLIP written to {t.out or CHECKPOINT}: {meta}")
    return 0


def quiet_libraries() -> None:
    """Keep our INFO logs, silence the chatter of libraries that log to the root logger."""
    root = logging.getLogger()
    if root.level < logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("residual_exp").setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def run(cfg: DictConfig) -> int:
    """Run the task selected by ``cfg.task.name``; returns the process exit code.

    ``task=train`` is resumable (:mod:`.sweep`): with ``resume=true`` (the default) a job
    whose results are already in ``outputs/results`` for the same resolved config is not
    run again, only copied into the new run dir.
    """
    quiet_libraries()
    task = _task(cfg.task.name)
    if cfg.task.name == "train":
        from .sweep import resumable
        task = resumable(task)
    return int(task(cfg) or 0)
