"""Encode once: one backbone pass per (model, weights, dataset, split, preprocessing, layout).

λ only rescales PCA coefficients of the residual units, so one pass over the data is all the
backbone work ResiDual needs.  :func:`encode_split` stores, per image, what the units are
read from (:mod:`residual_exp.decompose.readout`) as ``.npy`` files (memory-mappable):

* ``cache.layout=lowrank`` (default): ``z`` ``[N, L·H, Dh]`` (each head's value mix),
  ``vec`` ``[N, 1+L, D]`` (the embedding and the MLPs, projected), ``vec_mean`` ``[N, 1+L]`` and
  ``stats`` ``[N, 2]`` (σ, µ of the final norm's input) — the units are rebuilt exactly on the
  training device, batched; ~14× smaller than the dense layout for a ViT-L/14;
* ``cache.layout=dense``: ``units`` ``[N, U, D]`` (every unit in the output space);

plus the model's feature ``[N, D]`` and the labels ``[N]``.  Float arrays are stored in
``cache.dtype`` (statistics and channel means always float32 or wider).  Encodings larger than
``cache.memory_budget_gb`` are opened as read-only memmaps and streamed from disk.

:func:`fit_bases` streams the reference split through the backbone into per-group streaming
PCAs of the lifted inputs (float64) without storing it; see :mod:`residual_exp.spectral.lowrank`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .catalog import CacheLayout, names
from .cache import Cache, file_fingerprint
from .data.integrity import fingerprint
from .data.registry import stack_images
from .decompose.readout import DENSE_KEYS, WIDE_KEYS, DenseSource, UnitSource

log = logging.getLogger(__name__)
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
LAYOUTS = names(CacheLayout)
ENCODING_FORMAT = 2                  # 2: lowrank / dense layouts (1: dense units only)


class EncodingOverflow(ValueError):
    """Values that do not fit the storage dtype (float16 overflow)."""


@dataclass
class Encoded:
    """A cached split: the stored arrays (numpy, memmaps when streamed) and how to read units."""
    arrays: dict[str, np.ndarray]    # LOWRANK_KEYS or DENSE_KEYS, each [N, …]
    labels: np.ndarray               # [N]
    layout: str = "lowrank"
    source: UnitSource | None = field(default=None, repr=False)   # reads units from `arrays`

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def features(self) -> np.ndarray:
        return self.arrays["feature"]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def streamed(self) -> bool:
        return any(isinstance(a, np.memmap) for a in self.arrays.values())

    def materialize(self) -> "Encoded":
        return Encoded({k: np.array(v) for k, v in self.arrays.items()}, np.array(self.labels), self.layout,
                       self.source)

    def batch(self, rows, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict:
        """The stored tensors of ``rows`` (a slice or an index array) on ``device``; float arrays
        cast to ``dtype`` (default: kept), statistics never below float32."""
        out = {}
        for k, a in self.arrays.items():
            t = torch.from_numpy(np.ascontiguousarray(a[rows]))
            if dtype is not None and t.is_floating_point():
                t = t.to(torch.promote_types(dtype, torch.float32) if k in WIDE_KEYS else dtype)
            out[k] = t.to(device, non_blocking=True)
        return out

    @property
    def units(self) -> "UnitsView":
        """All units ``[N, U, D]``, rebuilt on demand (``units[rows]``, ``units[:, u]``, …)."""
        return UnitsView(self)


class UnitsView:
    """``enc.units[rows, units]`` as numpy, rebuilt from the stored arrays chunk by chunk (dense
    storage is indexed directly).  Shape ``[N, U, D]``."""

    def __init__(self, enc: Encoded, chunk: int = 1024) -> None:
        self.enc, self.chunk = enc, chunk
        src = enc.source
        self.shape = (len(enc), len(src.layout), src.layout_dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def __getitem__(self, key):
        rows, cols = (key if isinstance(key, tuple) else (key, slice(None)))
        if self.enc.layout == "dense":
            return np.asarray(self.enc.arrays["units"][rows][:, cols] if isinstance(rows, (slice, np.ndarray, list))
                              else self.enc.arrays["units"][rows, cols])
        idx = np.arange(self.shape[0])[rows]
        scalar_row = np.ndim(idx) == 0
        idx = np.atleast_1d(idx)
        units = list(range(self.shape[1]))
        sel = units[cols] if isinstance(cols, slice) else cols
        scalar_unit = np.ndim(sel) == 0
        sel = [int(u) for u in np.atleast_1d(sel)]
        parts = []
        with torch.no_grad():
            for i in range(0, len(idx), self.chunk):
                b = self.enc.batch(idx[i:i + self.chunk])
                parts.append(self.enc.source.units(b, sel).cpu().numpy())            # [b, S, D]
        out = np.concatenate(parts) if parts else np.zeros((0, len(sel), self.shape[2]))
        out = out[:, 0] if scalar_unit else out
        return out[0] if scalar_row else out


def model_identity(model_cfg, seed: int) -> dict:
    """What determines a backbone's weights and its encoding forward (and so its encodings)."""
    from .backbones.tiny_clip import CHECKPOINT
    ident = {k: model_cfg.get(k) for k in ("name", "arch", "pretrained", "image_size")}
    ident["params"] = dict(model_cfg.get("params") or {})
    if model_cfg.get("precision", "auto") != "auto":
        ident["precision"] = model_cfg.precision
    if model_cfg.get("weights"):
        ident["weights"] = file_fingerprint(model_cfg.weights)
    elif model_cfg.get("pretrained") is None:
        ident["random_init_seed"] = seed          # random weights depend on the seed
    elif model_cfg.name == "tiny_clip" and Path(CHECKPOINT).exists():
        ident["weights"] = file_fingerprint(CHECKPOINT)
    return ident


def dataset_identity(ds_cfg, split_ds, transform) -> dict:
    """What determines a split's images: its config, preprocessing and a fingerprint of its data
    (files' paths, sizes and mtimes, or contents: :func:`residual_exp.data.integrity.fingerprint`),
    so data rewritten in place gives a new cache key."""
    return {"name": ds_cfg.name, "root": str(Path(ds_cfg.root).expanduser().resolve()),
            "params": dict(ds_cfg.get("params") or {}), "split": split_ds.split, "n": len(split_ds),
            "transform": repr(transform), "data": fingerprint(split_ds)}


def subsample_split(split_ds, ds_cfg, split: str, transform, max_samples: int | None, seed: int):
    """``(dataset, identity)``: ``split_ds`` uniformly subsampled to ``max_samples`` (seeded,
    sorted indices) when it is larger; the identity records the subsample so that caches of
    different subsets never collide."""
    n = len(split_ds)
    ident = dataset_identity(ds_cfg, split_ds, transform)
    if not max_samples or n <= max_samples:
        return split_ds, ident
    idx = sorted(np.random.default_rng(seed).choice(n, size=int(max_samples), replace=False).tolist())
    sub = torch.utils.data.Subset(split_ds, idx)
    sub.name, sub.split = split_ds.name, split_ds.split
    sub.classnames, sub.templates = split_ds.classnames, split_ds.templates
    sub.targets = [split_ds.targets[i] for i in idx]
    ident = {**ident, "n": len(sub), "subsample": {"of": n, "seed": seed}}
    return sub, ident


def loader(split_ds, batch_size: int, num_workers: int) -> DataLoader:
    """Images in order, with worker processes and pinned memory when CUDA is there."""
    from .machine import loader_workers
    num_workers = loader_workers(num_workers)          # never more processes than usable cores
    return DataLoader(split_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=stack_images, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


def source_for(backbone, layout: str) -> UnitSource:
    """How stored arrays of ``layout`` are read as units of ``backbone`` (its convention)."""
    readout = backbone.readout()
    return readout if layout == "lowrank" else DenseSource.like(readout)


def storage_arrays(backbone, images: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """What ``layout`` stores of a batch of images (see the module docstring)."""
    raw = backbone.decompose_raw(images)
    if layout == "lowrank":
        return raw
    return {"units": backbone.readout().units(raw), "feature": raw["feature"]}


def _shapes(backbone, layout: str) -> dict[str, tuple[int, ...]]:
    D = backbone.output_dim
    if layout == "dense":
        return {"units": (len(backbone.layout), D), "feature": (D,)}
    return backbone.readout().storage_shapes()


def _np_dtype(key: str, dtype: str):
    wide = key in WIDE_KEYS                             # per-sample scalars: never below float32
    return np.float64 if dtype == "float64" else (np.float32 if wide else DTYPES[dtype])


@torch.no_grad()
def _encode_to(tmp: Path, backbone, split_ds, device, batch_size: int, num_workers: int,
               dtype: str, layout: str, progress: bool) -> None:
    tmp.mkdir(parents=True)
    N = len(split_ds)
    arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=_np_dtype(k, dtype), shape=(N, *s))
              for k, s in _shapes(backbone, layout).items()}
    labels = np.zeros(N, dtype=np.int64)
    model_dtype = next(backbone.parameters()).dtype
    i = 0
    for images, y in tqdm(loader(split_ds, batch_size, num_workers), desc=f"encode {split_ds.name}/{split_ds.split}",
                          disable=not progress, leave=False):
        out = storage_arrays(backbone, images.to(device, model_dtype, non_blocking=True), layout)
        b = len(y)
        for k, a in arrays.items():
            v = out[k].float().cpu().numpy() if out[k].dtype == torch.bfloat16 else out[k].cpu().numpy()
            a[i:i + b] = v
            if not np.isfinite(a[i:i + b]).all():
                bad = "overflows float16" if dtype == "float16" and np.isfinite(v).all() else "is not finite"
                raise EncodingOverflow(f"encoding {split_ds.name}/{split_ds.split}: {k} of images {i}..{i + b - 1} "
                                       f"{bad}; use cache.dtype=float32")
        labels[i:i + b] = y.numpy()
        i += b
    assert i == N, f"encoded {i} of {N} items"
    for a in arrays.values():
        a.flush()
    del arrays
    np.save(tmp / "labels.npy", labels)


def load_encoded(path: Path, memory_budget_gb: float, layout: str, source: UnitSource | None) -> Encoded:
    keys = source.keys if layout == "lowrank" else DENSE_KEYS
    maps = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in keys}
    size = sum(a.nbytes for a in maps.values())
    stream = size > memory_budget_gb * 2**30
    if stream:
        log.info("encoding %s is %.1f GiB > budget: streaming from disk", path.name, size / 2**30)
    else:
        maps = {k: np.array(a) for k, a in maps.items()}
    return Encoded(maps, np.load(path / "labels.npy"), layout, source)


def encode_split(backbone, split_ds, cache: Cache, identity: dict, device, batch_size: int = 64,
                 num_workers: int = 0, dtype: str = "float32", memory_budget_gb: float = 4.0,
                 progress: bool = True, layout: str = "lowrank") -> Encoded:
    """Cached decomposition of every item of ``split_ds`` (see module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"cache.dtype={dtype!r}; valid: {sorted(DTYPES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"cache.layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    spec = {**identity, "dtype": dtype, "layout": layout, "format": ENCODING_FORMAT,
            "precision": backbone.precision, "units": list(backbone.layout.names)
            if layout == "dense" else {"layers": backbone.num_layers, "heads": backbone.num_heads}}
    if layout == "dense":
        spec["convention"] = backbone.convention
    if backbone.pooling().kind != "token":        # what the stored rows are (CLS-token specs keep their keys)
        spec["readout"] = backbone.pooling().kind
    source = source_for(backbone, layout)
    return cache.get_or_build(
        "encodings", spec,
        build=lambda tmp: _encode_to(tmp, backbone, split_ds, device, batch_size, num_workers, dtype, layout, progress),
        load=lambda p: load_encoded(p, memory_budget_gb, layout, source))


@torch.no_grad()
def fit_bases(backbone, split_ds, cache: Cache, identity: dict, device, batch_size: int = 64,
              num_workers: int = 0, progress: bool = True, layout: str = "lowrank"):
    """Per-unit PCA bases of every unit (and of the output feature) on ``split_ds``.

    Returns ``(unit_bases, output_basis)``: :class:`~residual_exp.spectral.UnitBases` (one
    rank-aware :class:`~residual_exp.spectral.PCABasis` per unit group) and the output
    feature's :class:`PCABasis` (``spectral_adapter``).  ``layout`` says how the units are
    read while streaming (lowrank: lifted inputs, ~D/head_dim times less work per head; dense:
    the units themselves); both give the same bases to float64 round-off.
    """
    from .spectral import PCABasis, StreamingPCA, UnitBases
    from .spectral.lowrank import GroupPCA

    source = source_for(backbone, layout)
    spec = {**identity, "units": list(backbone.layout.names), "convention": backbone.convention,
            "precision": backbone.precision, "what": "pca", "format": ENCODING_FORMAT}

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        group_pca = GroupPCA(source, device=device)
        out_pca = StreamingPCA(1, backbone.output_dim, device=device)
        model_dtype = next(backbone.parameters()).dtype
        for images, _ in tqdm(loader(split_ds, batch_size, num_workers), desc=f"PCA {split_ds.name}/{split_ds.split}",
                              disable=not progress, leave=False):
            batch = storage_arrays(backbone, images.to(device, model_dtype, non_blocking=True), layout)
            group_pca.update(batch)
            out_pca.update(batch["feature"][:, None].to(torch.float64))      # [B, 1, D]
        meta = {"model": identity["model"]["name"], "dataset": identity["dataset"]["name"],
                "split": identity["dataset"]["split"], "n_samples": str(len(split_ds)),
                "preprocessing": identity["dataset"]["transform"], "convention": backbone.convention}
        group_pca.finalize(meta).save(tmp / "units")
        out = out_pca.finalize()
        out.meta.update(meta)
        out.save(tmp / "output.safetensors")

    def load(p: Path):
        return UnitBases.load(p / "units"), PCABasis.load(p / "output.safetensors")

    return cache.get_or_build("bases", spec, build, load)
