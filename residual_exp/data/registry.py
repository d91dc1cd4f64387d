"""Datasets: ``dataset=NAME`` resolves here.

Every dataset is a *builder* ``fn(cfg, split, transform) -> ClassificationSplit`` named by its
config's ``spec.builder`` (an import path; :class:`~residual_exp.catalog.DatasetSpec`), where
``cfg`` is the ``dataset`` config node (``name``, ``root``, ``download``, ``params``, ``spec``),
``split`` is one of ``train | val | test | reference`` and ``transform`` maps a PIL image
to a tensor (the backbone's preprocessing).  ``reference`` is the split used to fit PCA
bases (ImageNet train in the paper; the synthetic ``shapes`` data has its own).  A new dataset
is its builder (a module anywhere on the path) and its YAML file.

:func:`build_split` guards every dataset when it is opened: it refuses (with a
:class:`~.errors.DatasetError` naming the dataset, split and classes) a dataset with fewer
than two classes, an empty split, and val/test classes that never occur in train (it reads
the train split's labels for that, never its images). With ``dataset.skip_bad_images=true``
it drops undecodable images after the split is determined (see :mod:`.integrity`).
Every split has a data fingerprint (:meth:`ClassificationSplit.fingerprint`, :func:`fingerprint`)
for cache keys.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..catalog import EVAL_SPLITS, Split, load, spec_of
from . import integrity
from .errors import DatasetNotFound
from .errors import (BadImageError, ClassesMissingFromTrainError, DatasetError,  # noqa: F401
                     EmptySplitError, TooFewClassesError)
from .integrity import FileItems, SourceFiles, Synthetic, fingerprint  # noqa: F401 (re-export)

log = logging.getLogger(__name__)



class ClassificationSplit(Dataset):
    """One split of a classification dataset.

    Items are ``(image_tensor, label)``.  Carries what the classifiers need:
    ``classnames`` (readable, CLIP style), ``templates`` (format strings with one ``{}``),
    and ``targets`` (all labels, in item order, for stratification and prototypes).

    Integrity: ``provenance`` (:class:`~.integrity.FileItems`, :class:`~.integrity.SourceFiles`
    or :class:`~.integrity.Synthetic`) says where the items come from and makes
    :meth:`fingerprint` possible; ``root`` is the data folder (for messages); ``skipped``
    lists the files dropped by ``dataset.skip_bad_images=true`` (``n_skipped`` their count);
    ``content_hash`` selects content hashing for the fingerprint.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None, targets: Sequence[int],
                 classnames: Sequence[str], templates: Sequence[str], name: str, split: str,
                 transform: Callable | None = None, load: Callable | None = None, *,
                 provenance=None, root: str | os.PathLike | None = None,
                 skipped: Sequence[str] = (), content_hash: bool = False):
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
        self.provenance = provenance
        self.root = str(root) if root is not None else None
        self.skipped = list(skipped)
        self.content_hash = bool(content_hash)
        self.label: str | None = None      # the dataset's identity in results when not its name (image_folder)
        self.record: dict | None = None    # what results record about how the data was split (image_folder)
        self._fingerprint: dict | None = None
        self._entries: list | None = None
        if self.indices is not None and len(self.indices) != len(self.targets):
            raise ValueError(f"{name}/{split}: {len(self.indices)} indices but {len(self.targets)} targets")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        j = self.indices[i] if self.indices is not None else i
        try:
            img, label = self._load(self.base, j)
        except BadImageError as e:
            if e.split is None and e.path is not None:   # name the split too
                raise BadImageError.for_file(e.path, e.reason or "unreadable", self.name,
                                             self.split) from e.__cause__
            raise
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)

    # ----------------------------------------------------------------- integrity
    def base_indices(self) -> list[int]:
        """Index into ``base`` of every item, in item order."""
        return list(self.indices) if self.indices is not None else list(range(len(self.targets)))

    def file_paths(self) -> list[str]:
        """The image file of every item (in item order); only for file-based splits."""
        if not isinstance(self.provenance, FileItems):
            raise TypeError(f"{self.name}/{self.split}: items are not individual files")
        paths = self.provenance.paths
        return [paths[j] for j in self.base_indices()]

    def file_relpaths(self) -> list[str]:
        """:meth:`file_paths` relative to the data root (what fingerprints and scans store)."""
        root = self.provenance.root
        return [integrity._rel(p, root) for p in self.file_paths()]

    def _file_entries(self) -> list:
        if self._entries is None:
            self._entries = integrity.file_entries(
                self.file_paths(), self.content_hash, f"fingerprint {self.name}/{self.split}")
        return self._entries

    def fingerprint(self) -> dict:
        """Data fingerprint (see :mod:`.integrity`), computed once per object.

        A small JSON-serialisable dict, e.g. ``{"kind": "files", "n_files": 20,
        "content_hash": false, "sha256": "..."}``; its ``sha256`` changes whenever the data
        of the split (files, their sizes / mtimes or contents, labels, membership) does.
        """
        if self._fingerprint is None:
            self._fingerprint = integrity.compute_fingerprint(self)
        return dict(self._fingerprint)

    def subset(self, keep: Sequence[int], skipped: Sequence[str] = ()) -> "ClassificationSplit":
        """The items at positions ``keep`` (same base, loader, metadata)."""
        keep = list(keep)
        base_idx = self.base_indices()
        out = ClassificationSplit(self.base, [base_idx[k] for k in keep],
                                  [self.targets[k] for k in keep], self.classnames,
                                  self.templates, self.name, self.split, self.transform,
                                  self._load, provenance=self.provenance, root=self.root,
                                  skipped=list(self.skipped) + list(skipped),
                                  content_hash=self.content_hash)
        if self._entries is not None:
            out._entries = [self._entries[k] for k in keep]
        out.label, out.record = self.label, self.record
        return out


def builder_of(cfg) -> Callable[..., ClassificationSplit]:
    """The builder ``cfg.spec.builder`` names."""
    return load(spec_of("dataset", cfg).builder)


def spec_function(cfg, key: str) -> Callable | None:
    """The function a dataset's spec names under ``key`` (an import path: ``identity``, ``splits_dir``), or None."""
    path = spec_of("dataset", cfg).get(key)
    return load(path) if path else None


def _opt(cfg, key: str, default=None):
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _root(cfg) -> Path | None:
    root = _opt(cfg, "root")
    return Path(str(root)).expanduser().absolute() if root is not None else None


def scan_cache_dir(cfg) -> Path | None:
    """Where the bad-image scans are stored: next to the split files."""
    from .splits import split_path

    root = _root(cfg)
    if root is None:
        return None
    own = spec_function(cfg, "splits_dir")
    if own is not None:                # a user's folder: with the project's outputs, not in the data
        return own(cfg)
    params = _opt(cfg, "params", {}) or {}
    return split_path(root, "_", params.get("splits_dir")).parent


def data_label(cfg) -> str:
    """The dataset's name in results: its config name, or what its spec's ``identity`` says (a
    user's folder: ``image_folder:<name>-<hash>``, so that different folders never merge)."""
    own = spec_function(cfg, "identity")
    return own(cfg) if own is not None else str(cfg.name)


def _train_labels(cfg) -> list[int] | None:
    """Labels of the train split (no images decoded where the spec names a ``labels`` function);
    ``None`` when its data is missing."""
    labels = spec_of("dataset", cfg).labels
    try:
        if labels:
            return [int(t) for t in load(labels)(cfg, Split.train)]
        return list(builder_of(cfg)(cfg, Split.train, None).targets)
    except DatasetNotFound as e:
        log.warning("dataset %r: cannot check the classes of the other splits against train: "
                    "the train data is missing (%s)", cfg.name, str(e).splitlines()[0])
        return None


def check_split(ds: ClassificationSplit, train_labels: Sequence[int] | None,
                root=None, *, after_skip: bool = False) -> None:
    """Raise a :class:`~.errors.DatasetError` when ``ds`` cannot give a meaningful result.

    ``train_labels``: labels of the train split (``ds.targets`` for train itself; ``None``
    skips the class checks, as for ``reference``, which only feeds the PCA bases).
    """
    name, split = ds.name, ds.split
    if len(ds.classnames) < 2:
        raise TooFewClassesError.build(name, split, ds.classnames, {}, root,
                                       n_declared=len(ds.classnames))
    if len(ds) == 0:
        hint = None
        if after_skip and ds.n_skipped:
            hint = (f"All {ds.n_skipped} images of the split are unreadable and were skipped "
                    f"(dataset.skip_bad_images=true), e.g. {ds.skipped[0]}; fix or replace them")
        elif split == Split.val:
            hint = ("Nothing was carved out of (or found for) val: the train source is too "
                    "small for the val fraction, or the val data is empty; add data, raise "
                    "dataset.params.val_fraction (where the dataset has it) or check the "
                    f"data{f' under root {str(root)!r}' if root else ''}")
        raise EmptySplitError.build(name, split, root, hint)
    if train_labels is None:
        return
    train_counts = integrity.class_counts(train_labels)
    synthetic = isinstance(ds.provenance, Synthetic)
    if len(train_counts) < 2:
        raise TooFewClassesError.build(name, split, ds.classnames, train_counts, root,
                                       hint="Raise dataset.params.n_train" if synthetic else None)
    if split in EVAL_SPLITS:
        counts = integrity.class_counts(ds.targets)
        missing = {t: c for t, c in counts.items() if t not in train_counts}
        if missing:
            hint = "Raise dataset.params.n_train (the synthetic train split is too small)" \
                if synthetic else None
            raise ClassesMissingFromTrainError.build(name, split, ds.classnames, missing, root,
                                                     hint=hint)


def build_split(cfg, split: str, transform: Callable | None = None, *,
                check: bool = True) -> ClassificationSplit:
    """Build ``split`` of the dataset described by the ``dataset`` config node ``cfg``.

    With ``check`` (the default) the split is guarded (:func:`check_split`) and, with
    ``dataset.skip_bad_images=true``, its undecodable images are dropped; ``check=False``
    returns the split as the builder made it (``task=inspect_data`` reports instead).
    """
    if split not in set(Split):
        raise ValueError(f"unknown split {split!r}; valid: {' | '.join(Split)}")
    split = str(split)                                   # a plain string from here on (messages, records)
    ds = builder_of(cfg)(cfg, split, transform)
    ds.content_hash = bool(_opt(cfg, "content_hash", False))
    if ds.root is None and _root(cfg) is not None and not isinstance(ds.provenance, Synthetic):
        ds.root = str(_root(cfg))
    if not check:
        return ds
    root = ds.root
    if split == Split.train:
        train_labels = ds.targets
    elif split in EVAL_SPLITS:
        train_labels = _train_labels(cfg)
    else:
        train_labels = None
    check_split(ds, train_labels, root)
    if bool(_opt(cfg, "skip_bad_images", False)):
        before = integrity.class_counts(ds.targets)
        ds = integrity.skip_bad_images(ds, scan_cache_dir(cfg))
        if ds.n_skipped:
            if split == Split.train and len(ds):
                after = integrity.class_counts(ds.targets)
                lost = {t: c for t, c in before.items() if t not in after}
                if lost:
                    raise ClassesMissingFromTrainError.build(
                        ds.name, split, ds.classnames, lost, root,
                        hint=f"Every train image of {'this class' if len(lost) == 1 else 'these classes'} "
                             f"is unreadable and was skipped (dataset.skip_bad_images=true), "
                             f"e.g. {ds.skipped[0]}; fix or replace the files")
            check_split(ds, ds.targets if split == Split.train else None, root, after_skip=True)
    return ds


def stack_images(batch: list[tuple[torch.Tensor, int]]):
    imgs, labels = zip(*batch)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.long)
