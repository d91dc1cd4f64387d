"""task=plan: sizes, bytes per image and GPU hours of a grid, without building a model."""
from __future__ import annotations

import csv

from residual_exp.catalog import spec
from residual_exp.plan import bytes_per_image, split_sizes
from residual_exp.run import run
from tests.conftest import compose_cfg


def test_bytes_per_image_of_clip_l():
    low = bytes_per_image(spec("model", "clip_l"), "lowrank", "float16")
    assert low == 2 * (24 * 16 * 64 + 25 * 768 + 768) + 4 * 27 + 8 == 89_204       # ≤ 92 KB
    today = (411 + 1) * 768 * 4 + 8                                                  # [N, U, D] + feature, fp32
    assert today / low > 14


def test_split_sizes_follow_the_protocol():
    assert split_sizes(spec("dataset", "cifar100")) == {"train": 45_000, "val": 5_000, "test": 10_000, "reference": 45_000}
    assert split_sizes(spec("dataset", "sun397"))["val"] == round(0.1 * 108_754)
    assert split_sizes(spec("dataset", "resisc45")) == {"train": 18_900, "val": 6_300, "test": 6_300, "reference": 18_900}
    assert split_sizes(spec("dataset", "imagenet"))["train"] == 1_281_167 - round(0.2 * 1_281_167)


def test_plan_of_a_grid(tmp_path, capsys):
    cfg = compose_cfg(["task=plan", "pca=imagenet", "task.grid.model=[clip_b,clip_l]",
                       "task.grid.dataset=[cifar10,dtd]", "task.grid.method=[base,residual_full,finetune]"], tmp_path)
    assert run(cfg) == 0
    out = capsys.readouterr().out
    assert "12 jobs = 2 models × 2 datasets × 3 methods" in out and "whole grid without finetune" in out
    rows = {r["model"]: r for r in csv.DictReader(open(tmp_path / "run" / "plan.csv"))}
    assert set(rows) == {"clip_b", "clip_l", "total"}
    clip_l = rows["clip_l"]
    assert int(clip_l["train_images"]) == 45_000 + 1_504 and int(clip_l["reference_images"]) == 1_024_934
    assert float(clip_l["cache_GB"]) == (45_000 + 5_000 + 10_000 + 1_504 + 376 + 1_880) * 89_204 / 1e9
    assert float(rows["total"]["encode_h"]) > 0 and float(clip_l["finetune_h"]) > float(clip_l["train_h"])


def test_plan_sizes_pooled_readouts_from_the_meta_device():
    """Any model=timm / model=open_clip architecture is planned (shapes from its image tower on the
    meta device); an attention-pooled cache's bytes are those of its stored arrays."""
    import math

    from residual_exp.backbones import build_backbone
    from residual_exp.backbones.shapes import arch_shape
    from residual_exp.decompose.readout import WIDE_KEYS
    from tests.unit.test_decompose_tiny import model_cfg
    assert arch_shape(model_cfg(name="open_clip", arch="ViT-B-16-SigLIP")) == (12, 12, 64, 768, 768, 224, 16, 12)
    assert arch_shape(model_cfg(name="open_clip", arch="PE-Core-B-16")) == (12, 12, 64, 768, 1024, 224, 16, 8)
    assert arch_shape(model_cfg(name="open_clip", arch="ViT-L-14-CLIPA"))[7] == 0
    for pool in ("map", "avg"):
        cfg = model_cfg(name="timm", arch="vit_tiny_patch16_224", image_size=32,
                        params={"create_kwargs": {"depth": 2, "global_pool": pool, "class_token": False}})
        shapes = build_backbone(cfg).readout().storage_shapes()
        stored = sum(math.prod(s) * (4 if k in WIDE_KEYS else 2) for k, s in shapes.items()) + 8   # + the label
        from residual_exp.tasks.plan import model_spec
        assert bytes_per_image(model_spec(cfg), "lowrank", "float16") == stored, pool
