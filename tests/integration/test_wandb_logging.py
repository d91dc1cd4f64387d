"""W&B: offline without a key, never prompts, logs config (with the flat setting/* keys) / params /
curves / the per-epoch history / λ histograms / the summary row, and every job closes its run,
also when it fails, also in a shared process.  history.csv: one row per epoch, consistent with
the record; neither it nor W&B changes what is trained."""
from __future__ import annotations

import json
import os
import struct

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


def _wandb_run(run_dir) -> tuple[dict, list[dict], dict]:
    """``(config, history rows, summary)`` of the run's offline ``.wandb`` file, read with W&B's
    own protobuf records (the file is a leveldb-style log: 7-byte header, then 32 KiB blocks of
    records with a 7-byte header each: CRC32, little-endian length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = _wandb_records(run_dir)
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:                               # block trailer padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    config, history, summary = {}, [], {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = {"run": lambda: r.run.config.update, "config": lambda: r.config.update}.get(kind)
        if items:
            config.update({it.key: json.loads(it.value_json) for it in items()})
        elif kind == "history":
            history.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in r.history.item})
        elif kind == "summary":
            summary.update({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in r.summary.update})
    return config, history, summary


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

    # the flat setting/* keys W&B groups and filters on, the per-epoch history, the summary row
    config, history, summary = _wandb_run(run_dir)
    rec = json.loads((run_dir / "results.json").read_text())[1]
    assert {k: v for k, v in config.items() if k.startswith("setting/")} == {
        "setting/model": "tiny_clip", "setting/dataset": "shapes_shape", "setting/method": "residual_fine",
        "setting/seed": 0, "setting/units": "heads", "setting/rank": "evr=0.9", "setting/pca_reference": "reference",
        "setting/init": "normal", "setting/lr": 0.8, "setting/max_epochs": 3, "setting/num_classes": 6,
        "setting/units_convention": "official", "setting/classifier": "text", "setting/evr_rule": "strict",
        "setting/compat": "none", "setting/cache_layout": "lowrank", "setting/run_dir": str(run_dir),
        "setting/trainable_params": rec["trainable_params"], "setting/n_selected_units": 16,
        "setting/kept_components": rec["trainable_params"]}
    assert config["rank"]["evr"] == 0.9                      # the nested resolved config is there too
    csv_rows = [line.split(",") for line in (run_dir / "history.csv").read_text().splitlines()[1:]]
    logged = [h for h in history if "history/epoch" in h]
    assert [h["history/epoch"] for h in logged] == [int(r[0]) for r in csv_rows] == list(range(rec["epochs"]))
    assert [h["history/val_accuracy"] for h in logged] == [float(r[3]) for r in csv_rows]
    assert summary["final/test_accuracy"] == rec["test_accuracy"]
    assert summary["final/gain"] == pytest.approx(rec["test_accuracy"] - rec["zero_shot_test_accuracy"], abs=1e-12)
    assert summary["final/zero_shot_val_accuracy"] == rec["zero_shot_val_accuracy"]


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


def test_history_csv_matches_the_record_and_logging_changes_nothing(tmp_path, monkeypatch):
    """history.csv: one row per epoch run, its best val accuracy is the record's, at best_epoch;
    a run with W&B and a run with no logger and no history writer train the same λ."""
    from residual_exp.results import load_lambda, read_history
    from residual_exp.train.callbacks import HistoryWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    logged = _cfg(tmp_path, tmp_path / "logged")
    assert run(logged) == 0
    rec = json.loads((tmp_path / "logged" / "results.json").read_text())[1]
    hist = read_history(tmp_path / "logged")
    assert [h["epoch"] for h in hist] == list(range(rec["epochs"]))
    assert max(h["val_accuracy"] for h in hist) == rec["val_accuracy"]
    assert hist[rec["best_epoch"]]["val_accuracy"] == rec["val_accuracy"]
    assert all(h["train_loss"] > 0 and h["val_loss"] > 0 for h in hist)

    monkeypatch.setattr(HistoryWriter, "on_train_epoch_end", lambda *a, **k: None)
    bare = _cfg(tmp_path, tmp_path / "bare")
    with open_dict(bare):
        bare.logger = None
        bare.resume = False
    assert run(bare) == 0
    assert not (tmp_path / "bare" / "history.csv").exists() and not (tmp_path / "bare" / "wandb").exists()
    plain = json.loads((tmp_path / "bare" / "results.json").read_text())
    assert [{k: v for k, v in r.items() if k != "wall_seconds"} for r in plain] == [
        {k: v for k, v in r.items() if k != "wall_seconds"} for r in json.loads((tmp_path / "logged" / "results.json").read_text())]
    a, b = load_lambda(tmp_path / "bare"), load_lambda(tmp_path / "logged")  # (header order is not stable)
    assert a.meta == b.meta and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
