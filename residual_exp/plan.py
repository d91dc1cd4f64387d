"""What a run or a sweep will cost before it starts: images to encode, cache bytes, disk, GPU hours.

Library for ``task=plan`` (no model is built, no image is read).  A dataset's image counts come
from its spec (``conf/dataset/NAME.yaml``: official split sizes, carved with the protocol
:mod:`residual_exp.data.vision` applies), a model's shape from its preset's spec
(``conf/model/NAME.yaml``), throughputs from the task config (``task.throughput``; measured on an
H200 by ``scripts/bench_gpu.py``).

Per image, the low-rank cache stores ``L·H·Dh + (1+L)·D + D`` values in ``cache.dtype`` plus
``(2 + 1 + L)`` float32 scalars and an int64 label; the dense layout ``U·D + D`` values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .catalog import RUN_SPLITS, Protocol, Split
from .errors import UserError

BYTES = {"float16": 2, "float32": 4, "float64": 8}


def split_sizes(spec, params: dict | None = None, name: str = "?") -> dict[str, int]:
    """``{train, val, test, reference}`` image counts of dataset ``name`` (its :class:`DatasetSpec` and
    ``dataset.params``) under its protocol; a :class:`UserError` when its spec states no sizes."""
    params = dict(params or {})
    if spec.protocol == Protocol.synthetic:
        return {s: int(params.get(f"n_{s}", 0)) for s in Split}
    sizes = dict(spec.sizes)
    if not sizes:
        raise UserError(f"dataset={name}: task=plan has no nominal sizes for it ({spec.description or 'no description'}; "
                        "its config's spec.sizes is empty): plan a grid of datasets whose sizes are known")
    if spec.protocol == Protocol.carve_val:
        val = round(spec.val_fraction * sizes["train"])
        out = {"train": sizes["train"] - val, "val": val, "test": sizes["test"]}
    elif spec.protocol == Protocol.three_way:
        n = sizes["all"]
        val, test = round(spec.val_fraction * n), round(spec.test_fraction * n)
        out = {"train": n - val - test, "val": val, "test": test}
    else:
        out = {s: sizes[s] for s in RUN_SPLITS}
    out["reference"] = out["train"]
    return out


def bytes_per_image(spec, layout: str = "lowrank", dtype: str = "float16") -> int:
    """Cache bytes per image of a model (its :class:`ModelSpec`) in ``layout`` / ``dtype``.  An
    attention-pooled readout (``spec.pool_heads`` = J) stores every unit's D-dim linear part with J
    per-pool-head means, and 2J statistics."""
    L, H, Dh, D, J = spec.layers, spec.heads, spec.head_dim, spec.output_dim, spec.pool_heads
    b = BYTES[dtype]
    pool = 1 if J else 0                                   # the pool.mlp unit
    if layout == "dense":
        return (1 + L * (H + 1) + pool) * D * b + D * b + 8
    wide = 8 if dtype == "float64" else 4
    if J:
        return (L * H * D + (1 + L + pool) * D + D) * b + (L * H * J + (1 + L + pool) * J + 2 * J) * wide + 8
    return (L * H * Dh + (1 + L) * D + D) * b + (2 + 1 + L) * wide + 8


@dataclass
class Throughput:
    """Images (or steps) per second on one GPU; ``conf/task/plan.yaml`` holds an H200's, measured
    by ``scripts/bench_gpu.py`` where marked."""
    encode: dict           # model -> decomposed encode images/s (GPU-bound)
    loader: dict           # "small" / "large" images -> decode + preprocess images/s (CPU-bound)
    train_steps: float     # λ-training optimizer steps/s from a resident cache
    finetune: dict         # model -> fwd + bwd images/s (fp32)

    def encode_rate(self, model: str, large_images: bool) -> float:
        gpu = float(self.encode.get(model, self.encode.get("default", 1000)))
        cpu = float(self.loader["large" if large_images else "small"])
        return min(gpu, cpu)


def encoded_in_cache(cache_dir: Path, model: str, dataset: str, split: str, n: int) -> bool:
    """Whether an encoding of (model, dataset, split, n images) is in the cache (matched on the
    spec sidecar files the cache writes, without building the model)."""
    folder = Path(cache_dir) / "encodings"
    if not folder.is_dir():
        return False
    for side in folder.glob("*.json"):
        try:
            spec = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        m, d = spec.get("model", {}), spec.get("dataset", {})
        if (isinstance(m, dict) and isinstance(d, dict) and m.get("name") == model and d.get("name") == dataset
                and d.get("split") == split and d.get("n") == n and (folder / side.stem).exists()):
            return True
    return False


def plan_rows(cells: list[dict], tp: Throughput, cache_dir: Path, layout: str = "lowrank",
              dtype: str = "float16", epochs: int = 30, typical_epoch_fraction: float = 0.5) -> list[dict]:
    """One row per model: jobs, encodes, cache bytes, what is cached, GPU hours.

    ``cells``: ``{model, model_spec, dataset, dataset_spec, params, method, batch_size, trains, finetune,
    needs_bases, reference, reference_spec, reference_params, reference_split, reference_max}`` of every
    job.  Encodings are shared by every method of a (model, dataset) pair and bases by every dataset of a
    (model, reference) pair, as the cache shares them.
    """
    by_model: dict[str, dict] = {}
    for c in cells:
        m = by_model.setdefault(c["model"], {"spec": c["model_spec"], "pairs": {}, "large": {}, "refs": {},
                                              "cells": 0, "jobs": [], "finetune": []})
        m["cells"] += 1
        sizes = split_sizes(c["dataset_spec"], c.get("params"), c["dataset"])
        m["pairs"][c["dataset"]] = sizes
        m["large"][c["dataset"]] = c["dataset_spec"].large_images
        ref = c.get("reference") or c["dataset"]
        ref_sizes = split_sizes(c["reference_spec"], c.get("reference_params"), ref) if ref != c["dataset"] else sizes
        n_ref = ref_sizes[c.get("reference_split") or "reference"]
        if c.get("reference_max"):
            n_ref = min(n_ref, int(c["reference_max"]))
        if c["needs_bases"]:
            m["refs"][(ref, c.get("reference_split"), n_ref)] = c["reference_spec"].large_images
        if c["finetune"]:
            m["finetune"].append((c["dataset"], sizes, c["batch_size"]))
        elif c["trains"]:
            m["jobs"].append((c["dataset"], sizes["train"], c["batch_size"]))
    rows = []
    for model, m in by_model.items():
        if None in (m["spec"].layers, m["spec"].heads, m["spec"].head_dim, m["spec"].output_dim):
            raise UserError(f"model={model}: task=plan needs its shape, and its config's spec (layers, heads, "
                            "head_dim, width, output_dim) is not filled in")
        rate = lambda ds: tp.encode_rate(model, m["large"][ds])
        encodes = {s: sum(sz[s] for sz in m["pairs"].values()) for s in RUN_SPLITS}
        n_enc = sum(encodes.values())
        n_ref = sum(n for (_, _, n) in m["refs"])
        cached = {(ds, s): encoded_in_cache(cache_dir, model, ds, s, sz[s]) for ds, sz in m["pairs"].items()
                  for s in RUN_SPLITS}
        todo = sum(m["pairs"][ds][s] for (ds, s), done in cached.items() if not done)
        bpi = bytes_per_image(m["spec"], layout, dtype)
        enc_s = sum(m["pairs"][ds][s] / rate(ds) for (ds, s), done in cached.items() if not done)
        ref_s = sum(n / tp.encode_rate(model, large) for (_, _, n), large in m["refs"].items())
        steps = sum(epochs * math.ceil(n / b) for _, n, b in m["jobs"])
        train_s = steps / tp.train_steps
        ft_rate = float(tp.finetune.get(model, tp.finetune.get("default", 100)))
        ft_s = sum(epochs * sz["train"] / ft_rate + (sz["val"] * epochs + sz["test"]) / rate(ds)
                   for ds, sz, _ in m["finetune"])
        rows.append({"model": model, "pairs": len(m["pairs"]), "jobs": m["cells"],
                     "train_images": encodes["train"], "val_images": encodes["val"], "test_images": encodes["test"],
                     "reference_images": n_ref, "cache_GB": n_enc * bpi / 1e9, "cached_splits": sum(cached.values()),
                     "splits": 3 * len(m["pairs"]), "disk_needed_GB": todo * bpi / 1e9,
                     "bytes_per_image": bpi, "encode_h": (enc_s + ref_s) / 3600,
                     "train_h": train_s / 3600, "train_typical_h": train_s * typical_epoch_fraction / 3600,
                     "finetune_h": ft_s / 3600})
    return rows
