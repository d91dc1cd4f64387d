"""Every way `task=train` can run, end to end on the embedded tiny CLIP and a few dozen images:
finetune, the LR finder with the schedule-free optimizer, encodings streamed from disk, the
backbone in the loop, caching off; the tiny CLIP pretraining task; and the real λ writer read
back by the report and by the text_spans analysis."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from omegaconf import open_dict

from residual_exp.results import load_lambda
from residual_exp.run import run
from tests.conftest import compose_cfg

SMALL = ["dataset.params.n_train=96", "dataset.params.n_val=48", "dataset.params.n_test=48",
         "dataset.params.n_reference=96", "trainer=fast", "trainer.max_epochs=2", "logger=none",
         "trainer.progress_bar=false"]


def _train(tmp_path, name: str, overrides, cache: str = "cache"):
    cfg = compose_cfg([*SMALL, *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path / name)
        cfg.paths.output_dir = str(tmp_path / name / "run")
        cfg.cache.dir = str(tmp_path / cache)
    assert run(cfg) == 0
    out = tmp_path / name / "run"
    return json.loads((out / "results.json").read_text()), out


def test_finetune_trains_the_image_tower(tmp_path):
    records, out = _train(tmp_path, "ft", ["method=finetune", "trainer.max_epochs=1"])
    base, ft = records
    assert ft["method"] == "finetune" and ft["epochs"] == 1
    from residual_exp.backbones import build_backbone
    bb = build_backbone(compose_cfg([]).model)
    assert ft["trainable_params"] == sum(p.numel() for p in bb.vision.parameters())
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    tuned = {k for k in ckpt["state_dict"] if k.startswith("adapter.backbone.model.visual.")}
    assert tuned and not (out / "lambda.safetensors").exists()       # the tower is in the checkpoint


def test_lr_finder_with_the_schedule_free_optimizer(tmp_path):
    records, out = _train(tmp_path, "lrf", ["method=residual_coarse", "trainer.lr_find=true"])
    assert (out / "lr_find.png").stat().st_size > 0
    from residual_exp.train.fit import implausible_lr
    finder, rec = records[1]["lr_finder"], records[1]
    assert finder["suggested"] > 0 and finder["preset"] == 0.8        # the finder ran on the schedule-free module
    kept = implausible_lr(finder["suggested"], 0.8)                  # its pick is used only when plausible
    assert rec["lr"] == finder["used"] == (0.8 if kept else finder["suggested"])
    assert finder.get("kept_preset") == kept and (f"LR finder not used: {kept}" in rec["flags"]) == bool(kept)


def test_streamed_cache_backbone_in_the_loop_and_no_cache_agree_with_the_in_memory_cache(tmp_path):
    ref, ref_out = _train(tmp_path, "mem", ["method=residual_fine"])
    streamed, s_out = _train(tmp_path, "stream", ["method=residual_fine", "cache.memory_budget_gb=1e-9"])
    live, l_out = _train(tmp_path, "live", ["method=residual_fine", "method.cache=false"])
    nocache, n_out = _train(tmp_path, "off", ["method=residual_fine", "cache.enabled=false"], cache="nocache")
    lam = load_lambda(ref_out).lam
    for records, out, tol in ((streamed, s_out, 1e-5), (live, l_out, 1e-3), (nocache, n_out, 0.0)):
        assert records[1]["trainable_params"] == ref[1]["trainable_params"]
        got = load_lambda(out).lam
        assert (got - lam).abs().max().item() <= tol, out
    assert nocache == [dict(r, wall_seconds=n["wall_seconds"]) for r, n in zip(ref, nocache)]   # same numbers
    assert not list((tmp_path / "nocache").rglob("*.npy"))           # cache.enabled=false wrote no encoding


def test_pretrain_tiny_clip_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny.safetensors"
    cfg = compose_cfg(["task=pretrain_tiny_clip", "task.n_images=64", "task.epochs=1", "task.batch_size=32",
                       f"task.out={out}", "trainer.progress_bar=false"])
    assert run(cfg) == 0 and out.is_file()
    from residual_exp.backbones import build_backbone
    bb = build_backbone(compose_cfg([f"model.weights={out}"]).model)
    units, feature = bb.decompose(torch.zeros(2, 3, bb.image_size, bb.image_size))
    assert torch.allclose(units.sum(1), feature, atol=1e-5)


def test_the_real_lambda_writer_feeds_the_report_and_text_spans(tmp_path):
    records, out = _train(tmp_path, "full", ["method=residual_full"])
    trained = load_lambda(out)
    assert trained.method == "residual_full" and trained.lam.shape == trained.mask.shape
    assert len(trained.units) == trained.lam.shape[0] and trained.units[0].startswith("L0H")
    report = compose_cfg(["task=report", f"sweep_dir={tmp_path / 'full'}", f"task.out_dir={tmp_path / 'report'}"])
    assert run(report) == 0
    assert (tmp_path / "report" / "lambda_spectra.png").stat().st_size > 0
    dictionary = tmp_path / "dict.txt"
    dictionary.write_text("red\nblue\ngreen\na red shape\nstriped\nsmall\ncircle\nsquare\n")
    spans = compose_cfg(["task=analysis", "analysis=text_spans", f"analysis.run_dir={out}", "analysis.progress=false",
                         f"analysis.dictionary={dictionary}", "analysis.n_components=1", "analysis.n_lambda=3", *SMALL])
    with open_dict(spans):
        spans.paths.output_dir = str(tmp_path / "spans")
        spans.cache.dir = str(tmp_path / "cache")
    assert run(spans) == 0
    rows = list(csv.DictReader(open(tmp_path / "spans" / "lambda_components.csv")))
    assert len(rows) == 6 and {r["unit"] for r in rows} <= set(trained.units)
    assert all(r["lambda_init"] for r in rows)                       # the initial λ was rebuilt from the seed


@pytest.mark.parametrize("method", ["residual_coarse", "linear_adapter"])
def test_other_lambda_formats_load(tmp_path, method):
    records, out = _train(tmp_path, method, [f"method={method}"])
    trained = load_lambda(out)
    if method == "residual_coarse":
        assert trained.lam.ndim == 1 and trained.mask is None and len(trained.units) == 16
    else:
        assert trained.lam is None and set(trained.tensors) == {"linear.weight", "linear.bias"}


def test_a_diverging_job_stops_and_stores_nothing(tmp_path, monkeypatch):
    from residual_exp.methods.adapters import LinearAdapter
    from residual_exp.train.module import TrainingDiverged
    monkeypatch.setattr(LinearAdapter, "forward", lambda self, feature: self.linear(feature) * float("nan"))
    with pytest.raises(TrainingDiverged, match="loss nan at epoch 0.*nothing of this job is stored"):
        _train(tmp_path, "nan", ["method=linear_adapter"])
    assert not list((tmp_path / "nan").rglob("outputs/results/*.json"))
    assert not (tmp_path / "nan" / "run" / "results.json").exists()


def test_a_method_ending_below_zero_shot_is_flagged(caplog):
    import importlib
    import logging
    train_task = importlib.import_module("residual_exp.tasks.train")
    with caplog.at_level(logging.WARNING, "residual_exp.tasks.train"):
        assert train_task.warn_below_zero_shot({"method": "spectral_adapter", "val_accuracy": 0.05, "best_epoch": 0,
                                                "epochs": 3}, 0.91)
        assert not train_task.warn_below_zero_shot({"method": "residual_full", "val_accuracy": 0.90}, 0.91)
    assert "spectral_adapter ended below zero-shot on val (0.0500 < 0.9100, best epoch 0 of 3)" in caplog.text
