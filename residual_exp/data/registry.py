"""Dataset registry: ``dataset=NAME`` resolves here.

Every dataset is a *builder* ``fn(cfg, split, transform) -> ClassificationSplit``, where
``cfg`` is the ``dataset`` config node (``name``, ``root``, ``download``, ``params``),
``split`` is one of ``train | val | test | reference`` and ``transform`` maps a PIL image
to a tensor (the backbone's preprocessing).  ``reference`` is the split used to fit PCA
bases (ImageNet train in the paper; the synthetic ``shapes`` data has its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test", "reference")


class ClassificationSplit(Dataset):
    """One split of a classification dataset.

    Items are ``(image_tensor, label)``.  Carries what the classifiers need:
    ``classnames`` (readable, CLIP style), ``templates`` (format strings with one ``{}``),
    and ``targets`` (all labels, in item order, for stratification and prototypes).
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None, targets: Sequence[int],
                 classnames: Sequence[str], templates: Sequence[str], name: str, split: str,
                 transform: Callable | None = None, load: Callable | None = None):
        self.base = base
        self.indices = list(indices) if indices is not None else None
        self.targets = [int(t) for t in targets]
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.name = name
        self.split = split
        self.transform = transform
        # ``load(base, i) -> (PIL image, label)``; default: ``base[i]``
        self._load = load or (lambda b, i: b[i])
        if self.indices is not None and len(self.indices) != len(self.targets):
            raise ValueError(f"{name}/{split}: {len(self.indices)} indices but {len(self.targets)} targets")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        j = self.indices[i] if self.indices is not None else i
        img, label = self._load(self.base, j)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)


@dataclass
class DatasetEntry:
    name: str
    builder: Callable[..., ClassificationSplit]
    description: str = ""
    how_to_get: str = ""          # shown when the data is missing
    meta: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, description: str = "", how_to_get: str = "", **meta):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = DatasetEntry(name, fn, description, how_to_get, meta)
        return fn
    return deco


def _ensure_loaded() -> None:
    # importing the modules registers their datasets
    from . import shapes  # noqa: F401
    try:
        from . import vision  # noqa: F401  (the paper's ten datasets + imagenet + image_folder)
    except ImportError as e:  # pragma: no cover - only while vision.py does not exist yet
        if "vision" not in str(e):
            raise


def list_datasets() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_entry(name: str) -> DatasetEntry:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_split(cfg, split: str, transform: Callable | None = None) -> ClassificationSplit:
    """Build ``split`` of the dataset described by the ``dataset`` config node ``cfg``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    entry = get_entry(cfg.name)
    return entry.builder(cfg, split, transform)


def stack_images(batch: list[tuple[torch.Tensor, int]]):
    imgs, labels = zip(*batch)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.long)
