"""W&B: offline without a key, never prompts, logs config / params / curves / λ histograms /
final metrics, and every job closes its run, also when it fails, also in a shared process."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import open_dict

from residual_exp.methods import LinearAdapter
from residual_exp.methods.base import Adapter
from residual_exp.run import run
from residual_exp.train.callbacks import LambdaMonitor, trained_lambdas
from tests.conftest import compose_cfg
from tests.integration.sweep_helpers import TINY, cli, cli_env


class _Spectral(Adapter):
    """An adapter whose trained λ are [1, -2, 3] (the protocol: lambda_values, trainable_params)."""

    def __init__(self):
        super().__init__()
        self.lam = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))

    def lambda_values(self):
        return self.lam.detach()


class _Logger:
    def __init__(self):
        self.metrics, self.hparams = [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))

    def log_hyperparams(self, params):
        self.hparams.append(params)


class _Trainer:
    def __init__(self, logger):
        self.loggers, self.global_step, self.current_epoch, self.sanity_checking = [logger], 7, 2, False


def test_lambda_monitor_logs_trained_lambdas_and_parameter_count():
    module = torch.nn.Module()
    module.adapter = _Spectral()
    assert trained_lambdas(module.adapter).tolist() == [1.0, -2.0, 3.0]
    assert trained_lambdas(LinearAdapter(2)) is None                            # no λ to log

    logger = _Logger()
    cb, trainer = LambdaMonitor(), _Trainer(logger)
    cb.on_fit_start(trainer, module)
    cb.on_validation_epoch_end(trainer, module)
    assert logger.hparams == [{"trainable_params": 3}]
    assert len(logger.metrics) == 2
    step, m = logger.metrics[-1]
    assert step == 7 and m["lambda/min"] == -2.0 and m["lambda/max"] == 3.0
    assert m["lambda/frac_negative"] == pytest.approx(1 / 3)


def _wandb_records(run_dir):
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    return runs[0].read_bytes()


def test_cli_logs_offline_without_a_key_and_never_prompts(tmp_path):
    """No WANDB_* variables, no ~/.netrc, stdin closed: offline, and everything is in the run."""
    env = cli_env(tmp_path, HOME=str(tmp_path / "home"))
    env.pop("WANDB_MODE")
    (tmp_path / "home").mkdir()
    run_dir = tmp_path / "run"
    cli(["logger=wandb", "method=residual_fine", *TINY, f"hydra.run.dir={run_dir}"], tmp_path, env=env)
    blob = _wandb_records(run_dir)
    for key in (b"lambda/hist", b"histogram", b"trainable_params", b"train/loss", b"val/acc",
                b"final/test_accuracy", b"tiny_clip-shapes_shape-residual_fine-s0",     # run name
                b"tiny_clip-shapes_shape", b"residual_exp", b"n_reference"):           # group, project, config
        assert key in blob, key


def _cfg(tmp_path, run_dir):
    cfg = compose_cfg(["logger=wandb", "method=residual_coarse", *TINY], tmp_path)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(run_dir)
        cfg.trainer.progress_bar = False
    return cfg


def test_jobs_sharing_a_process_finish_their_runs_even_on_failure(tmp_path, monkeypatch):
    import wandb

    from residual_exp.train.module import AdapterModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    # a job that dies in the middle of training, with its W&B run open
    def boom(self, batch, batch_idx):
        raise RuntimeError("boom")
    with monkeypatch.context() as m:
        m.setattr(AdapterModule, "validation_step", boom)
        with pytest.raises(RuntimeError, match="boom"):
            run(_cfg(tmp_path, tmp_path / "failed"))
    assert wandb.run is None
    assert (tmp_path / "failed" / "wandb").is_dir() and not (tmp_path / "failed" / "results.json").exists()

    # a run left open by someone else in this process is closed before the next job starts
    wandb.init(mode="offline", dir=str(tmp_path), project="stray")
    assert wandb.run is not None
    assert run(_cfg(tmp_path, tmp_path / "ok")) == 0
    assert wandb.run is None
    assert _wandb_records(tmp_path / "ok") != _wandb_records(tmp_path / "failed")
    assert os.path.exists(tmp_path / "ok" / "results.json")
