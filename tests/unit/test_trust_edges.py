"""Results that look fine and are not, and the small edges around them: flags in records and the console
table, the LR finder's sanity check, CSV cells, the plan's job count, method.k above a unit's dimension,
loader workers, W&B's deprecated setting, run names that would leave the output root."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from residual_exp.results import result_flags, results_table
from residual_exp.tables import csv_cell, csv_text


def _rec(method, val, test, zs_val=0.345, zs_test=0.3525, **kw):
    return dict(model="tiny_clip", dataset="shapes_shape", method=method, trainable_params=768, seed=0,
                val_accuracy=val, test_accuracy=test, zero_shot_val_accuracy=zs_val, zero_shot_test_accuracy=zs_test,
                wall_seconds=1.0, **kw)


def test_flags_below_zero_shot_and_chance():
    assert result_flags(_rec("residual_full", 0.42, 0.4155), 4) == []            # the default run: nothing to check
    assert result_flags(_rec("residual_full", 0.33, 0.34), 4) == []              # within 2 points of zero-shot
    low = result_flags(_rec("spectral_adapter", 0.045, 0.045, zs_val=0.91, zs_test=0.91, best_epoch=0, epochs=6), 4)
    assert len(low) == 2 and low[0].startswith("below zero-shot: val 0.0450 < zero-shot 0.9100 (best epoch 0 of 6)")
    assert low[1].startswith("at or below chance: test 0.0450 ≤ 1/4 = 0.2500; the method did not learn")
    base = result_flags(_rec("base", 0.25, 0.25, zs_val=0.25, zs_test=0.25), 4)
    assert base == ["at or below chance: zero-shot test 0.2500 ≤ 1/4 = 0.2500; the frozen model does not separate "
                    "these classes (check the class names and prompts)"]
    lr = result_flags(_rec("residual_full", 0.42, 0.41, lr_finder={"kept_preset": "its suggestion lr=1.9e-07 is …"}), 4)
    assert lr == ["LR finder not used: its suggestion lr=1.9e-07 is …"]


def test_table_marks_flagged_records_and_is_unchanged_otherwise():
    ok = [_rec("base", 0.345, 0.3525), _rec("residual_full", 0.42, 0.4155)]
    for r in ok:
        r["flags"] = []
    plain = results_table(ok)
    assert "check" not in plain and "!" not in plain and len(plain.splitlines()) == 4
    bad = [dict(ok[0]), _rec("spectral_adapter", 0.045, 0.045, flags=["below zero-shot: …"])]
    text = results_table(bad).splitlines()
    assert text[0].rstrip().endswith("check") and text[3].rstrip().endswith("!") and not text[2].rstrip().endswith("!")
    assert text[4] == "! spectral_adapter (tiny_clip, shapes_shape): below zero-shot: …"


def test_lr_finder_picks_outside_the_sane_band_keep_the_preset():
    from residual_exp.train.fit import implausible_lr
    assert implausible_lr(0.5, 0.8) is None and implausible_lr(0.01, 0.8) is None and implausible_lr(3e-4, 1e-3) is None
    assert "more than 100x below the preset 0.8" in implausible_lr(1.9e-7, 0.8)
    assert "outside the sane range" in implausible_lr(50.0, 0.8) and "outside" in implausible_lr(5e-7, 1e-5)
    assert "more than 100x above" in implausible_lr(0.5, 1e-5)
    assert "no suggestion" in implausible_lr(None, 0.8) and "no suggestion" in implausible_lr(float("nan"), 0.8)


def test_csv_cells_are_escaped_and_float32_values_written_at_float32_precision():
    assert csv_cell("=HYPERLINK(\"http://x\")") == "'=HYPERLINK(\"http://x\")"
    assert [csv_cell(s) for s in ("+1", "-cmd", "@SUM(A1)", "\tx", "plain", "a=b")] == \
        ["'+1", "'-cmd", "'@SUM(A1)", "'\tx", "plain", "a=b"]
    assert csv_cell(float(np.float32(0.395))) == "0.395" and csv_cell(0.4166666666666667) == 0.4166666666666667
    assert csv_cell(-0.5) == "-0.5" and csv_cell(3) == 3
    text = csv_text([{"class": "=1+1", "acc": float(np.float32(0.42))}])
    assert text == "class,acc\n'=1+1,0.42\n"


def test_plan_counts_every_job_of_the_grid():
    """Zero-shot (base) cells are jobs too: the table's jobs add up to the grid's cells."""
    from residual_exp.catalog import spec
    from residual_exp.plan import Throughput, plan_rows
    methods = ("base", "finetune", "linear_adapter", "residual_full")
    cells = [{"model": m, "model_spec": spec("model", m), "dataset": "cifar10", "dataset_spec": spec("dataset", "cifar10"),
              "method": me, "batch_size": 64, "trains": spec("method", me).trains,
              "finetune": spec("method", me).backbone_in_loop, "needs_bases": bool(spec("method", me).needs_bases),
              "reference": "imagenet", "reference_spec": spec("dataset", "imagenet"), "reference_split": "train",
              "reference_max": None, "params": {}, "reference_params": {}}
             for m in ("clip_b", "clip_l") for me in methods]
    tp = Throughput({"default": 1000}, {"small": 1000, "large": 500}, 100.0, {"default": 100})
    rows = plan_rows(cells, tp, "/nonexistent")
    assert [r["jobs"] for r in rows] == [4, 4] and sum(r["jobs"] for r in rows) == len(cells)


def test_plan_refuses_what_it_cannot_size_in_one_line():
    from residual_exp.errors import UserError
    from residual_exp.catalog import spec
    from residual_exp.plan import split_sizes
    with pytest.raises(UserError, match="dataset=image_folder: task=plan has no nominal sizes"):
        split_sizes(spec("dataset", "image_folder"), name="image_folder")


def test_k_above_a_units_dimension_is_clamped_with_a_warning(caplog):
    from residual_exp.methods import warn_k_clamped
    with caplog.at_level(logging.WARNING):
        assert warn_k_clamped(100, {"heads": 32, "vectors": 64}) is True
        assert warn_k_clamped(16, {"heads": 32}) is False and warn_k_clamped(None, {"heads": 32}) is False
    assert caplog.text.count("rank.k=") == 1 and "heads (32), vectors (64)" in caplog.text


def test_loader_workers_never_exceed_usable_cores():
    from residual_exp.machine import default_workers, loader_workers, usable_cores
    n = usable_cores()
    assert default_workers() == min(4, n) and default_workers(1) == 1
    assert loader_workers(0) == 0 and loader_workers(n + 7) == n


def test_dataset_presets_default_to_the_machines_workers(make_cfg):
    from residual_exp.machine import default_workers
    assert make_cfg(["dataset=cifar10"]).dataset.num_workers == default_workers()
    assert make_cfg(["dataset=image_folder"]).dataset.num_workers == default_workers()


def test_wandb_logger_is_built_without_the_deprecated_anonymous_setting(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from omegaconf import OmegaConf

    from residual_exp.train.loggers import build_logger
    monkeypatch.setenv("WANDB_MODE", "offline")
    node = OmegaConf.create({"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p", "name": "n"})
    logger = build_logger(node, tmp_path, {})
    assert "anonymous" not in logger._wandb_init


@pytest.mark.parametrize("override", ["run_name=../../escape", "run_name=a/b", "model.name=../up", "run_name=.."])
def test_run_names_that_leave_the_output_root_are_refused_before_hydra_makes_a_folder(override):
    from residual_exp.overrides import precheck
    problems = precheck([override])
    assert len(problems) == 1 and problems[0].startswith("run_name=") and "plain folder name" in problems[0]
