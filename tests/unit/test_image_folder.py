"""dataset=image_folder on folders as people ship them: plain class-per-folder trees, odd image modes,
nested and hidden files, symlinks, empty or colliding classes — and its identity, split files and params.

Fixtures are real image files (JPEG / PNG / GIF / TIFF / BMP in several PIL modes) written by the tests.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from residual_exp.data import registry, vision
from residual_exp.data.errors import DatasetError, DatasetNotFound, TooFewClassesError
from residual_exp.data.image_folder import ImageFolderError, identity, scan

SIDE = 12


@pytest.fixture(autouse=True)
def _project(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDUAL_EXP_ROOT", str(project(tmp_path)))
    vision.clear_cache()


def project(tmp_path: Path) -> Path:
    return tmp_path.parent / f"{tmp_path.name}-project"


def splits_dir(tmp_path: Path) -> Path:
    return project(tmp_path) / "outputs" / "splits"


def img(path: Path, seed: int = 0, mode: str = "RGB", fmt: str = "PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    im = Image.fromarray(px)
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257))
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)


def plain(root: Path, classes: dict[str, int]):
    for c_i, (c, n) in enumerate(classes.items()):
        for k in range(n):
            img(root / c / f"{k:03d}.png", 100 * c_i + k)


def cfg(root, **params):
    return OmegaConf.create({"name": "image_folder", "root": str(root), "download": False, "batch_size": 4,
                             "num_workers": 0, "skip_bad_images": False, "content_hash": False, "params": params})


def build(c, split):
    vision.clear_cache()
    return registry.build_split(c, split)


def test_plain_tree_is_carved_into_stratified_train_val_test(tmp_path):
    root = tmp_path / "photos"
    plain(root, {"cat": 20, "dog": 30, "fox": 10})
    parts = {s: build(cfg(root), s) for s in ("train", "val", "test", "reference")}
    counts = {s: Counter(d.targets) for s, d in parts.items()}
    assert counts["val"] == {0: 2, 1: 3, 2: 1} and counts["test"] == {0: 2, 1: 3, 2: 1}
    assert counts["train"] == {0: 16, 1: 24, 2: 8} and parts["reference"].indices == parts["train"].indices
    idx = [set(parts[s].file_paths()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2]) and len(set.union(*idx)) == 60
    assert parts["train"].classnames == ["cat", "dog", "fox"]
    # identity and what results record
    label = parts["train"].label
    assert label.startswith("image_folder:photos-") and len(label.split("-")[-1]) == 10 and label == identity(cfg(root))
    assert parts["train"].record == {"root": str(root.resolve()), "layout": "plain", "classes": 3,
                                     "fractions": {"val": 0.1, "test": 0.1}, "split_seed": 42}
    # the split lives with the project's outputs, keyed by the folder's fingerprint; nothing in the data folder
    assert not [p for p in root.rglob(".*")]
    stored, = splits_dir(tmp_path).glob("image_folder-photos-*.json")
    assert json.loads(stored.read_text())["sizes"] == {"val": 6, "test": 6, "train": 48}


def test_fractions_and_seed_change_the_split_file_not_refuse(tmp_path):
    root = tmp_path / "d"
    plain(root, {"a": 20, "b": 20})
    base = build(cfg(root), "val")
    other = build(cfg(root, val_fraction=0.25, test_fraction=0.25, split_seed=7), "val")
    assert len(base) == 4 and len(other) == 10
    assert len(list(splits_dir(tmp_path).glob("*.json"))) == 2


def test_changed_folder_gets_new_identity_and_split_never_a_stale_one(tmp_path):
    root = tmp_path / "d"
    plain(root, {"a": 20, "b": 20})
    first = build(cfg(root), "train")
    for k in range(20, 40):                                  # the folder grows
        img(root / "a" / f"{k:03d}.png", 5000 + k)
    second = build(cfg(root), "train")
    assert second.label != first.label and len(second) == 48 and len(first) == 32
    assert len(list(splits_dir(tmp_path).glob("*.json"))) == 2
    other = tmp_path / "other" / "d"                         # same name, other content: another identity
    plain(other, {"a": 20, "b": 21})
    assert identity(cfg(other)) != identity(cfg(root))


def test_split_layout_reads_train_test_and_carves_val(tmp_path):
    root = tmp_path / "d"
    for split, n in (("train", 10), ("test", 3)):
        plain(root / split, {"x_ray": n, "y": n})
    parts = {s: build(cfg(root), s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [18, 2, 6]
    assert parts["test"].classnames == ["x ray", "y"] and parts["train"].record["layout"] == "split"


def test_empty_class_folders_are_refused_by_name_or_dropped_and_recorded(tmp_path, caplog):
    root = tmp_path / "d"
    plain(root, {"a": 10, "b": 10, "c": 10})
    (root / "empty_one").mkdir()
    (root / "only_text").mkdir()
    (root / "only_text" / "readme.txt").write_text("no images here")
    with pytest.raises(ImageFolderError) as e:
        build(cfg(root), "train")
    assert "2 class folders" in str(e.value) and "empty_one/, only_text/" in str(e.value)
    assert "drop_empty_classes=true" in str(e.value) and "\n" not in str(e.value)
    assert not splits_dir(tmp_path).exists()                       # refused before anything was written
    with caplog.at_level(logging.WARNING):
        ds = build(cfg(root, drop_empty_classes=True), "train")
        build(cfg(root, drop_empty_classes=True), "val")
    assert ds.classnames == ["a", "b", "c"] and ds.record["dropped_empty_classes"] == ["empty_one", "only_text"]
    assert caplog.text.count("leaving out 2 empty class folder") == 1      # said once, not once per split


def test_colliding_class_names_and_mixed_layouts_are_refused(tmp_path):
    root = tmp_path / "d"
    plain(root, {"red_car": 5, "red car": 5, "Blue": 5})
    with pytest.raises(ImageFolderError, match=r"'red car' and 'red_car' → 'red car'"):
        build(cfg(root), "train")
    ok = tmp_path / "ok"
    plain(ok, {"a": 5, "b": 5})
    with pytest.raises(ImageFolderError, match=r"classnames=.*same class name|give the same class name"):
        build(cfg(ok, classnames=["Same", "same"]), "train")
    mixed = tmp_path / "mixed"
    plain(mixed / "train", {"a": 5, "b": 5})
    plain(mixed, {"stray_class": 5})
    with pytest.raises(ImageFolderError, match=r"mixes split folders \(train/\) with other folders \(stray_class/\)"):
        build(cfg(mixed), "train")


def test_classnames_rename_the_classes(tmp_path):
    root = tmp_path / "d"
    plain(root, {"AnnualCrop": 10, "SeaLake": 10})
    assert build(cfg(root, classnames=["annual crop", "sea or lake"]), "train").classnames == ["annual crop", "sea or lake"]
    assert build(cfg(root, classnames={"SeaLake": "lake"}), "train").classnames == ["AnnualCrop", "lake"]
    with pytest.raises(ImageFolderError, match="has 3 names but .* has 2 class folders"):
        build(cfg(root, classnames=["a", "b", "c"]), "train")
    with pytest.raises(ImageFolderError, match="not classes of"):
        build(cfg(root, classnames={"Nope": "x"}), "train")


def test_odd_modes_nested_hidden_and_symlinked_files(tmp_path):
    root = tmp_path / "d"
    modes = [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"),
             ("1", "BMP"), ("RGB", "TIFF"), ("P", "GIF")]
    for k, (mode, fmt) in enumerate(modes):
        ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
        img(root / "odd" / "deep" / "er" / f"{k}.{ext}", k, mode, fmt)
    plain(root, {"plain": 9})
    (root / "odd" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")        # macOS resource fork
    (root / "odd" / ".thumbs").mkdir()
    img(root / "odd" / ".thumbs" / "t.png")
    (root / ".git").mkdir()                                                           # a hidden top-level folder
    (root / "plain" / "loop").symlink_to(root / "plain")                              # a symlink loop
    (root / "odd" / "link.png").symlink_to(root / "plain" / "000.png")
    tree = scan(cfg(root))
    assert tree.folders == ["odd", "plain"]
    # every mode counts, the GIF does not (not one of torchvision's image extensions), the linked file does
    assert Counter(t for _, t in tree.samples["all"]) == {0: len(modes) - 1 + 1, 1: 9}
    assert not any("/." in p for p, _ in tree.samples["all"])
    train = build(cfg(root, val_fraction=0.2, test_fraction=0.2), "train")
    for i in range(len(train)):
        x, _ = train[i]
        assert x.mode == "RGB" and x.size == (SIDE, SIDE)


def test_missing_file_root_and_one_class(tmp_path):
    with pytest.raises(DatasetNotFound, match="does not exist"):
        build(cfg(tmp_path / "nope"), "train")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetNotFound, match="is a file, not a folder"):
        build(cfg(tmp_path / "f.txt"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="has no class folders"):
        build(cfg(tmp_path / "empty"), "train")
    plain(tmp_path / "one", {"only": 12})
    with pytest.raises(TooFewClassesError, match="declares 1 class"):
        build(cfg(tmp_path / "one"), "train")


def test_many_classes_of_one_image_leave_val_empty_with_a_clear_line(tmp_path):
    root = tmp_path / "d"
    plain(root, {f"c{i:03d}": 1 for i in range(150)})
    assert len(build(cfg(root), "train")) == 150
    with pytest.raises(DatasetError, match="split 'val'.*empty") as e:
        build(cfg(root), "val")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("dataset.params.val_fraction=1.5", "dataset.params.val_fraction=1.5: must be a finite number in (0, 1)"),
    ("dataset.params.test_fraction=0", "dataset.params.test_fraction=0: must be a finite number in (0, 1)"),
    ("+dataset.params.val_frac=0.2", "unknown key dataset.params.val_frac (did you mean dataset.params.val_fraction?)"),
    ("dataset.params.split_seed=-1", "dataset.params.split_seed=-1: must be an integer ≥ 0"),
    ("dataset.params.templates=[a photo]", "dataset.params.templates[0]=a photo: must be a prompt with exactly one {}"),
])
def test_bad_params_are_refused_before_any_work(make_cfg, override, message):
    from residual_exp.validate import ConfigError, validate
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(["dataset=image_folder", override]))
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems


def test_fractions_that_leave_no_train_images_are_refused(make_cfg):
    from residual_exp.validate import ConfigError, validate
    with pytest.raises(ConfigError, match=r"test_fraction=0.5: val_fraction \+ test_fraction = 1 leaves no train"):
        validate(make_cfg(["dataset=image_folder", "dataset.params.val_fraction=0.5",
                           "dataset.params.test_fraction=0.5"]))
