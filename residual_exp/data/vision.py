"""The paper's ten datasets and the ImageNet reference set (``image_folder``: :mod:`.image_folder`).

``dataset=NAME`` with NAME in ``cifar10 cifar100 dtd eurosat gtsrb mnist resisc45
stanford_cars sun397 svhn imagenet``; ``dataset.root`` points at the data.

Every dataset is one :class:`Loader` row — how to open an official split from disk (mostly a
torchvision dataset class), the expected layout under ``root``, how to get the data — and its
config's ``spec`` says the split protocol of the paper (``conf/dataset/NAME.yaml``):

``carve_val``  train/val carved from the official train split (stratified, seed 42,
               ``val_fraction``); test = the official test split
``three_way``  no official split: 80/10/10 train/val/test of the whole set (stratified)
``official``   the dataset's own train/val/test lists (RESISC45)

``reference`` is the train split (for ``imagenet`` that is what the PCA bases are fit on).
Carved splits are stored next to the data (see :mod:`.splits`).  DTD: the official
partition 1 ``train1`` list is the train source and ``test1`` the test split; the official
``val1`` list is not used (the paper carves val out of train).

Items are ``(transform(RGB PIL image), label)``; grey-scale sources (MNIST) are converted
to RGB so every backbone sees three channels.  Missing or unreadable data raises
:class:`DatasetNotFound` (a ``FileNotFoundError`` and a :class:`~.errors.DatasetError`)
naming the dataset, the root, the layout expected under it and how to obtain the data,
before anything is written.

Datasets of individual image files (ImageNet, EuroSAT, RESISC45, SUN397, DTD, GTSRB,
Stanford Cars, and image_folder's) are read through our own guarded loader
(:func:`.integrity.decode_image`: an undecodable file raises
:class:`~.errors.BadImageError` naming it); torchvision only lists their files and labels.
Every split records where its items come from (``provenance``) for its data fingerprint.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from torch.utils.data import Dataset
from torchvision import datasets as tvd

from . import metadata as md
from .errors import DatasetNotFound
from .integrity import FileItems, SourceFiles, decode_image
from ..catalog import Protocol, Split, spec_of
from .registry import ClassificationSplit
from .splits import load_or_create, split_path

__all__ = ["DatasetNotFound", "Source", "Loader", "LOADERS", "build", "check_available", "clear_cache",
           "official_split"]


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    """One official split opened from disk.

    ``labels[i]`` is the label of ``base[i]`` in *our* class indexing (``classnames``);
    ``order`` lists base indices in canonical order when the base order is not
    deterministic (``None``: base order is canonical).  Stored split indices refer to
    positions in the canonical order.  ``paths[j]`` is the image file of ``base[j]`` for
    datasets of individual files; ``files`` the few source files every item is read from
    otherwise (CIFAR pickles, MNIST idx, SVHN .mat).
    """
    base: Dataset
    labels: Sequence[int]
    classnames: Sequence[str]
    order: Sequence[int] | None = None
    paths: Sequence[str] | None = None
    files: Sequence[Path] = ()

    def provenance(self, root: Path):
        if self.paths is not None:
            return FileItems(root, self.paths)
        return SourceFiles(root, list(self.files))

    def canonical(self) -> list[int]:
        return list(self.order) if self.order is not None else list(range(len(self.labels)))


class _LoadRGB:
    """``load(base, j) -> (RGB PIL image, our label of j)`` (picklable for DataLoader workers)."""

    def __init__(self, labels: Sequence[int]):
        self.labels = [int(t) for t in labels]

    def __call__(self, base: Dataset, j: int):
        img = base[j][0]
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        return img, self.labels[j]


class _FileList(Dataset):
    """``(path, label)`` samples, each fully decoded to RGB by :func:`.integrity.decode_image`
    (the same pixels as torchvision's PIL loader; an undecodable file raises
    :class:`~.errors.BadImageError` naming it)."""

    def __init__(self, samples: Sequence[tuple[str, int]], name: str | None = None):
        self.samples = [(str(p), int(t)) for p, t in samples]
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return decode_image(path, self.name), label


def _files(name: str, paths: Sequence, labels: Sequence[int], classnames: Sequence[str],
           order: Sequence[int] | None = None) -> Source:
    """A source of one image file per item, read through our guarded loader."""
    paths = [str(p) for p in paths]
    labels = [int(t) for t in labels]
    return Source(_FileList(zip(paths, labels), name), labels, classnames, order, paths=paths)


# ---------------------------------------------------------------- per-dataset openers
# ``open(root, split, download) -> Source`` with split in the spec's official splits.

def _open_cifar(cls):
    def open_(root: Path, split: str, download: bool) -> Source:
        ds = cls(str(root), train=split == "train", download=download)
        folder = root / cls.base_folder
        files = [folder / f for f, _ in (ds.train_list if split == "train" else ds.test_list)]
        return Source(ds, ds.targets, md.cifar_classnames(ds.classes),
                      files=files + [folder / ds.meta["filename"]])
    return open_


def _open_mnist(root: Path, split: str, download: bool) -> Source:
    ds = tvd.MNIST(str(root), train=split == "train", download=download)
    prefix = "train" if split == "train" else "t10k"
    raw = Path(ds.raw_folder)
    return Source(ds, ds.targets.tolist(), md.DIGITS,
                  files=[raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"])


def _open_svhn(root: Path, split: str, download: bool) -> Source:
    ds = tvd.SVHN(str(root / "svhn"), split=split, download=download)
    return Source(ds, ds.labels.tolist(), md.DIGITS,        # torchvision maps label 10 -> 0
                  files=[root / "svhn" / ds.filename])


def _open_gtsrb(root: Path, split: str, download: bool) -> Source:
    ds = tvd.GTSRB(str(root), split=split, download=download)
    if split == "train":   # torchvision numbers the class folders it finds; use their ClassId
        labels = [int(Path(path).parent.name) for path, _ in ds._samples]
    else:                  # test labels come from GT-final_test.csv's ClassId
        labels = [int(t) for _, t in ds._samples]
    _check_range("gtsrb", labels, len(md.GTSRB))
    return _files("gtsrb", [path for path, _ in ds._samples], labels, md.GTSRB)


def _open_dtd(root: Path, split: str, download: bool) -> Source:
    ds = tvd.DTD(str(root), split=split, partition=1, download=download)
    # torchvision derives classes from the split list; index by the image folders instead
    # so train and test always agree
    folders = sorted(p.name for p in (root / "dtd" / "dtd" / "images").iterdir() if p.is_dir())
    remap = [folders.index(c) for c in ds.classes]
    return _files("dtd", ds._image_files, [remap[t] for t in ds._labels],
                  md.clean_classnames(folders))


def _open_eurosat(root: Path, split: str, download: bool) -> Source:
    ds = tvd.EuroSAT(str(root), download=download)
    names = [md.EUROSAT.get(c, md.clean_classname(c)) for c in ds.classes]
    return _files("eurosat", [p for p, _ in ds.samples], ds.targets, names)


def _open_cars(root: Path, split: str, download: bool) -> Source:
    ds = tvd.StanfordCars(str(root), split=split)
    return _files("stanford_cars", [p for p, _ in ds._samples], [int(t) for _, t in ds._samples],
                  [str(c).strip() for c in ds.classes])


def _open_sun397(root: Path, split: str, download: bool) -> Source:
    ds = tvd.SUN397(str(root))
    data_dir = root / "SUN397"
    # torchvision lists files with rglob (file-system order): sort them by relative path
    rel = [Path(p).relative_to(data_dir).as_posix() for p in ds._image_files]
    order = sorted(range(len(rel)), key=rel.__getitem__)
    return _files("sun397", ds._image_files, ds._labels, md.clean_classnames(ds.classes), order)


def _open_imagenet(root: Path, split: str, download: bool) -> Source:
    from torchvision.datasets.imagenet import load_meta_file

    inet = root / "imagenet"
    ds = tvd.ImageNet(str(inet), split="train" if split == "train" else "val")
    wnids = sorted(load_meta_file(str(inet))[0])             # the 1000 devkit classes
    if len(wnids) != len(md.IMAGENET):
        raise RuntimeError(f"{inet / 'meta.bin'} lists {len(wnids)} classes, expected "
                           f"{len(md.IMAGENET)} (ILSVRC2012)")
    remap = [wnids.index(w) for w in ds.wnids]                # folder subset -> 1000 classes
    return _files("imagenet", [p for p, _ in ds.samples], [remap[t] for t in ds.targets],
                  md.IMAGENET)


def _open_resisc45(root: Path, split: str, download: bool) -> Source:
    image_dir = root / "NWPU-RESISC45"
    with open(root / f"resisc45-{split}.txt", encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    index = {c: i for i, c in enumerate(md.RESISC45_FOLDERS)}
    samples, missing = [], []
    for fname in names:                                         # e.g. "sea_ice_042.jpg"
        cls = fname.rsplit("_", 1)[0]
        if cls not in index:
            raise RuntimeError(f"resisc45-{split}.txt lists {fname!r}, whose class {cls!r} "
                               f"is not one of the 45 RESISC45 classes")
        path = image_dir / cls / fname
        if not path.is_file():
            missing.append(str(path.relative_to(root)))
        samples.append((str(path), index[cls]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of resisc45-{split}.txt are missing, "
                                f"e.g. {', '.join(missing[:3])}")
    return _files("resisc45", [p for p, _ in samples], [t for _, t in samples],
                  md.clean_classnames(md.RESISC45_FOLDERS))


def _check_range(name: str, labels: Sequence[int], n: int) -> None:
    bad = sorted({t for t in labels if not 0 <= t < n})
    if bad:
        raise RuntimeError(f"{name}: labels {bad[:5]} outside 0..{n - 1}")


# ------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class Loader:
    """How one dataset's official splits are read from disk.  What the dataset *is* (protocol,
    sizes, val fraction, whether it downloads) is its config's spec (``conf/dataset/NAME.yaml``)."""
    name: str
    open: Callable[[Path, str, bool], Source]
    layout: str                                    # expected on-disk layout under root
    how_to_get: str
    # official split -> paths under root that must exist; a tuple entry means "any of"
    required: Mapping[str, Sequence[str | tuple[str, ...]]]


def official_split(protocol: str, split: str) -> str:
    """The on-disk split a requested split is read from under ``protocol``."""
    if protocol == Protocol.three_way:
        return "all"
    if protocol == Protocol.official:
        return Split.train if split == Split.reference else split
    return Split.test if split == Split.test else Split.train


_TV_DOWNLOAD = ("Set dataset.download=true and torchvision downloads and extracts it under "
                "root (once; needs network access), or place the files there yourself.")

LOADERS: dict[str, Loader] = {s.name: s for s in [
    Loader("cifar10", _open_cifar(tvd.CIFAR10),
         layout="cifar-10-batches-py/\n  data_batch_1 ... data_batch_5\n  test_batch\n"
                "  batches.meta",
         how_to_get=_TV_DOWNLOAD + " The files are the 'CIFAR-10 python version' archive "
                    "(cifar-10-python.tar.gz) from the dataset's official page.",
         required={"train": ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta"],
                   "test": ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"]}),
    Loader("cifar100", _open_cifar(tvd.CIFAR100),
         layout="cifar-100-python/\n  train\n  test\n  meta",
         how_to_get=_TV_DOWNLOAD + " The files are the 'CIFAR-100 python version' archive "
                    "(cifar-100-python.tar.gz) from the dataset's official page.",
         required={"train": ["cifar-100-python/train", "cifar-100-python/meta"],
                   "test": ["cifar-100-python/test", "cifar-100-python/meta"]}),
    Loader("mnist", _open_mnist,
         layout="MNIST/raw/\n  train-images-idx3-ubyte\n  train-labels-idx1-ubyte\n"
                "  t10k-images-idx3-ubyte\n  t10k-labels-idx1-ubyte",
         how_to_get=_TV_DOWNLOAD + " (the four idx files, gunzipped).",
         required={"train": ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte"],
                   "test": ["MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]}),
    Loader("svhn", _open_svhn,
         layout="svhn/\n  train_32x32.mat\n  test_32x32.mat",
         how_to_get=_TV_DOWNLOAD + " The files are the 'Format 2: cropped digits' .mat files "
                    "from the dataset's official page (extra_32x32.mat is not used). Note "
                    "the svhn/ sub-folder: it is torchvision's SVHN root.",
         required={"train": ["svhn/train_32x32.mat"], "test": ["svhn/test_32x32.mat"]}),
    Loader("gtsrb", _open_gtsrb,
         layout="gtsrb/\n  GTSRB/Training/00000/*.ppm ... GTSRB/Training/00042/*.ppm\n"
                "  GTSRB/Final_Test/Images/*.ppm\n  GT-final_test.csv",
         how_to_get=_TV_DOWNLOAD + " (GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip "
                    "and GTSRB_Final_Test_GT.zip from the benchmark's official page).",
         required={"train": ["gtsrb/GTSRB/Training"],
                   "test": ["gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"]}),
    Loader("dtd", _open_dtd,
         layout="dtd/dtd/\n  images/<class>/<class>_NNNN.jpg\n  labels/train1.txt\n"
                "  labels/test1.txt",
         how_to_get=_TV_DOWNLOAD + " (dtd-r1.0.1.tar.gz from the dataset's official page, "
                    "extracted into root/dtd/).",
         required={"train": ["dtd/dtd/images", "dtd/dtd/labels/train1.txt"],
                   "test": ["dtd/dtd/images", "dtd/dtd/labels/test1.txt"]}),
    Loader("eurosat", _open_eurosat,
         layout="eurosat/2750/\n  AnnualCrop/*.jpg\n  Forest/*.jpg\n  ...\n  SeaLake/*.jpg",
         how_to_get=_TV_DOWNLOAD + " (the RGB EuroSAT.zip, extracted into root/eurosat/).",
         required={"all": ["eurosat/2750"]}),
    Loader("sun397", _open_sun397,
         layout="SUN397/\n  ClassName.txt\n  a/abbey/sun_*.jpg\n"
                "  a/apartment_building/outdoor/sun_*.jpg\n  ...",
         how_to_get="Automatic download is not available (the original archive host is "
                    "unreliable, so dataset.download=true is not attempted). Download "
                    "SUN397.tar.gz (about 37 GB) from the dataset's official page (the SUN "
                    "database project) and extract it in root, so that "
                    "root/SUN397/ClassName.txt exists.",
         required={"all": ["SUN397/ClassName.txt"]}),
    Loader("stanford_cars", _open_cars,
         layout="stanford_cars/\n  devkit/cars_meta.mat\n  devkit/cars_train_annos.mat\n"
                "  cars_train/*.jpg\n  cars_test_annos_withlabels.mat\n  cars_test/*.jpg",
         how_to_get="Automatic download is not available: the original download location "
                    "is gone and torchvision can no longer download Stanford Cars "
                    "(dataset.download=true does not help). Get the train and test images, "
                    "the devkit and cars_test_annos_withlabels.mat from a maintained copy of "
                    "the dataset (community mirrors on the usual dataset hubs carry the "
                    "original files) and arrange them as above.",
         required={"train": ["stanford_cars/devkit/cars_meta.mat",
                             "stanford_cars/devkit/cars_train_annos.mat", "stanford_cars/cars_train"],
                   "test": ["stanford_cars/devkit/cars_meta.mat",
                            "stanford_cars/cars_test_annos_withlabels.mat", "stanford_cars/cars_test"]}),
    Loader("resisc45", _open_resisc45,
         layout="NWPU-RESISC45/<class>/<class>_NNN.jpg   (e.g. NWPU-RESISC45/sea_ice/sea_ice_042.jpg)\n"
                "resisc45-train.txt\nresisc45-val.txt\nresisc45-test.txt",
         how_to_get="Automatic download is not available. Download NWPU-RESISC45 from the "
                    "dataset's official page (it ships as NWPU-RESISC45.rar) and extract it in "
                    "root. The split lists resisc45-{train,val,test}.txt (one file name per "
                    "line; 18,900 / 6,300 / 6,300 images) are the standard ones published by "
                    "the TorchGeo project (torchgeo.datasets.RESISC45 downloads them) and "
                    "used by the task-vectors / WiSE-FT code; put the three files in root.",
         required={"train": ["NWPU-RESISC45", "resisc45-train.txt"],
                   "val": ["NWPU-RESISC45", "resisc45-val.txt"],
                   "test": ["NWPU-RESISC45", "resisc45-test.txt"]}),
    Loader("imagenet", _open_imagenet,
         layout="imagenet/\n  meta.bin             (or ILSVRC2012_devkit_t12.tar.gz)\n"
                "  train/<wnid>/*.JPEG   (or ILSVRC2012_img_train.tar)\n"
                "  val/<wnid>/*.JPEG     (or ILSVRC2012_img_val.tar)",
         how_to_get="Automatic download is not available (ImageNet needs a registered "
                    "account). Download ILSVRC2012_devkit_t12.tar.gz, ILSVRC2012_img_train.tar "
                    "and ILSVRC2012_img_val.tar from the official ImageNet page "
                    "(image-net.org) into root/imagenet/; torchvision unpacks them into "
                    "meta.bin, train/ and val/ on first use (once; slow, ~150 GB). An "
                    "already unpacked copy with meta.bin works as is. The official val set "
                    "is our test split; val is carved from train.",
         required={"train": [("imagenet/meta.bin", "imagenet/ILSVRC2012_devkit_t12.tar.gz"),
                             ("imagenet/train", "imagenet/ILSVRC2012_img_train.tar")],
                   "test": [("imagenet/meta.bin", "imagenet/ILSVRC2012_devkit_t12.tar.gz"),
                            ("imagenet/val", "imagenet/ILSVRC2012_img_val.tar")]}),
]}


# ------------------------------------------------------------------------------ build

def _missing(root: Path, required: Sequence[str | tuple[str, ...]]) -> list[str]:
    out = []
    for req in required:
        options = (req,) if isinstance(req, str) else tuple(req)
        if not any((root / p).exists() for p in options):
            out.append(options[0] + "".join(f" (or {o})" for o in options[1:]))
    return out


def check_available(cfg, root: Path, split: str) -> list[str]:
    """Paths (relative to root) the requested split of the dataset ``cfg`` needs but that do not exist."""
    return _missing(root, LOADERS[cfg.name].required[official_split(spec_of("dataset", cfg).protocol, split)])


_OPENED: dict[tuple[str, str, str], Source] = {}
_MAX_OPENED = 4


def clear_cache() -> None:
    """Forget opened sources (after changing data on disk within one process)."""
    _OPENED.clear()


def _open(spec: Loader, root: Path, official: str, download: bool, can_download: bool) -> Source:
    """Open an official split, turning every way of failing into :class:`DatasetNotFound`.

    Opened sources are cached per process (train, val and reference all read the official
    train split; listing ImageNet's 1.28M files once is enough).
    """
    key = (spec.name, str(root), official)
    if key in _OPENED:
        return _OPENED[key]
    src = _open_uncached(spec, root, official, download, can_download)
    while len(_OPENED) >= _MAX_OPENED:
        _OPENED.pop(next(iter(_OPENED)))
    _OPENED[key] = src
    return src


def _open_uncached(spec: Loader, root: Path, official: str, download: bool, can_download: bool) -> Source:
    def not_found(missing=(), problem=None):
        return DatasetNotFound(spec.name, root, spec.layout, spec.how_to_get, missing, problem)

    missing = _missing(root, spec.required[official])
    if missing and not (download and can_download):
        problem = None
        if download:
            problem = (f"dataset {spec.name!r}: data not found under root {str(root)!r} and "
                       f"dataset.download=true cannot fetch it automatically.")
        raise not_found(missing, problem)
    downloading = bool(missing)           # only reached with download=true on a downloadable set
    before = _entries(root) if downloading else set()
    root_existed = root.exists()
    try:
        return spec.open(root, official, download)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
        if downloading:                   # leave no partial archive / half-extracted folder
            _remove_new_entries(root, before, root_existed)
        what = "could not be downloaded" if missing else "is incomplete or unreadable"
        reason = re.sub(r"\w+://\S+", "<url>", str(e))      # keep messages free of hostnames
        raise not_found(missing, f"dataset {spec.name!r}: the data under root {str(root)!r} "
                                 f"{what}: {type(e).__name__}: {reason}") from e


def _entries(root: Path) -> set[str]:
    return {e.name for e in os.scandir(root)} if root.is_dir() else set()


def _remove_new_entries(root: Path, before: set[str], root_existed: bool) -> None:
    """Undo a failed download: drop what it created at the top of ``root``."""
    for name in _entries(root) - before:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not root_existed and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _params(cfg) -> Mapping:
    return getattr(cfg, "params", None) or {}


def _split_file(cfg, key: str) -> Path:
    splits_dir = _params(cfg).get("splits_dir")
    return split_path(Path(str(cfg.root)).expanduser(), key, splits_dir)


def _make(name: str, split: str, src: Source, positions: Sequence[int] | None,
          templates: Sequence[str], transform, root: Path) -> ClassificationSplit:
    """Split over canonical ``positions`` of ``src`` (``None``: all of it)."""
    canon = src.canonical()
    base_idx = canon if positions is None else [canon[k] for k in positions]
    return ClassificationSplit(src.base, base_idx, [src.labels[j] for j in base_idx],
                               src.classnames, templates, name, split, transform,
                               load=_LoadRGB(src.labels), provenance=src.provenance(root),
                               root=root)


def build(cfg, split: str, transform=None) -> ClassificationSplit:
    """Builder of every dataset in :data:`LOADERS` (``spec.builder: residual_exp.data.vision.build``):
    the official split ``cfg.spec.protocol`` reads ``split`` from, carved when the protocol says so."""
    loader, spec = LOADERS[cfg.name], spec_of("dataset", cfg)
    root = Path(str(cfg.root)).expanduser().absolute()
    download = bool(getattr(cfg, "download", False))
    templates = md.TEMPLATES[cfg.name]
    official = official_split(spec.protocol, split)
    src = _open(loader, root, official, download, bool(spec.can_download))
    if spec.protocol == Protocol.official or official == Split.test:
        return _make(cfg.name, split, src, None, templates, transform, root)
    fractions = {"val": spec.val_fraction}
    if spec.protocol == Protocol.three_way:
        fractions["test"] = spec.test_fraction
    canon_targets = [src.labels[j] for j in src.canonical()]
    parts = load_or_create(_split_file(cfg, cfg.name), dataset=cfg.name,
                           targets=canon_targets, fractions=fractions)
    return _make(cfg.name, split, src, parts[Split.train if split == Split.reference else split],
                 templates, transform, root)
