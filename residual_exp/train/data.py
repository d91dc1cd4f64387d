"""What a training job feeds its adapter, decided in one place (:class:`TrainingData`).

Four modes, by what the adapter needs and what fits where:

==============  =================================================================  ===================
mode            rows of each split                                                 per batch
==============  =================================================================  ===================
``prepared``    the cache with ``adapter.prepare`` applied once, on the training    nothing
                device (no per-step host→device copies)
``streamed``    the stored rows, read batch by batch (memmaps when the encoding      ``adapter.prepare``
                is over ``cache.memory_budget_gb``, or the prepared tensors would
                not fit)
``live``        images (``method.cache=false``: the backbone in the loop)          decompose, prepare
``images``      images (adapters that need images: finetune)                       nothing
==============  =================================================================  ===================

The Lightning module calls :meth:`TrainingData.feed` on every batch and never branches itself.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..catalog import Needs
from ..encode import Encoded, storage_arrays

log = logging.getLogger(__name__)


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors; ``__getitems__`` returns whole batches."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        n = {len(v) for v in tensors.values()}
        assert len(n) == 1, f"unequal lengths {n}"
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx)
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.tensors.items()}


class StreamedEncoded(Dataset):
    """Rows of an :class:`Encoded` read batch by batch (memmaps when the encoding is over the
    memory budget): the stored tensors, prepared per batch by the module."""

    def __init__(self, enc: Encoded, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        self.enc, self.dtype, self.device = enc, dtype, device

    def __len__(self) -> int:
        return len(self.enc)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = np.sort(np.asarray(idx))           # sorted reads are kinder to the disk
        out = self.enc.batch(i, self.device, self.dtype)
        out["label"] = torch.from_numpy(self.enc.labels[i]).to(self.device)
        return out


class ImageItems(Dataset):
    """A classification split as ``{"images", "label"}`` batches (backbone in the loop)."""

    def __init__(self, split_ds) -> None:
        self.ds = split_ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        items = [self.ds[i] for i in idx]
        return {"images": torch.stack([x for x, _ in items]),
                "label": torch.tensor([y for _, y in items], dtype=torch.long)}


@torch.no_grad()
def prepare_encoded(adapter, enc: Encoded, dtype: torch.dtype, chunk: int = 1024,
                    device: str | torch.device = "cpu", progress: bool = False) -> TensorDictDataset:
    """Apply ``adapter.prepare`` once to a whole cached encoding (chunked) and keep the result
    on ``device`` (the training device: no per-step host→device copies)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for s in tqdm(range(0, len(enc), chunk), desc="prepare", disable=not progress, leave=False):
        for k, v in adapter.prepare(enc.batch(slice(s, s + chunk), device, dtype)).items():
            parts.setdefault(k, []).append(v.to(dtype) if v.is_floating_point() else v)
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["label"] = torch.from_numpy(np.asarray(enc.labels)).long().to(device)
    return TensorDictDataset(tensors)


def prepared_bytes(adapter, enc: Encoded, dtype: torch.dtype) -> int:
    """Bytes :func:`prepare_encoded` would hold for ``enc`` (from one prepared row)."""
    with torch.no_grad():
        one = adapter.prepare(enc.batch(slice(0, 1), "cpu", dtype))
    return int(sum(v.numel() * v.element_size() for v in one.values()) * len(enc))


def batches(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    from ..machine import loader_workers
    num_workers = loader_workers(num_workers)          # never more processes than usable cores
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=lambda b: b, generator=g, persistent_workers=num_workers > 0)


class Feed:
    """``feed(batch) -> the adapter's forward inputs`` for one mode (a plain object: nothing it holds
    enters a module's state dict)."""

    def __init__(self, mode: str, adapter=None, backbone=None, layout: str = "lowrank") -> None:
        self.mode, self.adapter, self.backbone, self.layout = mode, adapter, backbone, layout

    @classmethod
    def from_images(cls, adapter, backbone, layout: str = "lowrank") -> "Feed":
        """Batches of images: given as is to an adapter that needs them, else decomposed live."""
        return cls("images" if adapter.needs == Needs.images else "live", adapter, backbone, layout)

    @torch.no_grad()
    def _prepare(self, inputs: dict) -> dict:       # prepare() holds no trainable parameter
        if self.mode == "live":
            bb = self.backbone
            inputs = storage_arrays(bb, inputs["images"].to(next(bb.parameters()).dtype), self.layout)
        return self.adapter.prepare(inputs)

    def __call__(self, batch: dict) -> dict:
        inputs = {k: v for k, v in batch.items() if k != "label"}
        return self._prepare(inputs) if self.mode in ("streamed", "live") else inputs


class TrainingData:
    """The datasets of a job's splits and the :class:`Feed` that turns their batches into the
    adapter's inputs (see the module docstring for the modes)."""

    def __init__(self, adapter, splits: dict, enc: dict, device: str, *, cache: bool = True,
                 memory_budget_gb: float = 4.0, backbone=None, layout: str = "lowrank",
                 dtype: torch.dtype = torch.float32) -> None:
        self.mode = self._mode(adapter, enc, device, cache, memory_budget_gb, dtype)
        if self.mode in ("images", "live"):
            self.datasets = {name: ImageItems(split) for name, split in splits.items()}
        elif self.mode == "streamed":
            self.datasets = {name: StreamedEncoded(e, dtype, device) for name, e in enc.items()}
        else:
            self.datasets = {name: prepare_encoded(adapter, e, dtype, device=device) for name, e in enc.items()}
        self.feed = Feed(self.mode, adapter, backbone, layout)

    @staticmethod
    def _mode(adapter, enc: dict, device: str, cache: bool, memory_budget_gb: float, dtype) -> str:
        if adapter.needs == Needs.images:
            return "images"
        if not cache:
            return "live"
        need = sum(prepared_bytes(adapter, e, dtype) for e in enc.values())
        if str(device).startswith("cuda"):
            budget = torch.cuda.mem_get_info(torch.device(device))[0] * 0.5
        else:
            budget = memory_budget_gb * 2**30
        if any(e.streamed for e in enc.values()) or need > budget:
            log.info("prepared training data would take %.2f GiB > %.2f GiB available: streaming and preparing "
                     "per batch", need / 2**30, budget / 2**30)
            return "streamed"
        return "prepared"

    @property
    def from_images(self) -> bool:
        """Whether the rows are images (DataLoader workers help decoding)."""
        return self.mode in ("images", "live")

    def loaders(self, batch_size: int, eval_batch: int, num_workers: int = 0, seed: int = 0) -> dict[str, DataLoader]:
        return {name: batches(ds, batch_size if name == "train" else eval_batch, name == "train",
                              num_workers if self.from_images else 0, seed)
                for name, ds in self.datasets.items()}
