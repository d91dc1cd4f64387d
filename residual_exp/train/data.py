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
    """Rows of an :class:`Encoded` read from its memmaps batch by batch (raw units)."""

    def __init__(self, enc: Encoded, needs: str, dtype: torch.dtype) -> None:
        self.enc, self.needs, self.dtype = enc, needs, dtype

    def __len__(self) -> int:
        return len(self.enc)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = np.sort(np.asarray(idx))           # sorted reads are kinder to the disk
        out = {"label": torch.from_numpy(self.enc.labels[i])}
        out["feature"] = torch.from_numpy(np.asarray(self.enc.features[i])).to(self.dtype)
        if self.needs == "units":
            out["units"] = torch.from_numpy(np.asarray(self.enc.units[i])).to(self.dtype)
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
    """Apply ``adapter.prepare`` once to a whole cached encoding (chunked), keep it in memory."""
    parts: dict[str, list[torch.Tensor]] = {}
    for s in tqdm(range(0, len(enc), chunk), desc="prepare", disable=not progress, leave=False):
        feats = torch.from_numpy(np.asarray(enc.features[s:s + chunk])).to(device, dtype)
        units = (torch.from_numpy(np.asarray(enc.units[s:s + chunk])).to(device, dtype)
                 if adapter.needs == "units" else None)
        for k, v in adapter.prepare(units, feats).items():
            parts.setdefault(k, []).append(v.cpu())
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["label"] = torch.from_numpy(np.asarray(enc.labels)).long()
    return TensorDictDataset(tensors)


def batches(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=lambda b: b, generator=g, persistent_workers=num_workers > 0)
