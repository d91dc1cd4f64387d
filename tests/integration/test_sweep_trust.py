"""Sweeps that fail early and end with one table; jobs that are interrupted never look finished.

Real command lines in subprocesses: offline (an empty hub cache, ``HF_HUB_OFFLINE=1``), without SLURM, and
signals sent to a training job while it trains.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

TINY = ["dataset.params.n_train=96", "dataset.params.n_val=48", "dataset.params.n_test=48",
        "dataset.params.n_reference=96", "logger=none", "trainer.progress_bar=false"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.pop("HF_HUB_CACHE", None)
    return env


def _cli(args, tmp_path, timeout=600):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "residual_exp", *args, f"paths.root_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=_env(tmp_path))
    return proc, time.time() - t0


def test_an_offline_sweep_is_refused_before_any_job_with_everything_missing(tmp_path):
    (tmp_path / "data").mkdir()
    proc, _ = _cli(["-m", "model=clip_b,tiny_clip", "dataset=cifar10,shapes_shape", "method=base,residual_full",
                    f"dataset.root={tmp_path / 'data'}", "logger=none"], tmp_path)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors[0] == "error: the sweep's 8 jobs cannot run here (none was launched); missing:"
    assert any("model=clip_b: the weights (timm/vit_base_patch16_clip_224.openai) are not in the local hub cache"
               in e for e in errors)
    assert any(e.startswith("error:   dataset=cifar10: not found under dataset.root=") for e in errors)
    assert len(errors) == 3 and "Traceback" not in proc.stderr                    # tiny_clip and shapes: fine
    assert not (tmp_path / "outputs" / "sweeps").exists() and not (tmp_path / "outputs" / "results").exists()


def test_slurm_launcher_without_slurm_is_one_line(tmp_path):
    proc, _ = _cli(["-m", "method=base,residual_full", "hydra/launcher=slurm", *TINY], tmp_path)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: hydra/launcher=slurm: SLURM is not available on this machine (no sbatch")
    assert "Traceback" not in proc.stderr


def test_a_multirun_ends_with_its_combined_table(tmp_path):
    proc, _ = _cli(["-m", "method=base,residual_coarse", "trainer.max_epochs=1", *TINY,
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tail = proc.stdout.strip().splitlines()
    assert tail[-1] == f"sweep: 2 results from 2 job folder(s) → {tmp_path / 'sweep' / 'results_table.csv'}"
    rows = list(csv.DictReader((tmp_path / "sweep" / "results_table.csv").open()))
    assert [r["method"] for r in rows] == ["base", "residual_coarse"]
    assert (tmp_path / "sweep" / "results_table.md").is_file()


def _train_and_signal(tmp_path: Path, sig: int) -> subprocess.Popen:
    run = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w")
    p = subprocess.Popen([sys.executable, "-m", "residual_exp", *TINY, "trainer.max_epochs=100000",
                          "trainer.patience=100000", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run}"],
                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path))
    t0 = time.time()
    while not list(run.glob("checkpoints/*.ckpt")) and p.poll() is None and time.time() - t0 < 600:
        time.sleep(0.2)
    assert p.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
    time.sleep(1.0)
    p.send_signal(sig)
    p.wait(timeout=300)
    return p


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_job_exits_nonzero_and_stores_nothing(tmp_path, sig, code):
    p = _train_and_signal(tmp_path, sig)
    log = (tmp_path / "log.txt").read_text()
    assert p.returncode == code, log[-3000:]
    assert f"received {signal.Signals(sig).name}: stopping the job; no result is stored" in log
    assert not (tmp_path / "outputs" / "results").exists() or not list((tmp_path / "outputs" / "results").glob("*.json"))
    assert not (tmp_path / "run" / "results.json").exists()
