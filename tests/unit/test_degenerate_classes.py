"""A frozen head whose classes cannot be told apart is refused before training, naming them and why.

The trap the issue found: folder names the tiny CLIP's word-level tokenizer does not know all read as the
same unknown token, so every class vector is the same, every method scores the first class's share and the
loss stays at ln C.  Real tokenizer, real text tower, real image folders.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from residual_exp.classifiers import (DEGENERATE_COSINE, NEAR_DUPLICATE_COSINE, IndistinguishableClassesError,
                                      check_class_vectors, check_distinct_prompts, zero_shot_weights)
from residual_exp.data.errors import DatasetError
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def tiny():
    from residual_exp.backbones import build_backbone
    return build_backbone(compose_cfg([]).model)


def test_vectors_identical_or_nearly_are_refused_in_groups_and_near_duplicates_warned(caplog):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g, dtype=torch.float64)
    w[3] = w[1] * 2.5                                        # same direction (scale does not separate classes)
    w[5] = w[1] + 1e-4 * torch.randn(16, generator=g, dtype=torch.float64)
    names = [f"c{i}" for i in range(6)]
    with pytest.raises(IndistinguishableClassesError) as e:
        check_class_vectors(w, names, "because")
    assert e.value.groups == [["c1", "c3", "c5"]] and "cannot tell 3 of its 6 classes apart" in str(e.value)
    assert str(e.value).endswith(": because") and isinstance(e.value, DatasetError)
    v = torch.randn(3, 16, generator=g, dtype=torch.float64)
    v[2] = v[0] + 0.02 * v[0].norm() / math.sqrt(16) * torch.randn(16, generator=g, dtype=torch.float64)
    cos = float(torch.nn.functional.cosine_similarity(v[0], v[2], dim=0))
    assert NEAR_DUPLICATE_COSINE <= cos < DEGENERATE_COSINE
    with caplog.at_level(logging.WARNING):
        assert check_class_vectors(v, ["a", "b", "c"]) is v
    assert "barely separates 1 class pair" in caplog.text and "'a'~'c'" in caplog.text


def test_unknown_words_of_the_tiny_clip_are_named_before_any_text_is_encoded(tiny):
    names = ["AnnualCrop", "Forest", "SeaLake", "red"]
    with pytest.raises(IndistinguishableClassesError) as e:
        check_distinct_prompts(tiny, names, ["a photo of a {}."])
    msg = str(e.value)
    assert e.value.groups == [["AnnualCrop", "Forest", "SeaLake"]]
    assert "does not know the words 'annualcrop', 'forest', 'sealake'" in msg and "dataset.params.classnames" in msg
    # and they really are one vector: the check is not a guess
    w = zero_shot_weights(tiny, names, ["a photo of a {}."], progress=False).double()
    assert float(w[0] @ w[1]) > DEGENERATE_COSINE and float(w[0] @ w[3]) < NEAR_DUPLICATE_COSINE
    check_distinct_prompts(tiny, ["red", "green", "blue"], ["a photo of a {}.", "a {} shape."])   # known words pass


def test_same_prompt_text_is_refused_for_any_model(tiny):
    with pytest.raises(IndistinguishableClassesError, match="their names give the same prompt text"):
        check_distinct_prompts(tiny, ["circle", "circle", "star"], ["a photo of a {}."])


def _folder(root: Path, classes):
    for c_i, c in enumerate(classes):
        for k in range(8):
            px = np.random.default_rng(10 * c_i + k).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(px).save(root / c / f"{k}.png")


def test_training_on_unknown_words_is_refused_before_any_image_is_encoded(tmp_path):
    from residual_exp.run import run
    _folder(tmp_path / "eurosat_like", ["AnnualCrop", "Forest", "SeaLake"])
    cfg = compose_cfg(["dataset=image_folder", f"dataset.root={tmp_path / 'eurosat_like'}", "logger=none",
                       "trainer.max_epochs=1"], tmp_path)
    with pytest.raises(IndistinguishableClassesError) as e:
        run(cfg)
    assert "'annualcrop', 'forest', 'sealake'" in str(e.value)
    cache = tmp_path / "cache"
    assert not (cache / "encodings").exists() and not (cache / "classifiers").exists()
    assert not (tmp_path / "outputs" / "results").exists() and not (tmp_path / "run" / "results.json").exists()
    # renamed through dataset.params.classnames, it trains
    cfg = compose_cfg(["dataset=image_folder", f"dataset.root={tmp_path / 'eurosat_like'}", "logger=none",
                       "trainer.max_epochs=1", "method=base", "dataset.params.classnames=[red,green,blue]"], tmp_path)
    assert run(cfg) == 0


def test_prototype_heads_of_copied_class_folders_are_refused(tmp_path):
    from residual_exp.run import run
    for split in ("train", "val", "test"):
        _folder(tmp_path / "d" / split, ["cats", "dogs"])
    for p in (tmp_path / "d" / "train" / "cats").iterdir():    # train/dogs is a copy of train/cats
        (tmp_path / "d" / "train" / "dogs" / p.name).write_bytes(p.read_bytes())
    cfg = compose_cfg(["dataset=image_folder", f"dataset.root={tmp_path / 'd'}", "logger=none", "model=timm",
                       "model.arch=vit_tiny_patch16_224", "model.pretrained=null", "model.image_size=32",
                       "+model.params.create_kwargs.depth=1", "method=base"], tmp_path)
    with pytest.raises(IndistinguishableClassesError, match=r"\['cats', 'dogs'\].*same mean feature"):
        run(cfg)
