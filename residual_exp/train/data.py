"""Batched datasets over cached encodings (in memory or streamed) and over images."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..encode import Encoded


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
