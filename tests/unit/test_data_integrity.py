"""Data integrity: fingerprints, bad images (named, or skipped and counted), split guards,
``inspect_data`` with ``task.verify=true``.

Fixtures are written in the real on-disk formats (class-per-folder JPEG/PNG trees, the
CIFAR-10 python pickles), as in ``test_datasets.py``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from residual_exp.data import integrity, registry, shapes, vision
from residual_exp.data.errors import (BadImageError, ClassesMissingFromTrainError, DatasetError,
                                      EmptySplitError, TooFewClassesError)
from residual_exp.data.splits import SPLIT_DIRNAME, SplitMismatchError

SIDE = 16


def cfg(name, root, skip=False, content=False, **params):
    return OmegaConf.create({"name": name, "root": str(root), "download": False,
                             "batch_size": 4, "num_workers": 0, "skip_bad_images": skip,
                             "content_hash": content, "params": params})


def jpeg(path: Path, seed: int = 0):
    """A real JPEG with noisy pixels (so truncating it cuts into the entropy-coded data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(px).save(path, format="JPEG", quality=95)


def image_folder(root: Path, classes=("golden_retriever", "tabby_cat"), n_train=10, n_test=3,
                 val=None):
    for c_i, c in enumerate(classes):
        for k in range(n_train):
            jpeg(root / "train" / c / f"{k}.jpg", 100 * c_i + k)
        for k in range(n_test):
            jpeg(root / "test" / c / f"{k}.jpg", 1000 + 100 * c_i + k)
    for c, n in (val or {}).items():
        for k in range(n):
            jpeg(root / "val" / c / f"{k}.jpg", 5000 + k)


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rewrite_in_place(path: Path, seed: int):
    """Same name, different bytes, and a clearly different mtime."""
    st = path.stat()
    jpeg(path, seed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9 * 3600))


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDUAL_EXP_ROOT", str(project(tmp_path)))   # where image_folder splits / scans go
    vision.clear_cache()
    yield
    vision.clear_cache()


def project(tmp_path) -> Path:
    """The project folder (paths.root_dir) of a test, beside its data folder ``tmp_path``."""
    return tmp_path.parent / f"{tmp_path.name}-project"


def project_splits(tmp_path) -> Path:
    """Where a user's folder's splits and bad-image scans are stored (never in the data folder)."""
    return project(tmp_path) / "outputs" / "splits"


def build(c, split, **kw):
    vision.clear_cache()                   # a fresh open, as a new process would do
    return registry.build_split(c, split, **kw)


# ------------------------------------------------------------------ fingerprints

def test_fingerprint_files_stable_and_changes_on_rewrite(tmp_path, monkeypatch):
    image_folder(tmp_path)
    c = cfg("image_folder", tmp_path)
    train = build(c, "train")
    fp = train.fingerprint()
    assert fp["kind"] == "files" and fp["n_files"] == len(train) == 18
    assert fp["content_hash"] is False and len(fp["sha256"]) == 64
    assert json.loads(json.dumps(fp)) == fp                          # JSON-serialisable
    assert integrity.fingerprint(train) == fp

    # memoised per object: a second call does not stat the files again
    def boom(*a, **k):
        raise AssertionError("fingerprint recomputed")
    monkeypatch.setattr(integrity, "file_entries", boom)
    assert train.fingerprint() == fp
    monkeypatch.undo()

    # touching nothing: a new split object has the same fingerprint
    assert build(c, "train").fingerprint() == fp
    # the other splits differ
    assert build(c, "val").fingerprint()["sha256"] != fp["sha256"]
    assert build(c, "test").fingerprint()["sha256"] != fp["sha256"]

    # rewriting one image in place (same name, same count) gives a new fingerprint
    victim = Path(train.file_paths()[3])
    rewrite_in_place(victim, seed=777)
    fp2 = build(c, "train").fingerprint()
    assert fp2["n_files"] == fp["n_files"] and fp2["sha256"] != fp["sha256"]


def test_fingerprint_content_hash(tmp_path):
    image_folder(tmp_path)
    stat_c, content_c = cfg("image_folder", tmp_path), cfg("image_folder", tmp_path, content=True)
    fp_stat = build(stat_c, "test").fingerprint()
    fp_content = build(content_c, "test").fingerprint()
    assert fp_content["content_hash"] is True and fp_content["sha256"] != fp_stat["sha256"]
    assert build(content_c, "test").fingerprint() == fp_content      # stable

    victim = tmp_path / "test" / "tabby_cat" / "1.jpg"
    st = victim.stat()
    # new mtime, same bytes: the content fingerprint stays, the stat one changes
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert build(content_c, "test").fingerprint() == fp_content
    assert build(stat_c, "test").fingerprint() != fp_stat
    # new bytes of the same size, old mtime restored: only content hashing sees it
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build(stat_c, "test").fingerprint() == fp_stat
    assert build(content_c, "test").fingerprint()["sha256"] != fp_content["sha256"]


def write_cifar10(root: Path):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for fname, n in [(f"data_batch_{b}", 10) for b in range(1, 6)] + [("test_batch", 20)]:
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(d / fname, "wb") as f:
            pickle.dump({"data": x, "labels": [i % 10 for i in range(n)]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_fingerprint_source_files(tmp_path, no_md5):
    write_cifar10(tmp_path)
    c = cfg("cifar10", tmp_path)
    train = build(c, "train")
    fp = train.fingerprint()
    assert fp["kind"] == "source_files" and fp["n_files"] == 6 and fp["n_items"] == len(train)
    assert build(c, "train").fingerprint() == fp
    assert build(c, "val").fingerprint()["sha256"] != fp["sha256"]   # same files, other items
    test_fp = build(c, "test").fingerprint()
    assert test_fp["n_files"] == 2                                    # test_batch + batches.meta

    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    st = batch.stat()
    os.utime(batch, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert build(c, "train").fingerprint() != fp
    assert build(c, "test").fingerprint() == test_fp                  # test does not read it
    content = build(cfg("cifar10", tmp_path, content=True), "train").fingerprint()
    assert content["content_hash"] is True and content["sha256"] != fp["sha256"]


def test_fingerprint_synthetic_and_subset():
    c = cfg("shapes_color", "data", n_train=40, n_val=20, n_test=20, n_reference=20)
    a = registry.build_split(c, "train")
    fp = a.fingerprint()
    assert fp["kind"] == "synthetic" and fp["generator"] == "shapes"
    assert fp["version"] == shapes.GENERATOR_VERSION and fp["n_items"] == 40
    assert json.loads(json.dumps(fp)) == fp
    assert registry.build_split(c, "train").fingerprint() == fp
    other_seed = cfg("shapes_color", "data", n_train=40, n_val=20, n_test=20, seed=1)
    assert registry.build_split(other_seed, "train").fingerprint() != fp
    other_attr = cfg("shapes_shape", "data", n_train=40, n_val=20, n_test=20)
    assert registry.build_split(other_attr, "train").fingerprint() != fp
    sub = torch.utils.data.Subset(a, [1, 5, 7])
    fs = integrity.fingerprint(sub)
    assert fs["subset_of"] == fp["sha256"] and fs["sha256"] != fp["sha256"]
    assert integrity.fingerprint(torch.utils.data.Subset(a, [1, 5, 8]))["sha256"] != fs["sha256"]


def test_shapes_labels_without_rendering_match_generate():
    for split, n in (("train", 300), ("val", 7), ("test", 0)):
        _, attrs = shapes.generate(n, seed=3, split=split)
        fast = shapes.generate_labels(n, seed=3, split=split)
        for a in shapes.ATTRIBUTES:
            assert np.array_equal(fast[a], attrs[a]), (split, a)


def test_shapes_generator_is_frozen():
    """Pins generate()'s output: if this fails, the data changed — bump
    shapes.GENERATOR_VERSION (cache keys depend on it) and update the pinned values.
    Labels are pinned exactly (integer RNG draws); pixels by per-channel means, which do not
    depend on the last ulp of float32 maths on a given CPU."""
    images, attrs = shapes.generate(300, seed=0, split="train", image_size=32)
    h = hashlib.sha256()
    for a in shapes.ATTRIBUTES:
        h.update(attrs[a].astype("<i8").tobytes())
    assert shapes.GENERATOR_VERSION == 1
    assert h.hexdigest() == "fa905462e5a0eb286e9ca21eedd77caefc0e25a8c23fd984e6574713367125fe"
    means = images.reshape(-1, 3).astype(np.float64).mean(0)
    assert means == pytest.approx([77.8407, 76.7340, 75.9829], abs=0.01)


# ------------------------------------------------------------------- bad images

@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_bad_image_is_named(tmp_path, how):
    image_folder(tmp_path)
    victim = tmp_path / "test" / "tabby_cat" / "2.jpg"
    if how == "truncated":
        truncate(victim)
    elif how == "garbage":
        victim.write_bytes(b"\x00not an image at all\xff" * 10)
    else:
        victim.write_bytes(b"")
    test = registry.build_split(cfg("image_folder", tmp_path), "test")
    k = test.file_paths().index(str(victim))
    test[0]                                                          # good ones load
    with pytest.raises(BadImageError) as e:
        test[k]
    msg = str(e.value)
    assert isinstance(e.value, DatasetError)
    assert str(victim) in msg and "'image_folder'" in msg and "split 'test'" in msg
    assert "fix or delete the file" in msg.lower() and "dataset.skip_bad_images=true" in msg
    assert e.value.path == str(victim) and e.value.split == "test"
    if how == "truncated":
        assert "truncated" in msg.lower()
    if how == "empty":
        assert "empty file" in msg
    # survives a DataLoader worker (re-raised from one message argument)
    again = pickle.loads(pickle.dumps(e.value))
    assert isinstance(again, BadImageError) and str(victim) in str(again)


def test_truncated_images_are_never_loaded_silently(tmp_path, monkeypatch):
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    p = tmp_path / "x.jpg"
    jpeg(p)
    truncate(p)
    with pytest.raises(BadImageError, match="(?i)truncated"):
        integrity.decode_image(p)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetError, match="LOAD_TRUNCATED_IMAGES"):
        integrity.decode_image(p)


def test_skip_bad_images(tmp_path, monkeypatch, caplog):
    image_folder(tmp_path)
    plain = cfg("image_folder", tmp_path)
    before = {s: build(plain, s).file_paths() for s in ("train", "val", "test")}
    victim = before["train"][4]
    truncate(Path(victim))
    skip = cfg("image_folder", tmp_path, skip=True)

    with caplog.at_level(logging.WARNING):
        train = build(skip, "train")
    assert train.n_skipped == 1 and train.skipped == [victim]
    assert train.file_paths() == [p for p in before["train"] if p != victim]
    assert len(train.targets) == len(train) == len(before["train"]) - 1
    assert "skipped 1 unreadable image" in caplog.text and victim in caplog.text
    for i in range(len(train)):                                     # never yields a bad item
        train[i]
    # membership of every other image unchanged; other splits untouched
    val, test = build(skip, "val"), build(skip, "test")
    assert val.file_paths() == before["val"] and test.file_paths() == before["test"]
    assert val.n_skipped == test.n_skipped == 0
    # the fingerprint is of what the split yields
    assert train.fingerprint()["n_files"] == len(train)
    assert build(skip, "reference").file_paths() == train.file_paths()

    # the scan is stored next to the split files and not run again
    scans = sorted(project_splits(tmp_path).glob("image_folder.bad_images.*.json"))
    assert not (tmp_path / SPLIT_DIRNAME).exists()                   # nothing in the user's data folder
    records = [json.loads(p.read_text()) for p in scans]
    assert sorted(r["split"] for r in records) == ["test", "train", "val"]   # reference = train
    (bad,) = [r for r in records if r["bad"]]
    assert bad["split"] == "train" and bad["n_files"] == len(before["train"])
    assert [b["path"] for b in bad["bad"]] == [Path(victim).relative_to(tmp_path).as_posix()]
    assert not [p for p in project_splits(tmp_path).iterdir() if p.name.endswith(".tmp")]

    def boom(*a, **k):
        raise AssertionError("scanned again")
    monkeypatch.setattr(integrity, "scan_bad_files", boom)
    again = build(skip, "train")
    assert again.skipped == [victim] and again.file_paths() == train.file_paths()


def test_skip_bad_images_rescans_when_files_change(tmp_path):
    image_folder(tmp_path)
    skip = cfg("image_folder", tmp_path, skip=True)
    assert build(skip, "test").n_skipped == 0
    victim = tmp_path / "test" / "golden_retriever" / "0.jpg"
    victim.write_bytes(b"garbage")
    test = build(skip, "test")
    assert test.skipped == [str(victim)] and len(test) == 5


def test_skipping_every_train_image_of_a_class_is_refused(tmp_path):
    image_folder(tmp_path, n_train=2)                                # val_fraction .1: val empty
    for p in (tmp_path / "train" / "tabby_cat").iterdir():
        p.write_bytes(b"")
    with pytest.raises(ClassesMissingFromTrainError) as e:
        build(cfg("image_folder", tmp_path, skip=True), "train")
    msg = str(e.value)
    assert "tabby cat (2 images)" in msg and "no usable image left" in msg and "skipped" in msg


# ------------------------------------------------------------------------ guards

def test_one_class_dataset_is_refused(tmp_path):
    image_folder(tmp_path, classes=("tabby_cat",))
    for split in ("train", "test"):
        with pytest.raises(TooFewClassesError) as e:
            build(cfg("image_folder", tmp_path), split)
        msg = str(e.value)
        assert "'image_folder'" in msg and f"split {split!r}" in msg and "tabby cat" in msg
        assert "at least 2" in msg


def test_train_with_one_populated_class_is_refused(tmp_path):
    from residual_exp.data.image_folder import ImageFolderError
    image_folder(tmp_path, n_test=1)
    for p in (tmp_path / "train" / "tabby_cat").iterdir():
        p.unlink()
    with pytest.raises(ImageFolderError, match=r"1 class folder in the train split of .* holds no image \(tabby_cat/"):
        build(cfg("image_folder", tmp_path), "train")        # an empty class folder: refused, named
    with pytest.raises(TooFewClassesError, match=r"declares 1 class \(golden retriever\)"):
        build(cfg("image_folder", tmp_path, drop_empty_classes=True), "train")   # dropped: one class left


def test_empty_split_is_refused(tmp_path):
    image_folder(tmp_path, n_train=3)                                # round(0.1 * 3) = 0 for val
    with pytest.raises(EmptySplitError) as e:
        build(cfg("image_folder", tmp_path), "val")
    assert "split 'val'" in str(e.value) and "empty" in str(e.value)
    build(cfg("image_folder", tmp_path), "train")                    # the others are fine
    with pytest.raises(EmptySplitError, match="'shapes_size', split 'test'"):
        registry.build_split(cfg("shapes_size", "data", n_train=50, n_test=0), "test")


def test_class_missing_from_train_is_refused(tmp_path):
    import shutil
    image_folder(tmp_path)
    shutil.rmtree(tmp_path / "train" / "tabby_cat")                   # test/ keeps a class train/ lacks
    (tmp_path / "train" / "zebra").mkdir()
    for k in range(3):
        jpeg(tmp_path / "train" / "zebra" / f"{k}.jpg", k)
    for split in ("test",):
        with pytest.raises(ClassesMissingFromTrainError) as e:
            build(cfg("image_folder", tmp_path), split)
        msg = str(e.value)
        assert "split 'test'" in msg and "tabby cat (3 images)" in msg and "never in the train" in msg
        assert e.value.classes == ["tabby cat"] and "tabby_cat" in msg
    with pytest.raises(ClassesMissingFromTrainError):                 # refused whichever split is asked for
        build(cfg("image_folder", tmp_path), "train")


def test_val_folder_class_unknown_to_train_is_refused(tmp_path):
    image_folder(tmp_path, val={"golden_retriever": 2, "tabby_cat": 2, "zebra": 2})
    with pytest.raises(ClassesMissingFromTrainError) as e:
        build(cfg("image_folder", tmp_path), "val")
    assert "zebra" in str(e.value) and "split 'val'" in str(e.value)


def test_shapes_guard_uses_labels_only(monkeypatch):
    c = cfg("shapes_color", "data", n_train=40, n_val=20, n_test=20)
    calls = []
    real = shapes.load_split

    def spy(seed, split, n, image_size):
        calls.append(split)
        return real(seed, split, n, image_size)
    monkeypatch.setattr(shapes, "load_split", spy)
    registry.build_split(c, "val")
    assert calls == ["val"]                        # train labels drawn without rendering
    with pytest.raises(TooFewClassesError):
        registry.build_split(cfg("shapes_color", "data", n_train=1, n_val=5), "val")


def test_error_hierarchy():
    assert issubclass(vision.DatasetNotFound, DatasetError)
    assert issubclass(vision.DatasetNotFound, FileNotFoundError)
    assert issubclass(SplitMismatchError, DatasetError) and issubclass(SplitMismatchError, RuntimeError)
    for cls in (BadImageError, TooFewClassesError, EmptySplitError, ClassesMissingFromTrainError):
        assert issubclass(cls, DatasetError) and issubclass(cls, ValueError)


def test_broken_dataset_module_is_not_hidden():
    """A broken torchvision surfaces as the import error it is (it used to make every dataset
    vanish as "unknown dataset")."""
    import subprocess
    code = ("import sys; sys.modules['torchvision.datasets'] = None\n"
            "from omegaconf import OmegaConf\n"
            "from residual_exp.data.registry import builder_of\n"
            "builder_of(OmegaConf.create({'name': 'cifar10'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "torchvision.datasets" in proc.stderr and "unknown dataset" not in proc.stderr


# ------------------------------------------------------------------ inspect_data

def _inspect(c, verify):
    from residual_exp.tasks.inspect_data import inspect_data
    return inspect_data(OmegaConf.create({"dataset": c, "task": {"name": "inspect_data",
                                                                  "verify": verify}}))


def test_inspect_data_verify_finds_corrupt_file_and_single_class_split(tmp_path, capsys):
    image_folder(tmp_path, n_test=0)
    for k in range(3):                                               # test: one class only
        jpeg(tmp_path / "test" / "tabby_cat" / f"{k}.jpg", 70 + k)
    victim = tmp_path / "train" / "golden_retriever" / "6.jpg"
    truncate(victim)
    c = cfg("image_folder", tmp_path)

    assert _inspect(c, verify=True) == 1
    out = capsys.readouterr().out
    assert "corrupt files: 1" in out and str(victim) in out
    assert "split 'test' has a single class: tabby cat (3 images)" in out
    assert "class counts per split" in out and "golden retriever 9" in out   # train: 9 of 10

    assert _inspect(c, verify=False) == 1                            # labels only
    out = capsys.readouterr().out
    assert "single class" in out and str(victim) not in out


def test_inspect_data_reports_missing_train_classes_and_empty_splits(tmp_path, capsys):
    image_folder(tmp_path, n_train=3)
    assert _inspect(cfg("image_folder", tmp_path), verify=False) == 1
    out = capsys.readouterr().out
    assert "split 'val' is empty" in out
    for p in (tmp_path / "train" / "tabby_cat").iterdir():
        p.unlink()
    assert _inspect(cfg("image_folder", tmp_path, drop_empty_classes=True), verify=False) == 1
    out = capsys.readouterr().out
    assert "has a single class: golden retriever (3 images)" in out


def test_inspect_data_verify_clean(tmp_path, capsys, no_md5):
    image_folder(tmp_path)
    assert _inspect(cfg("image_folder", tmp_path), verify=True) == 0
    assert "every image decodes" in capsys.readouterr().out
    write_cifar10(tmp_path / "cifar")
    assert _inspect(cfg("cifar10", tmp_path / "cifar"), verify=True) == 0
    assert _inspect(cfg("shapes_shape", "data", n_train=60, n_val=30, n_test=30,
                        n_reference=10), verify=True) == 0


def test_inspect_data_verify_through_the_composed_config(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from residual_exp.config import register_configs
    from residual_exp.tasks.inspect_data import inspect_data

    register_configs()
    image_folder(tmp_path)
    victim = tmp_path / "test" / "golden_retriever" / "1.jpg"
    victim.write_bytes(b"")
    conf = Path(__file__).resolve().parents[2] / "residual_exp" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        c = compose("config", overrides=["task=inspect_data", "task.verify=true",
                                         "dataset=image_folder", f"dataset.root={tmp_path}"])
    assert c.dataset.skip_bad_images is False and c.dataset.content_hash is False
    assert inspect_data(c) == 1
    out = capsys.readouterr().out
    assert f"{victim}: empty file (0 bytes)" in out
