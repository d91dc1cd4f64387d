"""Exceptions for problems with the data (missing, unreadable, unusable).

Every one derives from :class:`DatasetError` (a ``ValueError``), so a caller can turn any
data problem into a one-line message and a distinct exit status::

    except DatasetError as e:
        print(e); sys.exit(2)

Each message names the dataset, the split, what is wrong (file paths, class names and
counts) and what to do about it.

=============================  ==========================================================
:class:`DatasetNotFound`       the data is missing under ``root`` (also a ``FileNotFoundError``)
:class:`SplitMismatchError`    a stored split does not fit the data (in :mod:`.splits`;
                               also a ``RuntimeError``)
:class:`BadImageError`         an image file cannot be decoded
:class:`TooFewClassesError`    fewer than two classes to classify
:class:`EmptySplitError`       a split has no items
:class:`ClassesMissingFromTrainError`  val/test has classes that train never shows
=============================  ==========================================================
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["DatasetError", "DatasetNotFound", "BadImageError", "TooFewClassesError", "EmptySplitError",
           "ClassesMissingFromTrainError", "SKIP_HINT"]

SKIP_HINT = ("Fix or delete the file, or set dataset.skip_bad_images=true to skip unreadable "
             "images (they are counted, listed and logged).")


class DatasetError(ValueError):
    """Base class of every data problem (missing, unreadable or unusable data).

    Subclasses keep a one-argument constructor path (``cls(message)``) so that they survive
    being re-raised from a ``DataLoader`` worker.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _where(dataset: str | None, split: str | None) -> str:
    if dataset and split:
        return f"dataset {dataset!r}, split {split!r}"
    if dataset:
        return f"dataset {dataset!r}"
    return "dataset"


def _root_hint(root) -> str:
    return f" (data under root {str(root)!r})" if root else ""


class BadImageError(DatasetError):
    """An image file cannot be opened or decoded (truncated, garbage, empty, missing)."""

    def __init__(self, message: str, *, path: str | None = None, dataset: str | None = None,
                 split: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.dataset, self.split, self.reason = path, dataset, split, reason

    @classmethod
    def for_file(cls, path, reason: str, dataset: str | None = None,
                 split: str | None = None) -> "BadImageError":
        msg = (f"{_where(dataset, split)}: cannot decode image file {str(path)!r} "
               f"({reason}). {SKIP_HINT}")
        return cls(msg, path=str(path), dataset=dataset, split=split, reason=reason)


def _counts(names: Sequence[str], counts: Mapping[int, int], labels: Sequence[int],
            limit: int = 10) -> str:
    def name(t: int) -> str:
        return names[t] if 0 <= t < len(names) else f"label {t}"
    parts = [f"{name(t)} ({counts.get(t, 0)} image{'' if counts.get(t, 0) == 1 else 's'})"
             for t in list(labels)[:limit]]
    more = f", ... ({len(labels) - limit} more)" if len(labels) > limit else ""
    return ", ".join(parts) + more


class _ClassesError(DatasetError):
    """A data problem about some classes of a split (``.dataset``, ``.split``, ``.classes``)."""

    def __init__(self, message: str, *, dataset: str | None = None, split: str | None = None,
                 classes: Sequence[str] = ()):
        super().__init__(message)
        self.dataset, self.split, self.classes = dataset, split, list(classes)


class TooFewClassesError(_ClassesError):
    """The dataset (its train split) has fewer than two classes."""

    @classmethod
    def build(cls, dataset: str, split: str, classnames: Sequence[str],
              train_counts: Mapping[int, int], root=None, *,
              n_declared: int | None = None, hint: str | None = None) -> "TooFewClassesError":
        present = sorted(t for t, c in train_counts.items() if c > 0)
        if n_declared is not None and n_declared < 2:
            what = (f"the dataset declares {n_declared} class"
                    f"{'' if n_declared == 1 else 'es'}"
                    + (f" ({', '.join(classnames)})" if classnames else ""))
        elif present:
            what = (f"only {len(present)} class has images in the train split: "
                    f"{_counts(classnames, train_counts, present)}")
        else:
            what = "no class has images in the train split"
        msg = (f"{_where(dataset, split)}: {what}; a classifier needs at least 2 classes. "
               + (hint or f"Add images of more classes to the train data{_root_hint(root)}, "
                          f"or check the dataset config") + ".")
        names = [classnames[t] if t < len(classnames) else str(t) for t in present]
        return cls(msg, dataset=dataset, split=split, classes=names)


class EmptySplitError(DatasetError):
    """A split has no items."""

    def __init__(self, message: str, *, dataset: str | None = None, split: str | None = None):
        super().__init__(message)
        self.dataset, self.split = dataset, split

    @classmethod
    def build(cls, dataset: str, split: str, root=None, hint: str | None = None
              ) -> "EmptySplitError":
        msg = (f"{_where(dataset, split)}: the split is empty (0 images). "
               + (hint or f"Check the data{_root_hint(root)} and dataset.params") + ".")
        return cls(msg, dataset=dataset, split=split)


class ClassesMissingFromTrainError(_ClassesError):
    """A class occurs in val or test but never in train (the model can never learn it)."""

    @classmethod
    def build(cls, dataset: str, split: str, classnames: Sequence[str],
              missing_counts: Mapping[int, int], root=None, hint: str | None = None
              ) -> "ClassesMissingFromTrainError":
        labels = sorted(missing_counts)
        n = len(labels)
        cls_ = f"{n} class{'' if n == 1 else 'es'}"
        if split == "train":
            what = f"{cls_} of the train data {'has' if n == 1 else 'have'} no usable image left"
        else:
            what = (f"{cls_} occur{'s' if n == 1 else ''} in the {split} split but never in "
                    f"the train split")
        msg = (f"{_where(dataset, split)}: {what}: "
               f"{_counts(classnames, missing_counts, labels)}. "
               + (hint or f"Add train images of {'it' if n == 1 else 'them'}, or remove "
                          f"{'it' if n == 1 else 'them'} from the {split} data"
                          f"{_root_hint(root)}") + ".")
        names = [classnames[t] if 0 <= t < len(classnames) else str(t) for t in labels]
        return cls(msg, dataset=dataset, split=split, classes=names)


class DatasetNotFound(DatasetError, FileNotFoundError):
    """The data of a dataset is missing (or unreadable) under ``root``."""

    def __init__(self, name: str, root: Path, layout: str, how_to_get: str,
                 missing: Sequence[str] = (), problem: str | None = None):
        self.name, self.root, self.layout, self.how_to_get = name, root, layout, how_to_get
        self.missing = list(missing)
        lines = [problem or f"dataset {name!r}: data not found under root {str(root)!r} "
                            f"(set it with dataset.root=...)."]
        if self.missing:
            lines += ["missing under root:"] + [f"  - {m}" for m in self.missing]
        lines += ["expected layout under root:", _indent(layout), "how to get it:",
                  _indent(how_to_get)]
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # FileNotFoundError would prefix "[Errno ...]" otherwise
        return self.args[0]

    @property
    def problems(self) -> list[str]:
        """The one line ``python -m residual_exp`` prints (``str(e)`` keeps the layout and how to get
        the data, which ``task=inspect_data`` prints in full)."""
        first = str(self.args[0]).splitlines()[0].rstrip(". ")
        missing = ""
        if self.missing:
            missing = f"; missing {', '.join(self.missing[:3])}{', …' if len(self.missing) > 3 else ''}"
        return [f"{first}{missing}; `python -m residual_exp task=inspect_data dataset={self.name} "
                f"dataset.root={self.root}` prints the expected layout and how to get it"]


def _indent(text: str, pad: str = "  ") -> str:
    return "\n".join(pad + line for line in text.strip("\n").splitlines())
