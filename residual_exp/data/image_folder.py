"""``dataset=image_folder``: your own class-per-folder images, in either of two layouts.

* **plain** — ``root/<class>/…`` (torchvision's ``ImageFolder`` layout, how most datasets ship):
  train / val / test are carved from it, stratified per class, with ``dataset.params.val_fraction``
  (default 0.1), ``dataset.params.test_fraction`` (default 0.1) and ``dataset.params.split_seed``
  (default 42);
* **split** — ``root/train/<class>/…``, ``root/test/<class>/…`` and optionally ``root/val/<class>/…``
  (without ``val/``, val is carved from train with ``val_fraction``).

Class folders are listed recursively (nested folders belong to their class; symbolic links are
followed, each folder once); hidden files and folders (``.*``, e.g. macOS ``._x.jpg``) are skipped.
The folder name is the class name (underscores read as spaces; ``dataset.params.classnames`` renames
them: a list, one name per class in the order of the sorted folder names, or ``{folder: name}``).
Before anything is encoded the layout is refused, with the folders named, when

* a class folder holds no image (``dataset.params.drop_empty_classes=true`` drops them instead; the
  dropped names are recorded in the results),
* two folders give the same class name (``red_car`` and ``red car``),
* the root mixes split folders with class folders, or holds no class folder.

**Identity.** A folder's results are recorded as dataset ``image_folder:<folder name>-<hash>``
(:func:`identity`), where the hash is a short fingerprint of what the folder holds (every image's
path, class and size): runs on different folders, or on a folder whose content changed, are never
merged by a report nor resumed from one another.

**Splits** carved here are stored with the project's outputs (``<paths.root_dir>/outputs/splits``,
or ``dataset.params.splits_dir``), never in your data folder, under a name keyed by the folder's
fingerprint and the fractions and seed: a changed folder gets a new split, never a stale one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from torchvision.datasets.folder import IMG_EXTENSIONS

from . import metadata as md
from .errors import ClassesMissingFromTrainError, DatasetError, DatasetNotFound
from ..catalog import Split
from ..config import ImageFolderParams
from .registry import ClassificationSplit
from .splits import load_or_create

log = logging.getLogger(__name__)

NAME = "image_folder"
SPLIT_DIRS = tuple(s.value for s in Split if s != Split.reference)      # the split folders of the split layout
PARAM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ImageFolderParams)}
PROJECT_SPLITS = Path("outputs") / "splits"          # under paths.root_dir
_WARNED: set[tuple[str, tuple[str, ...]]] = set()    # (root, dropped class folders) already reported

LAYOUT = ("<class>/*.jpg|png|...         (plain: train/val/test carved from it)\n"
          "  or\n"
          "train/<class>/*.jpg|png|...\ntest/<class>/*.jpg|png|...\n"
          "val/<class>/*   (optional; without it val is carved from train)")
HOW = ("Point dataset.root at a folder holding one sub-folder per class (the folder name is the class name; "
       "underscores read as spaces), or one sub-folder per split (train/, test/, optional val/) and one "
       "sub-folder per class inside each. Carved splits: dataset.params.val_fraction (default 0.1), "
       "test_fraction (default 0.1, plain layout), split_seed (default 42); stored under "
       "<paths.root_dir>/outputs/splits. Class names: dataset.params.classnames; prompt templates: "
       "dataset.params.templates (a list with one {} each).")


class ImageFolderError(DatasetError):
    """A class folder tree that cannot be used as it is (empty classes, colliding names, mixed layout)."""


# --- listing -----------------------------------------------------------------------------------------------
def _hidden(name: str) -> bool:
    return name.startswith(".")


def _class_dirs(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _hidden(e.name))
    except OSError as e:
        raise DatasetNotFound(NAME, folder, LAYOUT, HOW, problem=f"dataset 'image_folder': cannot list {folder} "
                                                               f"({e.strerror or e})") from None


def _images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, symlinks followed once each, hidden entries skipped), in
    torchvision ``make_dataset``'s order (sorted folders, then sorted names)."""
    out, seen = [], set()
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:                          # a symlink loop, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        walked.append((dirpath, filenames))
    for dirpath, filenames in sorted(walked):
        for f in sorted(filenames):
            if not _hidden(f) and f.lower().endswith(IMG_EXTENSIONS):
                out.append(os.path.join(dirpath, f))
    return out


@dataclass
class Tree:
    """What a class folder tree holds: the layout, the class folders in use, and per split folder the
    ``(path, label)`` samples."""
    root: Path
    layout: Literal["plain", "split"]            # root/<class>/… or root/{train,test[,val]}/<class>/…
    folders: list[str]                           # class folders in use (label order)
    classnames: list[str]
    samples: dict[str, list[tuple[str, int]]]    # "all" (plain) or train / val / test (split)
    dropped: list[str] = field(default_factory=list)   # empty class folders dropped
    stray: int = 0                               # images directly under a split / the root (in no class)

    def identity_hash(self) -> str:
        """Short fingerprint of the tree: every image's path (relative to root), class and size."""
        h = hashlib.sha256(f"{self.layout}\n".encode())
        for part in sorted(self.samples):
            for path, label in self.samples[part]:
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1
                rel = os.path.relpath(path, self.root)
                h.update(f"{part}\t{rel}\t{self.folders[label]}\t{size}\n".encode())
        h.update(json.dumps(self.classnames).encode())
        return h.hexdigest()[:10]

    @property
    def label(self) -> str:
        return f"{NAME}:{self.root.name or 'root'}-{self.identity_hash()}"


def _root(cfg) -> Path:
    return Path(str(cfg.root)).expanduser().absolute()


def _params(cfg) -> Mapping:
    """``dataset.params`` over the defaults of its schema (:class:`~residual_exp.config.ImageFolderParams`)."""
    return {**PARAM_DEFAULTS, **dict(getattr(cfg, "params", None) or {})}


def _layout(root: Path) -> str:
    if not root.is_dir():
        raise DatasetNotFound(NAME, root, LAYOUT, HOW,
                              problem=(f"dataset 'image_folder': dataset.root={root} "
                                       f"{'is a file, not a folder' if root.exists() else 'does not exist'} "
                                       "(set it with dataset.root=...)"))
    dirs = _class_dirs(root)
    splits = [d for d in dirs if d in SPLIT_DIRS]
    if "train" in splits or "test" in splits:
        others = [d for d in dirs if d not in SPLIT_DIRS]
        if others:
            raise ImageFolderError(
                f"dataset 'image_folder': {root} mixes split folders ({', '.join(d + '/' for d in splits)}) with "
                f"other folders ({', '.join(d + '/' for d in others[:5])}{', …' if len(others) > 5 else ''}): use "
                "either root/<class>/… (train/val/test carved) or root/train|test[|val]/<class>/…")
        return "split"
    if not dirs:
        raise DatasetNotFound(NAME, root, LAYOUT, HOW,
                              problem=f"dataset 'image_folder': {root} has no class folders (one sub-folder per "
                                      "class, or train/ and test/ with one sub-folder per class inside)")
    return "plain"


def _names(cfg, folders: list[str], kept: list[str]) -> list[str]:
    """Class names of the ``kept`` folders: ``dataset.params.classnames`` (a list for every folder or for
    the kept ones, in sorted folder order, or ``{folder: name}``), else the cleaned folder names."""
    given = _params(cfg).get("classnames")
    if given is None:
        return [md.clean_classname(f) for f in kept]
    if isinstance(given, Mapping):
        unknown = sorted(set(map(str, given)) - set(folders))
        if unknown:
            raise ImageFolderError(f"dataset.params.classnames names folders that are not classes of "
                                   f"{_root(cfg)}: {', '.join(unknown[:5])} (its class folders: "
                                   f"{', '.join(folders[:10])}{', …' if len(folders) > 10 else ''})")
        return [str(given.get(f, md.clean_classname(f))) for f in kept]
    given = [str(g) for g in given]
    if len(given) == len(kept):
        return given
    if len(given) == len(folders):
        return [given[folders.index(f)] for f in kept]
    raise ImageFolderError(f"dataset.params.classnames has {len(given)} names but {_root(cfg)} has "
                           f"{len(kept)} class folders ({', '.join(kept[:10])}{', …' if len(kept) > 10 else ''}): "
                           "give one name per class folder, in the order of the sorted folder names")


def scan(cfg) -> Tree:
    """List the tree under ``dataset.root`` and check it (no image is decoded)."""
    root = _root(cfg)
    layout = _layout(root)
    drop = bool(_params(cfg)["drop_empty_classes"])
    if layout == "plain":
        folders = _class_dirs(root)
        per_class = {f: _images(root / f) for f in folders}
        stray = sum(1 for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        where = {"all": root}
    else:
        for needed in ("train", "test"):
            if not (root / needed).is_dir():
                raise DatasetNotFound(NAME, root, LAYOUT, HOW, [needed + "/"])
        folders = _class_dirs(root / "train")
        if not folders:
            raise DatasetNotFound(NAME, root, LAYOUT, HOW,
                                  problem=f"dataset 'image_folder': {root / 'train'} has no class folders")
        where = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
        for s, folder in where.items():
            extra = sorted(set(_class_dirs(folder)) - set(folders))
            if extra:                             # classes train/ cannot know
                counts = {k: len(_images(folder / c)) for k, c in enumerate(extra)}
                raise ClassesMissingFromTrainError.build(
                    NAME, s, [md.clean_classname(c) for c in extra], counts, root,
                    hint=f"{folder} has class folders that {root / 'train'} lacks ({', '.join(extra)}); add them "
                         f"to train/ or remove them from {s}/")
        per_class = {f: _images(root / "train" / f) for f in folders}
        stray = sum(1 for s, folder in where.items() for e in os.scandir(folder)
                    if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    empty = [f for f in folders if not per_class[f]]
    if empty and not drop:
        what = "the train split of " if layout == "split" else ""
        raise ImageFolderError(
            f"dataset 'image_folder': {len(empty)} class folder{'s' if len(empty) != 1 else ''} in {what}{root} "
            f"hold{'s' if len(empty) == 1 else ''} no image ({', '.join(e + '/' for e in empty[:10])}"
            f"{', …' if len(empty) > 10 else ''}; image files: {', '.join(IMG_EXTENSIONS)}): add images, remove the "
            "folders, or set dataset.params.drop_empty_classes=true to leave them out (recorded in the results)")
    kept = [f for f in folders if f not in empty]
    if empty and (str(root), tuple(empty)) not in _WARNED:      # once per folder, not once per split / scan
        _WARNED.add((str(root), tuple(empty)))
        log.warning("image_folder: leaving out %d empty class folder(s) (dataset.params.drop_empty_classes=true): %s",
                    len(empty), ", ".join(empty))
    names = _names(cfg, folders, kept)
    _refuse_colliding_names(root, kept, names)
    index = {f: i for i, f in enumerate(kept)}
    samples = {}
    for s, folder in where.items():
        samples[s] = [(p, index[f]) for f in _class_dirs(folder) if f in index for p in _images(folder / f)]
    if stray:
        log.warning("image_folder: %d image(s) directly under %s are in no class folder and are not used", stray,
                    " / ".join(str(w) for w in where.values()))
    return Tree(root, layout, kept, names, samples, empty, stray)


def _refuse_colliding_names(root: Path, folders: list[str], names: list[str]) -> None:
    by: dict[str, list[str]] = {}
    for f, n in zip(folders, names):
        by.setdefault(" ".join(n.lower().split()), []).append(f)
    clashes = {n: fs for n, fs in by.items() if len(fs) > 1}
    if clashes:
        desc = "; ".join(f"{' and '.join(repr(f) for f in fs)} → {n!r}" for n, fs in list(clashes.items())[:5])
        raise ImageFolderError(f"dataset 'image_folder': class folders of {root} give the same class name ({desc}): "
                               "they would get the same prompt and could never be told apart; merge or rename the "
                               "folders, or give distinct names with dataset.params.classnames")


# --- splits ------------------------------------------------------------------------------------------------
def fractions(cfg, layout: str) -> dict[str, float]:
    p = _params(cfg)
    val = float(p["val_fraction"])
    if layout == "plain":
        return {"val": val, "test": float(p["test_fraction"])}
    return {"val": val}


def splits_dir(cfg) -> Path:
    """Where carved splits (and bad-image scans) of a folder are stored: ``dataset.params.splits_dir``, else
    ``<paths.root_dir>/outputs/splits`` of the config the node belongs to (``$RESIDUAL_EXP_ROOT`` or the
    working folder outside one)."""
    given = _params(cfg).get("splits_dir")
    if given:
        return Path(str(given)).expanduser()
    root_dir = None
    try:
        from omegaconf import OmegaConf
        top = cfg._get_root()
        root_dir = OmegaConf.select(top, "paths.root_dir", default=None)
    except Exception:
        pass
    base = Path(str(root_dir or os.environ.get("RESIDUAL_EXP_ROOT") or ".")).expanduser()
    return base.absolute() / PROJECT_SPLITS


def _split_key(tree: Tree, fracs: Mapping[str, float], seed: int) -> str:
    part = "all" if tree.layout == "plain" else "train"
    h = hashlib.sha256(json.dumps({"root": tree.root.name, "fractions": dict(fracs), "seed": seed,
                                   "classes": tree.folders,
                                   "items": [(os.path.relpath(p, tree.root), t) for p, t in tree.samples[part]]},
                                  sort_keys=True).encode())
    return f"{NAME}-{tree.root.name or 'root'}-{h.hexdigest()[:16]}"


def split_record(cfg, tree: Tree) -> dict:
    """What results record about a folder dataset (the report can read it): its root, layout, carved
    fractions and seed, and the class folders left out."""
    rec = {"root": str(tree.root.resolve()), "layout": tree.layout, "classes": len(tree.folders)}
    if tree.layout == "plain" or not (tree.root / "val").is_dir():
        rec.update(fractions=fractions(cfg, tree.layout), split_seed=int(_params(cfg)["split_seed"]))
    if tree.dropped:
        rec["dropped_empty_classes"] = list(tree.dropped)
    return rec


# --- the builder ---------------------------------------------------------------------------------------------
def _split(tree: Tree, cfg, split: str, transform) -> ClassificationSplit:
    from .vision import _files, _make
    templates = list(_params(cfg).get("templates") or md.TEMPLATES[NAME])
    official = {"reference": "train"}.get(split, split)
    if tree.layout == "split":
        has_val = "val" in tree.samples
        if official == "test" or (official == "val" and has_val) or (official == "train" and has_val):
            samples = tree.samples[official]
            positions, part = None, official
        else:
            samples, part = tree.samples["train"], "train"
            positions = official
    else:
        samples, part, positions = tree.samples["all"], "all", official
    if not samples:
        raise DatasetNotFound(NAME, tree.root, LAYOUT, HOW,
                              problem=f"dataset 'image_folder': no images under {tree.root / part if part != 'all' else tree.root}")
    src = _files(NAME, [p for p, _ in samples], [t for _, t in samples], tree.classnames)
    if positions is None:
        ds = _make(NAME, split, src, None, templates, transform, tree.root)
    else:
        seed = int(_params(cfg)["split_seed"])
        fracs = fractions(cfg, tree.layout)
        path = splits_dir(cfg) / f"{_split_key(tree, fracs, seed)}.json"
        parts = load_or_create(path, dataset=NAME, targets=src.labels, fractions=fracs, seed=seed)
        ds = _make(NAME, split, src, parts[positions], templates, transform, tree.root)
    ds.label = tree.label
    ds.record = split_record(cfg, tree)
    return ds


def identity(cfg) -> str:
    """``image_folder:<folder name>-<hash>`` of the folder ``cfg`` points at (what results record)."""
    return scan(cfg).label


def build_image_folder(cfg, split: str, transform=None) -> ClassificationSplit:
    return _split(scan(cfg), cfg, split, transform)
