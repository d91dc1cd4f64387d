"""Deterministic, stratified, stored train/val(/test) splits.

The paper carves validation data out of the official training split with seed 42,
stratified by class (10% for CIFAR-10/100, MNIST, GTSRB; 20% for SVHN, DTD, Stanford Cars,
ImageNet) and splits EuroSAT and SUN397, which have no official split, 80/10/10.

A split is computed once per dataset and stored as index lists in a JSON file next to the
data (``<root>/.residual_exp_splits/<key>.json``), so every run and every model sees the
same images.  The file records the size and a fingerprint of the labels of the source it
was computed from; when the data on disk no longer matches, :func:`load_or_create` raises
:class:`SplitMismatchError` instead of silently reusing (or silently recomputing) it.

Writes are atomic (temporary file in the same folder + ``os.replace``) and guarded by a
``filelock.FileLock``, so concurrent jobs (a SLURM array, a multirun) agree on one file.

Indices always refer to positions in the *canonical order* of the source (the order in
which the dataset loader lists the items; loaders make that order deterministic).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from filelock import FileLock, Timeout

from ..atomic import atomic_write_text
from ..catalog import SPLIT_SEED
from .errors import DatasetError

SEED = SPLIT_SEED
SPLIT_DIRNAME = ".residual_exp_splits"
FORMAT = "residual_exp.split/v1"
LOCK_TIMEOUT_S = 600.0


class SplitMismatchError(DatasetError, RuntimeError):
    """A stored split does not fit the data (or the split parameters) it is used with."""


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def stratified_partition(targets: Sequence[int], fractions: Mapping[str, float],
                         seed: int = SEED) -> dict[str, list[int]]:
    """Split ``range(len(targets))`` per class.

    ``fractions`` names the carved parts and their share, e.g. ``{"val": 0.1}`` or
    ``{"val": 0.1, "test": 0.1}``; everything else goes to ``"train"``.  For every class
    (in increasing label order) its members are shuffled with one ``RandomState(seed)``
    and the first ``round(fraction * n_class)`` go to each carved part in the order given,
    so per-class counts are within 0.5 of the fraction.  Returned index lists are sorted.
    """
    if "train" in fractions:
        raise ValueError("'train' is the remainder; do not give it a fraction")
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise ValueError(f"fractions must be >= 0 and sum to < 1, got {dict(fractions)}")
    y = np.asarray(targets, dtype=np.int64)                     # [N]
    rng = np.random.RandomState(seed)                           # legacy RNG: frozen stream
    parts: dict[str, list[int]] = {name: [] for name in fractions}
    parts["train"] = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))        # [n_c]
        start = 0
        for name, frac in fractions.items():
            take = min(_round_half_up(frac * len(members)), len(members) - start)
            parts[name].extend(members[start:start + take].tolist())
            start += take
        parts["train"].extend(members[start:].tolist())
    return {name: sorted(idx) for name, idx in parts.items()}


def fingerprint(targets: Sequence[int]) -> str:
    """SHA-256 of the labels in canonical order: detects reordered or changed data."""
    return hashlib.sha256(np.asarray(targets, dtype="<i8").tobytes()).hexdigest()


def split_path(root: str | os.PathLike, key: str, splits_dir: str | os.PathLike | None = None) -> Path:
    """Where the split ``key`` is stored: ``<splits_dir or root/.residual_exp_splits>/<key>.json``."""
    folder = Path(splits_dir).expanduser() if splits_dir else Path(root).expanduser() / SPLIT_DIRNAME
    return folder / f"{key}.json"


def _describe(fractions: Mapping[str, float], seed: int) -> str:
    return f"fractions {dict(fractions)} with seed {seed}"


def _check(record: dict, path: Path, dataset: str, targets: Sequence[int],
           fractions: Mapping[str, float], seed: int) -> dict[str, list[int]]:
    """Validate a stored split against the current source; return its index lists."""
    fix = (f"If the data changed on purpose, delete {path} to recompute the split "
           f"(results made with the old split are then not comparable); otherwise "
           f"restore the data it was made from.")
    src = record.get("source", {})
    n = len(targets)
    if record.get("format") != FORMAT or "splits" not in record:
        raise SplitMismatchError(f"{dataset}: {path} is not a split file of format {FORMAT}. {fix}")
    if src.get("size") != n:
        raise SplitMismatchError(
            f"{dataset}: the stored split {path} was computed for a source of "
            f"{src.get('size')} items, but the data under root now has {n} items. {fix}")
    if src.get("targets_sha256") != fingerprint(targets):
        raise SplitMismatchError(
            f"{dataset}: the stored split {path} was computed for {n} items with different "
            f"labels (or a different item order) than the data under root now has. {fix}")
    stored = {k: float(v) for k, v in record.get("fractions", {}).items()}
    if stored != {k: float(v) for k, v in fractions.items()} or record.get("seed") != seed:
        raise SplitMismatchError(
            f"{dataset}: the stored split {path} was made with "
            f"{_describe(stored, record.get('seed'))}, but {_describe(fractions, seed)} "
            f"was asked for. Delete the file to recompute it.")
    parts = {k: [int(i) for i in v] for k, v in record["splits"].items()}
    flat = [i for v in parts.values() for i in v]
    if len(flat) != n or set(flat) != set(range(n)):
        raise SplitMismatchError(f"{dataset}: {path} does not partition range({n}). {fix}")
    return parts


def _read(path: Path, dataset: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:  # cannot happen through our atomic writes
        raise SplitMismatchError(f"{dataset}: split file {path} is not valid JSON ({e}); "
                                 f"delete it to recompute the split") from e


def _write_atomic(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, separators=(",", ":")))


def load_or_create(path: str | os.PathLike, *, dataset: str, targets: Sequence[int],
                   fractions: Mapping[str, float], seed: int = SEED) -> dict[str, list[int]]:
    """Return the stored split at ``path``, computing and storing it first if absent.

    ``targets`` are the labels of the source in canonical order; the result maps
    ``"train"`` and every key of ``fractions`` to sorted positions in that order.
    Raises :class:`SplitMismatchError` when a stored file does not match ``targets``.
    """
    path = Path(path)
    if path.exists():                       # complete by construction (atomic replace)
        return _check(_read(path, dataset), path, dataset, targets, fractions, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{dataset}: cannot create the split folder {path.parent} ({e}). Point "
                      f"dataset.params.splits_dir at a writable folder shared by your runs."
                      ) from e
    try:
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            if path.exists():               # another job wrote it while we waited
                return _check(_read(path, dataset), path, dataset, targets, fractions, seed)
            parts = stratified_partition(targets, fractions, seed)
            record = {
                "format": FORMAT,
                "dataset": dataset,
                "seed": seed,
                "fractions": dict(fractions),
                "source": {"size": len(targets), "targets_sha256": fingerprint(targets)},
                "sizes": {k: len(v) for k, v in parts.items()},
                "splits": parts,
            }
            _write_atomic(path, record)
            return parts
    except Timeout as e:
        raise TimeoutError(f"{dataset}: waited {LOCK_TIMEOUT_S:.0f}s for {path}.lock; if no "
                           f"other job is computing this split, delete the lock file") from e
