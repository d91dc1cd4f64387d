"""``task=plan``: the cost of a run or of a sweep before launching it (no model built, no image read).

    python -m residual_exp task=plan +experiment=sweep/paper
    python -m residual_exp task=plan +experiment=sweep/paper 'task.grid.model=[clip_b,clip_l]'   # a slice
    python -m residual_exp task=plan +experiment=sweep/paper model=clip_b                   # one model
    python -m residual_exp task=plan model=openclip_l dataset=cifar100 pca=imagenet  # one run

The grid is the sweep's ``hydra.sweeper.params`` (or ``task.grid``), with command-line overrides
of those keys taking precedence; each method's batch size comes from its preset.  Prints, per
model, the images to encode (train / val / test, and the reference set of the bases), the cache
bytes and the disk still needed, how many of its encodings are cached already, and estimated
GPU hours (encode, λ training — upper bound at max_epochs and typical — and finetune), then the
totals; writes ``plan.csv`` / ``plan.md`` into the run dir.  See :mod:`residual_exp.plan`.
"""
from __future__ import annotations

import itertools

from omegaconf import OmegaConf

from ..catalog import needs_bases, spec, spec_of
from ..compose import group_node
from ..pipeline import reference_dataset
from ..plan import Throughput, plan_rows
from ..runtime import run_dir_of
from ..tables import text_table, write_table

GRID_KEYS = ("model", "dataset", "method")


def _grid(cfg) -> dict[str, list[str]]:
    grid = {k: [str(v) for v in cfg.task.grid[k]] for k in GRID_KEYS if cfg.task.grid[k]}
    try:
        from hydra.core.hydra_config import HydraConfig
        hc = HydraConfig.get()
        params = dict(hc.sweeper.get("params") or {})
        cli = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in hc.overrides.task if "=" in o}
    except ValueError:                     # outside a Hydra app (tests calling run(cfg))
        params, cli = {}, {}
    for k in GRID_KEYS:
        if k in cli:
            grid[k] = cli[k].split(",")
        elif k not in grid and k in params:
            grid[k] = str(params[k]).split(",")
        grid.setdefault(k, [str(cfg[k].name)])
    return grid


def model_spec(model_cfg):
    """The job's model spec; a generic preset (``model=timm`` / ``model=open_clip``) states no shape,
    so its image tower is built on the meta device to read one (nothing allocated or downloaded)."""
    s = model_cfg.spec
    if s.layers is None and model_cfg.get("arch"):
        from ..backbones.shapes import arch_shape
        L, H, Dh, W, D, size, patch, J = arch_shape(model_cfg)
        s = OmegaConf.merge(s, dict(layers=L, heads=H, head_dim=Dh, width=W, output_dim=D, image_size=size,
                                    patch=patch, pool_heads=J))
    return s


def plan(cfg) -> int:
    grid = _grid(cfg)
    methods = {m: (cfg.method if m == cfg.method.name else group_node("method", m, cfg)) for m in grid["method"]}
    datasets = {d: (cfg.dataset if d == cfg.dataset.name else group_node("dataset", d, cfg)) for d in grid["dataset"]}
    models = {m: (model_spec(cfg.model) if m == cfg.model.name else spec("model", m)) for m in grid["model"]}
    cells = []
    for model, dataset, method in itertools.product(grid["model"], grid["dataset"], grid["method"]):
        ref = reference_dataset(cfg.pca, datasets[dataset])
        mc, ms = methods[method], spec_of("method", methods[method])
        cells.append({"model": model, "model_spec": models[model], "dataset": dataset, "method": method,
                      "dataset_spec": spec_of("dataset", datasets[dataset]), "batch_size": int(mc.batch_size),
                      "trains": ms.trains, "finetune": ms.backbone_in_loop, "needs_bases": needs_bases(mc),
                      "reference": ref.name, "reference_spec": spec_of("dataset", ref), "reference_split": cfg.pca.split,
                      "reference_max": cfg.pca.max_samples, "params": dict(datasets[dataset].get("params") or {}),
                      "reference_params": dict(ref.get("params") or {})})
    t = cfg.task.throughput
    tp = Throughput(dict(t.encode), dict(t.loader), float(t.train_steps), dict(t.finetune))
    dtype = cfg.cache.dtype if cfg.cache.dtype != "auto" else "float16"
    rows = plan_rows(cells, tp, cfg.cache.dir, cfg.cache.layout, dtype, int(cfg.trainer.max_epochs),
                     float(cfg.task.typical_epoch_fraction))
    total = {"model": "total", **{k: sum(r[k] for r in rows) for k in rows[0] if k not in ("model", "bytes_per_image")}}
    cols = ["model", "pairs", "jobs", "train_images", "val_images", "test_images", "reference_images", "cache_GB",
            "cached_splits", "splits", "disk_needed_GB", "encode_h", "train_h", "train_typical_h", "finetune_h"]
    fmt = lambda k, v: f"{v:,.2f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))
    print(f"plan: {len(cells)} jobs = {len(grid['model'])} models × {len(grid['dataset'])} datasets × "
          f"{len(grid['method'])} methods; cache.layout={cfg.cache.layout}, dtype={dtype}, "
          f"max_epochs={cfg.trainer.max_epochs}; GPU hours from task.throughput (one H200, conf/task/plan.yaml)")
    print(text_table(rows + [total], cols, fmt=fmt, right_from=1))
    no_ft = total["encode_h"] + total["train_h"]
    typical = total["encode_h"] + total["train_typical_h"]
    print(f"\nwhole grid without finetune: {typical:.2f} GPU-hours typical, {no_ft:.2f} upper bound "
          f"(every job to max_epochs); finetune adds {total['finetune_h']:.2f}")
    print(f"cache: {total['cache_GB']:.1f} GB in all, {total['disk_needed_GB']:.1f} GB still to write under {cfg.cache.dir}")
    out = run_dir_of(cfg)
    write_table(rows + [total], out / "plan", f"Plan of {len(cells)} jobs", columns=cols + ["bytes_per_image"])
    return 0
