"""Under SLURM (submitit launches through srun) Lightning must not requeue: submitit does."""
from __future__ import annotations

import signal

import lightning.pytorch as pl
import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment

from residual_exp.train.fit import _no_requeue_plugins

SRUN_ENV = {"SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "residual_exp", "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}


@pytest.fixture
def slurm(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    return lambda **env: [monkeypatch.setenv(k, v) for k, v in {**SRUN_ENV, **env}.items()]


def test_no_plugin_outside_slurm(slurm):
    assert _no_requeue_plugins() == []


def test_srun_job_gets_slurm_environment_without_auto_requeue(slurm):
    slurm()
    (env,) = _no_requeue_plugins()
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    before = signal.getsignal(signal.SIGUSR1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[env], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, max_epochs=1)
    assert trainer._accelerator_connector.cluster_environment is env
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) == before         # Lightning installed no requeue handler
    finally:
        trainer._signal_connector.teardown()


def test_interactive_allocation_is_left_to_lightning(slurm):
    """salloc/srun --pty shells (job name bash/interactive) are not SLURM-managed training:
    forcing SLURMEnvironment there would make one process wait for SLURM_NTASKS ranks."""
    slurm(SLURM_JOB_NAME="interactive", SLURM_NTASKS="4")
    assert _no_requeue_plugins() == []
