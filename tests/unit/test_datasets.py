"""Every registered vision dataset, loaded from a tiny fixture in its real on-disk layout.

Each ``write_*`` function below writes the files the torchvision class (or our loader)
reads, in the exact layout and format of the real download, with a handful of 8x8 images.

CIFAR and SVHN: torchvision verifies the MD5 of every file against the official archive,
which no fixture can match.  Those tests replace ``check_integrity`` in the torchvision
module (``torchvision.datasets.cifar`` / ``.svhn``) by a plain "file exists" check, so the
real torchvision parsing code still runs on real-format files; production code is
untouched and keeps the checksum verification.
"""
from __future__ import annotations

import csv
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import ToTensor

from residual_exp.catalog import Split, options, spec
from residual_exp.config import DatasetConfig
from residual_exp.data import metadata, registry, vision
from residual_exp.data.errors import BadImageError
from residual_exp.data.splits import SPLIT_DIRNAME

_REPO = Path(__file__).resolve().parents[2]
CONF = next((p for p in (_REPO / "residual_exp" / "conf" / "dataset", _REPO / "conf" / "dataset")
             if p.is_dir()), _REPO / "residual_exp" / "conf" / "dataset")
NAMES = ["cifar10", "cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45",
         "stanford_cars", "sun397", "svhn", "imagenet", "image_folder"]
SIDE = 8


@pytest.fixture(autouse=True)
def _project_root(tmp_path, monkeypatch):
    """image_folder stores its splits with the project's outputs (paths.root_dir), beside the data here."""
    monkeypatch.setenv("RESIDUAL_EXP_ROOT", str(tmp_path.parent / f"{tmp_path.name}-project"))


def cfg(name, root, **params):
    return OmegaConf.create({"name": name, "root": str(root), "download": False,
                             "batch_size": 4, "num_workers": 0, "params": params})


def image(path: Path, label: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIDE, SIDE), (40 * label % 256, 80, 120)).save(path)


def pixels(n, side=SIDE):                                       # [N, side, side, 3] uint8
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _fresh_cache():
    vision.clear_cache()
    yield
    vision.clear_cache()


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)
    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_svhn, "check_integrity", exists)


# -------------------------------------------------------------------------- fixtures
# Each returns (images per class in the train source (or whole set), test size or None,
# the labels present, {label: expected class name}).

def write_cifar10(root: Path):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(fname, n):
        x = pixels(n, 32).transpose(0, 3, 1, 2).reshape(n, -1)  # [N, 3*32*32], C-H-W order
        with open(d / fname, "wb") as f:
            pickle.dump({"data": x, "labels": [i % 10 for i in range(n)]}, f)
    for b in range(1, 6):
        batch(f"data_batch_{b}", 10)                            # 5 per class in total
    batch("test_batch", 20)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return 5, 20, range(10), {0: "airplane", 9: "truck"}


def write_cifar100(root: Path):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    names = ["apple", "aquarium_fish", "baby", "bear", "beaver"] + [f"class_{i}" for i in range(5, 100)]

    def part(fname, n):
        x = pixels(n, 32).transpose(0, 3, 1, 2).reshape(n, -1)  # [N, 3*32*32]
        with open(d / fname, "wb") as f:
            pickle.dump({"data": x, "fine_labels": [i % 5 for i in range(n)],
                         "coarse_labels": [0] * n}, f)
    part("train", 50)                                           # 10 per class, classes 0..4
    part("test", 15)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, f)
    return 10, 15, range(5), {1: "aquarium_fish", 4: "beaver"}      # official names: underscores kept


def _idx(path: Path, arr: np.ndarray):
    """MNIST idx format: big-endian magic (0x08 = uint8, ndim), dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + arr.ndim))
        f.write(struct.pack(f">{arr.ndim}I", *arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def write_mnist(root: Path):
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", 40), ("t10k", 12)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", pixels(n)[..., 0])
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 4)
    return 10, 12, range(4), {0: "0", 3: "3"}


def write_svhn(root: Path):
    import scipy.io as sio

    d = root / "svhn"
    d.mkdir(parents=True)
    for fname, n in (("train_32x32.mat", 15), ("test_32x32.mat", 6)):
        # .mat labels are 1..10, 10 meaning digit 0
        y = np.array([[9, 10, 1][i % 3] for i in range(n)], dtype=np.uint8)[:, None]   # [N, 1]
        sio.savemat(d / fname, {"X": pixels(n).transpose(1, 2, 3, 0), "y": y})      # X: [H, W, 3, N]
    return 5, 6, (0, 1, 9), {9: "9", 0: "0", 1: "1"}


GTSRB_IDS = (0, 14, 42)


def write_gtsrb(root: Path):
    base = root / "gtsrb"
    for cid in GTSRB_IDS:
        for k in range(10):
            image(base / "GTSRB" / "Training" / f"{cid:05d}" / f"{k:05d}_00000.ppm", cid)
    rows = []
    for k in range(6):
        fname = f"{k:05d}.ppm"
        image(base / "GTSRB" / "Final_Test" / "Images" / fname)
        rows.append({"Filename": fname, "Width": SIDE, "Height": SIDE, "Roi.X1": 0, "Roi.Y1": 0,
                     "Roi.X2": SIDE, "Roi.Y2": SIDE, "ClassId": GTSRB_IDS[k % 3]})
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        w.writeheader()
        w.writerows(rows)
    return 10, 6, GTSRB_IDS, {0: metadata.GTSRB[0], 14: "stop", 42: metadata.GTSRB[42]}


def write_dtd(root: Path):
    d = root / "dtd" / "dtd"
    classes = ["banded", "polka-dotted", "zigzagged"]
    lists = {"train1.txt": [], "val1.txt": [], "test1.txt": []}
    k = 0
    for c in classes:
        for fname, n in (("train1.txt", 5), ("val1.txt", 2), ("test1.txt", 3)):
            for _ in range(n):
                k += 1
                image(d / "images" / c / f"{c}_{k:04d}.jpg")
                lists[fname].append(f"{c}/{c}_{k:04d}.jpg")
    (d / "labels").mkdir()
    for fname, lines in lists.items():
        (d / "labels" / fname).write_text("\n".join(lines) + "\n")
    return 5, 9, range(3), {0: "banded", 1: "polka-dotted", 2: "zigzagged"}


def write_eurosat(root: Path):
    for c in ("AnnualCrop", "HerbaceousVegetation", "SeaLake"):
        for k in range(10):
            image(root / "eurosat" / "2750" / c / f"{c}_{k + 1}.jpg")
    return 10, None, range(3), {0: "annual crop land", 1: "brushland or shrubland", 2: "lake or sea"}


def write_stanford_cars(root: Path):
    import scipy.io as sio

    base = root / "stanford_cars"
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "smart fortwo Convertible 2012"]
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})

    def annos(path: Path, folder: str, n: int):
        a = np.zeros((1, n), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
                                    ("bbox_y2", "O"), ("class", "O"), ("fname", "O")])
        for i in range(n):
            fname = f"{i + 1:05d}.jpg"
            image(base / folder / fname)
            a[0, i] = (np.array([[0]]), np.array([[0]]), np.array([[SIDE]]), np.array([[SIDE]]),
                       np.array([[i % 3 + 1]], dtype=np.uint8), np.array([fname]))   # 1-based
        sio.savemat(path, {"annotations": a})
    annos(base / "devkit" / "cars_train_annos.mat", "cars_train", 15)
    annos(base / "cars_test_annos_withlabels.mat", "cars_test", 6)
    return 5, 6, range(3), {0: "AM General Hummer SUV 2000", 2: "smart fortwo Convertible 2012"}


def write_sun397(root: Path):
    d = root / "SUN397"
    classes = ["a/abbey", "a/apartment_building/outdoor", "c/childs_room"]
    d.mkdir(parents=True)
    (d / "ClassName.txt").write_text("".join(f"/{c}\n" for c in classes))
    for c in classes:
        for k in range(10):
            image(d / c / f"sun_{abs(hash(c)) % 1000:03d}{k:04d}.jpg")
    return 10, None, range(3), {0: "abbey", 1: "apartment building outdoor", 2: "childs room"}


def write_imagenet(root: Path):
    from timm.data import ImageNetInfo

    d = root / "imagenet"
    wnids = ImageNetInfo().label_names()                       # the 1000 ILSVRC2012 wnids
    d.mkdir(parents=True)
    # meta.bin as torchvision's parse_devkit_archive writes it: (wnid -> names, val wnids)
    torch.save(({w: (f"name of {w}",) for w in wnids}, []), d / "meta.bin")
    chosen = {0: wnids[0], 1: wnids[1], 999: wnids[999]}
    for label, w in chosen.items():
        for k in range(5):
            image(d / "train" / w / f"{w}_{k}.JPEG")
        for k in range(2):
            image(d / "val" / w / f"ILSVRC2012_val_{label:05d}{k}.JPEG")
    return 5, 6, (0, 1, 999), {0: "tench", 1: "goldfish", 999: "toilet paper"}


RESISC = ("airplane", "sea_ice", "thermal_power_station")


def write_resisc45(root: Path):
    lists = {"train": [], "val": [], "test": []}
    for c in RESISC:
        for k in range(1, 11):
            fname = f"{c}_{k:03d}.jpg"
            image(root / "NWPU-RESISC45" / c / fname)
            lists["train" if k <= 6 else "val" if k <= 8 else "test"].append(fname)
    for split, names in lists.items():
        (root / f"resisc45-{split}.txt").write_text("\n".join(names) + "\n")
    return 6, 6, (0, 35, 43), {0: "airplane", 35: "sea ice", 43: "thermal power station"}


def write_image_folder(root: Path, with_val: bool = False):
    classes = ["golden_retriever", "tabby_cat"]
    for c in classes:
        for k in range(10):
            image(root / "train" / c / f"{k}.png")
        for k in range(3):
            image(root / "test" / c / f"{k}.jpg")
        if with_val:
            for k in range(2):
                image(root / "val" / c / f"{k}.jpg")
    return 10, 6, range(2), {0: "golden retriever", 1: "tabby cat"}


WRITERS = {n: globals()[f"write_{n}"] for n in NAMES}
N_CLASSES = {"cifar10": 10, "cifar100": 100, "dtd": 3, "eurosat": 3, "gtsrb": 43, "mnist": 10,
             "resisc45": 45, "stanford_cars": 3, "sun397": 3, "svhn": 10, "imagenet": 1000,
             "image_folder": 2}
# val fraction carved from the train source (three-way sets: 10% val, 10% test)
VAL_FRACTION = {"cifar10": .1, "cifar100": .1, "mnist": .1, "gtsrb": .1, "svhn": .2, "dtd": .2,
                "stanford_cars": .2, "imagenet": .2, "eurosat": .1, "sun397": .1,
                "image_folder": .1}


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", NAMES)
def test_dataset_loads_from_fixture(name, tmp_path, no_md5):
    per_class, n_test, labels, expected_names = WRITERS[name](tmp_path)
    classes = set(labels)
    c = cfg(name, tmp_path)
    parts = {s: registry.build_split(c, s, ToTensor()) for s in list(Split)}

    train, val, test, ref = (parts[s] for s in ("train", "val", "test", "reference"))
    assert ref.targets == train.targets and ref.indices == train.indices
    for split in parts.values():
        assert split.num_classes == N_CLASSES[name]
        assert split.templates == list(metadata.TEMPLATES[name]) and "{}" in split.templates[0]
        for label, cname in expected_names.items():
            assert split.classnames[label] == cname
        assert set(split.targets) == classes
    # image tensors with three channels, labels as stored
    x, y = test[len(test) - 1]
    assert isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[0] == 3
    assert y == test.targets[-1]
    x, y = val[0]
    assert x.shape[0] == 3 and y == val.targets[0]

    counts = {s: Counter(parts[s].targets) for s in ("train", "val", "test")}
    if name == "resisc45":                                     # official lists 6/2/2 per class
        assert [len(train), len(val), len(test)] == [18, 6, 6]
        return
    frac = VAL_FRACTION[name]
    for c_ in classes:
        assert abs(counts["val"][c_] - frac * per_class) <= 1
    if n_test is None:                                          # 80/10/10 of the whole set
        assert len(train) + len(val) + len(test) == per_class * len(classes)
        for c_ in classes:
            assert abs(counts["test"][c_] - 0.1 * per_class) <= 1
    else:                                                       # val carved from train
        assert len(train) + len(val) == per_class * len(classes)
        assert len(test) == n_test
        assert not set(train.indices) & set(val.indices)
    # the split is stored next to the data (a user's folder: with the project's outputs, keyed by the
    # folder's fingerprint) and reused by a second call
    if name == "image_folder":
        assert not (tmp_path / SPLIT_DIRNAME).exists()
        stored, = (tmp_path.parent / f"{tmp_path.name}-project" / "outputs" / "splits").glob("image_folder-*.json")
    else:
        stored = tmp_path / SPLIT_DIRNAME / f"{name}.json"
    assert stored.is_file()
    vision.clear_cache()
    again = registry.build_split(c, "val")
    assert again.indices == val.indices and again.targets == val.targets


def test_image_folder_with_val(tmp_path):
    write_image_folder(tmp_path, with_val=True)
    c = cfg("image_folder", tmp_path, templates=["a {} in my house."])
    sizes = {s: len(registry.build_split(c, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 20, "val": 4, "test": 6}
    assert registry.build_split(c, "train").templates == ["a {} in my house."]
    assert not (tmp_path / SPLIT_DIRNAME).exists()              # official val: nothing stored


def test_gtsrb_labels_follow_class_ids_not_folder_positions(tmp_path):
    write_gtsrb(tmp_path)
    train = registry.build_split(cfg("gtsrb", tmp_path), "train")
    assert set(train.targets) == set(GTSRB_IDS)
    assert train.classnames[14] == "stop"


@pytest.mark.parametrize("name", NAMES)
def test_missing_data_is_reported_and_nothing_written(name, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "test"):
        with pytest.raises(FileNotFoundError) as e:
            registry.build_split(cfg(name, root), split)
        msg = str(e.value)
        assert isinstance(e.value, vision.DatasetNotFound)
        assert name in msg and str(root) in msg
        assert "expected layout under root" in msg and "how to get it" in msg
    assert list(root.iterdir()) == []                           # no split file, no folders


def test_missing_message_names_layout_and_download(tmp_path):
    msg = str(pytest.raises(FileNotFoundError, registry.build_split,
                            cfg("cifar10", tmp_path), "train").value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "dataset.download=true" in msg
    for manual in ("stanford_cars", "sun397"):
        c = cfg(manual, tmp_path)
        c.download = True                                       # asks, but cannot be fetched
        msg = str(pytest.raises(FileNotFoundError, registry.build_split, c, "train").value)
        assert "not available" in msg and "cannot fetch it automatically" in msg
    assert list(tmp_path.iterdir()) == []


def test_corrupt_data_is_reported_without_writing_a_split(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in ("data_batch_1", "batches.meta"):                  # present but wrong checksum
        (d / f).write_bytes(b"not a pickle")
    with pytest.raises(FileNotFoundError, match="incomplete or unreadable"):
        registry.build_split(cfg("cifar10", tmp_path), "train")
    assert not (tmp_path / SPLIT_DIRNAME).exists()


def test_changed_data_is_detected(tmp_path):
    write_eurosat(tmp_path)
    registry.build_split(cfg("eurosat", tmp_path), "train")
    image(tmp_path / "eurosat" / "2750" / "Forest" / "Forest_1.jpg")
    vision.clear_cache()
    with pytest.raises(RuntimeError, match="30 items, but the data under root now has 31"):
        registry.build_split(cfg("eurosat", tmp_path), "val")


@pytest.mark.parametrize("name", NAMES)
def test_dataset_yaml_matches_schema_and_registry(name):
    node = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    assert node.name == name and name in options("dataset")
    assert OmegaConf.to_container(node)["root"] == "${paths.data_dir}"
    assert node.download is False


def test_metadata_sources_and_templates():
    assert all(spec("dataset", n).classnames and spec("dataset", n).templates for n in NAMES)   # sources cited
    for name in NAMES:
        assert all(t.count("{}") == 1 for t in metadata.TEMPLATES[name]), name
    assert metadata.TEMPLATES["gtsrb"][0] == "a zoomed in photo of a {} traffic sign."     # official: no quotes
    assert metadata.TEMPLATES["resisc45"][0] == "satellite imagery of {}."
    assert metadata.TEMPLATES["eurosat"][0] == "a centered satellite photo of {}."
    assert metadata.TEMPLATES["mnist"] == metadata.TEMPLATES["svhn"] == ('a photo of the number: "{}".',)
    assert len(metadata.TEMPLATES["cifar100"]) == 18 and len(metadata.TEMPLATES["imagenet"]) == 80
    assert metadata.clean_classname("apartment_building/outdoor") == "apartment building outdoor"


def test_inspect_data(tmp_path, capsys):
    from residual_exp.tasks.inspect_data import inspect_data

    write_dtd(tmp_path)
    assert inspect_data(OmegaConf.create({"dataset": cfg("dtd", tmp_path)})) == 0
    out = capsys.readouterr().out
    assert "train" in out and "polka-dotted" in out and "a photo of a {} texture." in out
    assert inspect_data(OmegaConf.create({"dataset": cfg("dtd", tmp_path / "nope")})) == 1
    out = capsys.readouterr().out
    assert "expected layout under root" in out and "dtd/dtd/" in out


def test_inspect_data_through_the_composed_config(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from residual_exp.config import register_configs
    from residual_exp.tasks.inspect_data import inspect_data

    register_configs()
    write_resisc45(tmp_path)
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        c = compose("config", overrides=["task=inspect_data", "dataset=resisc45",
                                         f"dataset.root={tmp_path}"])
    assert inspect_data(c) == 0
    out = capsys.readouterr().out
    assert "airplane, airport" in out and "satellite imagery of {}." in out
    assert "18 images" in out


FILE_DATASETS = ["dtd", "eurosat", "gtsrb", "resisc45", "stanford_cars", "sun397", "imagenet",
                 "image_folder"]


@pytest.mark.parametrize("name", NAMES)
def test_every_dataset_has_a_stable_fingerprint(name, tmp_path, no_md5):
    import json

    WRITERS[name](tmp_path)
    c = cfg(name, tmp_path)
    fps = {s: registry.build_split(c, s).fingerprint() for s in list(Split)}
    vision.clear_cache()
    again = {s: registry.build_split(c, s).fingerprint() for s in list(Split)}
    assert fps == again and json.loads(json.dumps(fps)) == fps
    assert fps["reference"] == fps["train"]
    assert len({fps[s]["sha256"] for s in ("train", "val", "test")}) == 3
    kind = "files" if name in FILE_DATASETS else "source_files"
    assert {fp["kind"] for fp in fps.values()} == {kind}


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_file_paths_are_the_files_items_are_read_from(name, tmp_path, no_md5):
    """Corrupting the file recorded for item k breaks exactly item k, naming the file."""
    WRITERS[name](tmp_path)
    test = registry.build_split(cfg(name, tmp_path), "test", ToTensor())
    paths = test.file_paths()
    assert len(paths) == len(test) == len(set(paths))
    k = len(test) // 2
    Path(paths[k]).write_bytes(b"garbage")
    with pytest.raises(BadImageError) as e:
        test[k]
    assert paths[k] in str(e.value) and f"dataset {name!r}, split 'test'" in str(e.value)
    for i in range(len(test)):
        if i != k:
            test[i]
