"""What a run or a sweep will cost before it starts: images to encode, cache bytes, disk, GPU hours.

Library for ``task=plan`` (no model is built, no image is read).  Sizes of the paper's datasets
are their official split sizes (:data:`SOURCE_SIZES`), carved with the same protocol as
:mod:`residual_exp.data.vision`; the architecture of each model preset comes from
:data:`ARCHS`; throughputs come from a table in the task config (``task.throughput``; measure
them on your GPU with ``scripts/bench_gpu.py`` and pass them in).

Per image, the low-rank cache stores ``L·H·Dh + (1+L)·D + D`` values in ``cache.dtype`` plus
``(2 + 1 + L)`` float32 scalars and an int64 label; the dense layout ``U·D + D`` values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# dataset -> (protocol, sizes of its official splits, val fraction, "large" images (decoding-bound))
SOURCE_SIZES = {
    "cifar10": ("carve_val", {"train": 50_000, "test": 10_000}, 0.1, False),
    "cifar100": ("carve_val", {"train": 50_000, "test": 10_000}, 0.1, False),
    "mnist": ("carve_val", {"train": 60_000, "test": 10_000}, 0.1, False),
    "gtsrb": ("carve_val", {"train": 26_640, "test": 12_630}, 0.1, False),
    "svhn": ("carve_val", {"train": 73_257, "test": 26_032}, 0.2, False),
    "dtd": ("carve_val", {"train": 1_880, "test": 1_880}, 0.2, True),
    "stanford_cars": ("carve_val", {"train": 8_144, "test": 8_041}, 0.2, True),
    "imagenet": ("carve_val", {"train": 1_281_167, "test": 50_000}, 0.2, True),
    "eurosat": ("three_way", {"all": 27_000}, 0.1, False),
    "sun397": ("three_way", {"all": 108_754}, 0.1, True),
    "resisc45": ("official", {"train": 18_900, "val": 6_300, "test": 6_300}, 0.0, True),
}

# model preset -> (layers, heads, head_dim, width, output dim, image size, patch)
ARCHS = {
    "clip_b": (12, 12, 64, 768, 512, 224, 16), "openclip_b": (12, 12, 64, 768, 512, 224, 16),
    "clip_l": (24, 16, 64, 1024, 768, 224, 14), "openclip_l": (24, 16, 64, 1024, 768, 224, 14),
    "vit_l": (24, 16, 64, 1024, 1024, 224, 16), "dinov2_l": (24, 16, 64, 1024, 1024, 224, 14),
    "blip_l_flickr": (24, 16, 64, 1024, 256, 384, 16), "tiny_clip": (4, 4, 32, 128, 64, 32, 8),
}
BYTES = {"float16": 2, "float32": 4, "float64": 8}


def split_sizes(dataset: str, params: dict | None = None) -> dict[str, int]:
    """``{train, val, test, reference}`` image counts of a dataset under the paper's protocol."""
    params = dict(params or {})
    if dataset.startswith("shapes"):
        return {s: int(params.get(f"n_{s}", 0)) for s in ("train", "val", "test", "reference")}
    if dataset not in SOURCE_SIZES:
        raise UserError(f"dataset={dataset}: task=plan has no nominal sizes for it (known: "
                        f"{', '.join(sorted(SOURCE_SIZES))}, shapes_*); plan a grid of those datasets")
    protocol, sizes, frac, _ = SOURCE_SIZES[dataset]
    if protocol == "carve_val":
        val = round(frac * sizes["train"])
        out = {"train": sizes["train"] - val, "val": val, "test": sizes["test"]}
    elif protocol == "three_way":
        n = sizes["all"]
        val = test = round(frac * n)
        out = {"train": n - val - test, "val": val, "test": test}
    else:
        out = dict(sizes)
    out["reference"] = out["train"]
    return out


def bytes_per_image(model: str, layout: str = "lowrank", dtype: str = "float16") -> int:
    L, H, Dh, W, D, _, _ = ARCHS[model]
    b = BYTES[dtype]
    if layout == "dense":
        return (1 + L * (H + 1)) * D * b + D * b + 8
    wide = 8 if dtype == "float64" else 4
    return (L * H * Dh + (1 + L) * D + D) * b + (2 + 1 + L) * wide + 8


def large_images(dataset: str) -> bool:
    return SOURCE_SIZES.get(dataset, ("", {}, 0, False))[3]


@dataclass
class Throughput:
    """Images (or steps) per second on one GPU; ``conf/task/plan.yaml`` holds an H200's, measured
    by ``scripts/bench_gpu.py`` where marked."""
    encode: dict           # model -> decomposed encode images/s (GPU-bound)
    loader: dict           # "small" / "large" images -> decode + preprocess images/s (CPU-bound)
    train_steps: float     # λ-training optimizer steps/s from a resident cache
    finetune: dict         # model -> fwd + bwd images/s (fp32)

    def encode_rate(self, model: str, dataset: str) -> float:
        gpu = float(self.encode.get(model, self.encode.get("default", 1000)))
        cpu = float(self.loader["large" if large_images(dataset) else "small"])
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
    """One row per model: encodes, cache bytes, what is cached, GPU hours.

    ``cells``: ``{model, dataset, method, batch_size, reference, reference_split, reference_max,
    params}`` of every job.  Encodings are shared by every method of a (model, dataset) pair and
    bases by every dataset of a (model, reference) pair, as the cache shares them.
    """
    by_model: dict[str, dict] = {}
    for c in cells:
        m = by_model.setdefault(c["model"], {"pairs": {}, "refs": {}, "jobs": [], "finetune": [], "base": 0})
        sizes = split_sizes(c["dataset"], c.get("params"))
        m["pairs"][c["dataset"]] = sizes
        ref = c.get("reference") or c["dataset"]
        ref_sizes = split_sizes(ref, c.get("reference_params")) if ref != c["dataset"] else sizes
        n_ref = ref_sizes[c.get("reference_split") or "reference"]
        if c.get("reference_max"):
            n_ref = min(n_ref, int(c["reference_max"]))
        if c["method"] in ("spectral_adapter", "residual_fine", "residual_full") or c.get("needs_bases"):
            m["refs"][(ref, c.get("reference_split"), n_ref)] = ref
        if c["method"] == "finetune":
            m["finetune"].append((c["dataset"], sizes, c["batch_size"]))
        elif c["method"] != "base":
            m["jobs"].append((c["dataset"], sizes["train"], c["batch_size"]))
        else:
            m["base"] += 1                            # zero-shot: encodes, trains nothing (still a job)
    rows = []
    for model, m in by_model.items():
        if model not in ARCHS:
            raise UserError(f"model={model}: task=plan has no architecture for it (known: {', '.join(sorted(ARCHS))})")
        encodes = {s: sum(sz[s] for sz in m["pairs"].values()) for s in ("train", "val", "test")}
        n_enc = sum(encodes.values())
        n_ref = sum(n for (_, _, n) in m["refs"])
        cached = sum(encoded_in_cache(cache_dir, model, ds, s, sz[s]) for ds, sz in m["pairs"].items()
                     for s in ("train", "val", "test"))
        todo = sum(sz[s] for ds, sz in m["pairs"].items() for s in ("train", "val", "test")
                   if not encoded_in_cache(cache_dir, model, ds, s, sz[s]))
        bpi = bytes_per_image(model, layout, dtype)
        enc_s = sum(sz[s] / tp.encode_rate(model, ds) for ds, sz in m["pairs"].items() for s in ("train", "val", "test")
                    if not encoded_in_cache(cache_dir, model, ds, s, sz[s]))
        ref_s = sum(n / tp.encode_rate(model, ds) for (ds, _, n) in m["refs"])
        steps = sum(epochs * math.ceil(n / b) for _, n, b in m["jobs"])
        train_s = steps / tp.train_steps
        ft_rate = float(tp.finetune.get(model, tp.finetune.get("default", 100)))
        ft_s = sum(epochs * sz["train"] / ft_rate + (sz["val"] * epochs + sz["test"]) / tp.encode_rate(model, ds)
                   for ds, sz, _ in m["finetune"])
        rows.append({"model": model, "pairs": len(m["pairs"]), "jobs": len(m["jobs"]) + len(m["finetune"]) + m["base"],
                     "train_images": encodes["train"], "val_images": encodes["val"], "test_images": encodes["test"],
                     "reference_images": n_ref, "cache_GB": n_enc * bpi / 1e9, "cached_splits": cached,
                     "splits": 3 * len(m["pairs"]), "disk_needed_GB": todo * bpi / 1e9,
                     "bytes_per_image": bpi, "encode_h": (enc_s + ref_s) / 3600,
                     "train_h": train_s / 3600, "train_typical_h": train_s * typical_epoch_fraction / 3600,
                     "finetune_h": ft_s / 3600})
    return rows
