"""Encode once: one backbone pass per (model, weights, dataset, split, preprocessing).

λ only rescales PCA coefficients of the residual units, so one pass over the data is all the
backbone work ResiDual needs: :func:`encode_split` stores the decomposed units
``[N, U, D]``, the model's image feature ``[N, D]`` and the labels ``[N]`` as ``.npy`` files
(memory-mappable), and every epoch, method and run reads them back.  Encodings larger than
``cache.memory_budget_gb`` are opened as read-only memmaps and streamed from disk.

:func:`fit_bases` streams the reference split through the backbone into a
:class:`~residual_exp.spectral.StreamingPCA` (float64 Gram accumulation) without storing it,
since the reference (ImageNet train) is far larger than what a cache should hold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .cache import Cache, file_fingerprint
from .data.registry import stack_images

log = logging.getLogger(__name__)
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


@dataclass
class Encoded:
    units: np.ndarray        # [N, U, D]  (np.memmap when streamed from disk)
    features: np.ndarray     # [N, D]     the model's own image feature
    labels: np.ndarray       # [N]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(self.units.nbytes + self.features.nbytes)

    def materialize(self) -> "Encoded":
        return Encoded(np.array(self.units), np.array(self.features), np.array(self.labels))


def model_identity(model_cfg, seed: int) -> dict:
    """What determines a backbone's weights (and so its encodings)."""
    from .backbones.tiny_clip import CHECKPOINT
    ident = {k: model_cfg.get(k) for k in ("name", "arch", "pretrained", "image_size")}
    ident["params"] = dict(model_cfg.get("params") or {})
    if model_cfg.get("weights"):
        ident["weights"] = file_fingerprint(model_cfg.weights)
    elif model_cfg.get("pretrained") is None:
        ident["random_init_seed"] = seed          # random weights depend on the seed
    elif model_cfg.name == "tiny_clip" and Path(CHECKPOINT).exists():
        ident["weights"] = file_fingerprint(CHECKPOINT)
    return ident


def dataset_identity(ds_cfg, split: str, n: int, transform) -> dict:
    return {"name": ds_cfg.name, "root": str(Path(ds_cfg.root).expanduser().resolve()),
            "params": dict(ds_cfg.get("params") or {}), "split": split, "n": n,
            "transform": repr(transform)}


def subsample_split(split_ds, ds_cfg, split: str, transform, max_samples: int | None, seed: int):
    """``(dataset, identity)``: ``split_ds`` uniformly subsampled to ``max_samples`` (seeded,
    sorted indices) when it is larger; the identity records the subsample so that caches of
    different subsets never collide."""
    n = len(split_ds)
    ident = dataset_identity(ds_cfg, split, n, transform)
    if not max_samples or n <= max_samples:
        return split_ds, ident
    idx = sorted(np.random.default_rng(seed).choice(n, size=int(max_samples), replace=False).tolist())
    sub = torch.utils.data.Subset(split_ds, idx)
    sub.name, sub.split = split_ds.name, split_ds.split
    sub.classnames, sub.templates = split_ds.classnames, split_ds.templates
    sub.targets = [split_ds.targets[i] for i in idx]
    ident = {**dataset_identity(ds_cfg, split, len(sub), transform), "subsample": {"of": n, "seed": seed}}
    return sub, ident


def _loader(split_ds, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(split_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=stack_images, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def _encode_to(tmp: Path, backbone, split_ds, device, batch_size: int, num_workers: int,
               dtype: str, progress: bool) -> None:
    tmp.mkdir(parents=True)
    N, U, D = len(split_ds), len(backbone.layout), backbone.output_dim
    np_dtype = DTYPES[dtype]
    units = np.lib.format.open_memmap(tmp / "units.npy", mode="w+", dtype=np_dtype, shape=(N, U, D))
    feats = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np_dtype, shape=(N, D))
    labels = np.zeros(N, dtype=np.int64)
    model_dtype = next(backbone.parameters()).dtype
    i = 0
    for images, y in tqdm(_loader(split_ds, batch_size, num_workers), desc=f"encode {split_ds.name}/{split_ds.split}",
                          disable=not progress, leave=False):
        u, f = backbone.decompose(images.to(device, model_dtype))           # [B, U, D], [B, D]
        b = len(y)
        units[i:i + b] = u.cpu().numpy().astype(np_dtype)
        feats[i:i + b] = f.cpu().numpy().astype(np_dtype)
        labels[i:i + b] = y.numpy()
        i += b
    assert i == N, f"encoded {i} of {N} items"
    units.flush(); feats.flush()
    del units, feats
    np.save(tmp / "labels.npy", labels)


def load_encoded(path: Path, memory_budget_gb: float) -> Encoded:
    units = np.load(path / "units.npy", mmap_mode="r")
    stream = units.nbytes > memory_budget_gb * 2**30
    if stream:
        log.info("encoding %s is %.1f GiB > budget: streaming from disk", path.name, units.nbytes / 2**30)
    else:
        units = np.array(units)
    feats = np.load(path / "features.npy", mmap_mode="r" if stream else None)
    return Encoded(units, feats, np.load(path / "labels.npy"))


def encode_split(backbone, split_ds, cache: Cache, identity: dict, device, batch_size: int = 64,
                 num_workers: int = 0, dtype: str = "float32", memory_budget_gb: float = 4.0,
                 progress: bool = True) -> Encoded:
    """Cached decomposition of every item of ``split_ds`` (see module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"cache.dtype={dtype!r}; valid: {sorted(DTYPES)}")
    spec = {**identity, "dtype": dtype, "units": list(backbone.layout.names)}
    return cache.get_or_build(
        "encodings", spec,
        build=lambda tmp: _encode_to(tmp, backbone, split_ds, device, batch_size, num_workers, dtype, progress),
        load=lambda p: load_encoded(p, memory_budget_gb))


@torch.no_grad()
def fit_bases(backbone, split_ds, cache: Cache, identity: dict, device, batch_size: int = 64,
              num_workers: int = 0, progress: bool = True):
    """Per-unit PCA bases (all units + the output feature as one extra unit) on ``split_ds``.

    Returns ``(unit_basis, output_basis)``: :class:`~residual_exp.spectral.PCABasis` over the
    ``U`` units and over the model's output feature (used by ``spectral_adapter``).
    """
    from .spectral import PCABasis, StreamingPCA

    spec = {**identity, "units": list(backbone.layout.names), "what": "pca"}
    U, D = len(backbone.layout), backbone.output_dim

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        pca = StreamingPCA(U + 1, D, device=device)
        model_dtype = next(backbone.parameters()).dtype
        for images, _ in tqdm(_loader(split_ds, batch_size, num_workers), desc=f"PCA {split_ds.name}/{split_ds.split}",
                              disable=not progress, leave=False):
            u, f = backbone.decompose(images.to(device, model_dtype))       # [B, U, D], [B, D]
            pca.update(torch.cat([u, f[:, None]], 1))                       # [B, U + 1, D]
        basis = pca.finalize()
        basis.meta.update({"model": identity["model"]["name"], "dataset": identity["dataset"]["name"],
                           "split": identity["dataset"]["split"], "n_samples": str(len(split_ds)),
                           "preprocessing": identity["dataset"]["transform"]})
        basis.select(list(range(U))).save(tmp / "units.safetensors")
        basis.select([U]).save(tmp / "output.safetensors")

    def load(p: Path):
        return PCABasis.load(p / "units.safetensors"), PCABasis.load(p / "output.safetensors")

    return cache.get_or_build("bases", spec, build, load)
