"""task=report: results.json files → results.csv, a paper-style results.md and PNG plots."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from residual_exp.catalog import method_order

METHODS = method_order()
from residual_exp.results import RESULT_KEYS
from residual_exp.run import run
from tests.conftest import compose_cfg
from tests.integration.sweep_helpers import TINY, cli

MODELS, DATASETS = ("clip_b", "dinov2_l"), ("cifar10", "dtd", "svhn")
PARAMS = {"base": 0, "finetune": 86_000_000, "linear_adapter": 262_656, "spectral_adapter": 512,
          "residual_coarse": 144, "residual_fine": 9_000, "residual_full": 120_000}


def _record(model, dataset, method, acc, zs=0.5, seed=0):
    return {"model": model, "dataset": dataset, "method": method, "trainable_params": PARAMS[method],
            "val_accuracy": acc, "test_accuracy": acc, "zero_shot_val_accuracy": zs,
            "zero_shot_test_accuracy": zs, "seed": seed, "wall_seconds": 1.0, "units_convention": "official",
            "classifier": "text", "evr_rule": "strict", "compat": "none", "cache_layout": "lowrank"}


def _write_run(folder, model, dataset, method, acc, lam=None):
    folder.mkdir(parents=True)
    recs = [_record(model, dataset, "base", 0.5)] + ([] if method == "base" else [_record(model, dataset, method, acc)])
    (folder / "results.json").write_text(json.dumps(recs))
    if lam is not None:
        lam.save(folder)


class Spectral:
    """A lambda.safetensors as run.py's _save_trained writes it for spectral methods."""
    units = [f"L{l}H{h}" for l in range(3) for h in range(4)] + [f"L{l}.mlp" for l in range(3)]

    def save(self, folder):
        S, K = len(self.units), 16
        mask = torch.arange(K)[None, :] < torch.randint(2, K + 1, (S, 1), generator=torch.Generator().manual_seed(0))
        lam = torch.where(mask, torch.randn(S, K, generator=torch.Generator().manual_seed(1)) + 1, torch.zeros(S, K))
        save_file({"lambda": lam, "mask": mask, }, str(folder / "lambda.safetensors"),
                  metadata={"method": "residual_full", "units": json.dumps(self.units)})


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "sweep"
    i = 0
    for model in MODELS:
        for dataset in DATASETS:
            for j, method in enumerate(METHODS):
                acc = 0.5 + 0.05 * j + 0.01 * DATASETS.index(dataset)
                _write_run(sweep / f"{i}-{model}-{dataset}-{method}", model, dataset, method, acc,
                           lam=Spectral() if method == "residual_full" else None)
                i += 1
    # a re-run of one cell, newer and better: it replaces the old record
    dup = sweep / "rerun" / "0-clip_b-cifar10-residual_full"
    _write_run(dup, "clip_b", "cifar10", "residual_full", 0.99)
    old = time.time() - 100
    for p in sweep.glob("*/results.json"):
        os.utime(p, (old, old))
    return sweep


def _report(tmp_path, *overrides):
    cfg = compose_cfg(["task=report", *overrides], tmp_path)
    return run(cfg)


def test_report_writes_the_paper_table_csv_and_plots(sweep, tmp_path, capsys):
    assert _report(tmp_path, f"sweep_dir={sweep}") == 0
    out = capsys.readouterr().out
    rep = sweep / "report"
    import pandas as pd
    df = pd.read_csv(rep / "results.csv")
    assert len(df) == len(MODELS) * len(DATASETS) * len(METHODS)            # duplicates dropped
    assert set(RESULT_KEYS) - {"wall_seconds"} <= set(df.columns) and "gain" in df.columns
    cell = df[(df.model == "clip_b") & (df.dataset == "cifar10") & (df.method == "residual_full")]
    assert cell.test_accuracy.tolist() == [0.99] and "rerun" in cell.run_dir.iloc[0]   # the newest kept
    assert "duplicate clip_b/cifar10/residual_full/0" in out and "zero-shot (base) records" in out

    md = (rep / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model | dataset"))
    assert header == "| model | dataset | " + " | ".join(METHODS) + " |"          # methods as columns
    rows = [line for line in md.splitlines() if line.startswith("| clip_b |")]
    assert [r.split(" | ")[1] for r in rows[:3]] == list(DATASETS)             # rows: model x dataset
    assert rows[0].split(" | ")[-1].strip(" |") == "99.0"                      # % test accuracy
    mean = next(r for r in rows if "**mean**" in r)
    assert mean.split(" | ")[2] == "**50.0**"                                   # zero-shot mean
    params = next(r for r in rows if "trainable params" in r).split(" | ")
    assert params[2:4] == ["0", "86.0M"] and params[-1].strip(" |") == "120.0k"
    assert "## Mean over datasets" in md and "| **all** |" in md
    assert ("Conventions (FIDELITY.md): units_convention=official, classifier=text, evr_rule=strict, "
            "compat=none, cache_layout=lowrank") in md and "MIXED" not in md

    for name in ("accuracy_vs_params.png", "gain_over_zero_shot.png", "lambda_spectra.png"):
        png = rep / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name


def test_report_from_run_dirs_with_a_chosen_lambda_run_and_out_dir(sweep, tmp_path):
    runs = sorted(p for p in sweep.iterdir() if p.name.startswith(("1", "2")) and p.is_dir())
    coarse = runs[0] / "coarse"
    coarse.mkdir()
    save_file({"lambda": torch.randn(12)}, str(coarse / "lambda.safetensors"),
              metadata={"method": "residual_coarse", "units": json.dumps(Spectral.units[:12])})
    out = tmp_path / "out"
    assert _report(tmp_path, f"task.run_dirs=[{','.join(map(str, runs))}]", f"task.out_dir={out}",
                   f"task.lambda_run={coarse}") == 0
    assert {p.name for p in out.iterdir()} == {"results.csv", "results.md", "accuracy_vs_params.png",
                                               "gain_over_zero_shot.png", "lambda_spectra.png", "cells.csv",
                                               "cells.md", "figures.md", "pareto_params.png", "pareto_params.csv"}
    skipped = (out / "figures.md").read_text().split("## Skipped")[1]
    assert "units: skipped — no trained cell records units" in skipped
    assert "training_dynamics: skipped — no trained run has a history.csv" in skipped


def test_report_fails_clearly_on_a_missing_dir(tmp_path, capsys):
    from residual_exp.validate import ConfigError
    with pytest.raises(ConfigError, match=r"sweep_dir=.*nope: no such directory"):        # refused by validation
        _report(tmp_path, f"sweep_dir={tmp_path / 'nope'}")
    assert _report(tmp_path) == 2
    assert "sweep_dir=DIR" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _report(tmp_path, f"sweep_dir={tmp_path / 'empty'}") == 2
    assert "no results.json" in capsys.readouterr().err


@pytest.mark.slow
def test_synthetic_grid_runs_and_reports(tmp_path):
    """The offline synthetic grid (all its shapes tasks x all 7 methods) at tiny sizes, then the report."""
    sweep = tmp_path / "sweep"
    cli(["-m", "+experiment=sweep/synthetic", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path, timeout=3000)
    results = list(sweep.rglob("results.json"))
    assert len(results) == 5 * 7
    proc = cli(["task=report", f"sweep_dir={sweep}"], tmp_path)
    md = (sweep / "report" / "results.md").read_text()
    assert md.count("| tiny_clip | shapes_") == 5 and "residual_full" in md and "**mean**" in md
    assert "lambda_spectra.png" in proc.stdout
    for name in ("accuracy_vs_params.png", "gain_over_zero_shot.png", "lambda_spectra.png"):
        assert (sweep / "report" / name).stat().st_size > 10_000
