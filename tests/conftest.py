"""Shared fixtures: compose the real Hydra configs (as the CLI does) for tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from residual_exp.config import register_configs

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "residual_exp" / "conf"
os.environ.setdefault("WANDB_MODE", "offline")
register_configs()

# tiny synthetic sizes for fast end-to-end runs
TINY_DATA = ["dataset.params.n_train=200", "dataset.params.n_val=100", "dataset.params.n_test=100",
             "dataset.params.n_reference=200"]


def build_adapter_of(method, *args, **kwargs):
    """``build_adapter`` for a hand-made method node that carries its units and rank itself
    (``{name, units: heads, evr: 0.9, k: null, …}``), as the unit tests write them."""
    from residual_exp.methods import build_adapter
    return build_adapter(method, *args, units=method.units, rank=method, **kwargs)


def compose_cfg(overrides: list[str], tmp_path: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(tmp_path)          # the results store lives under it
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            cfg.cache.dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    return lambda overrides=(): compose_cfg(list(overrides), tmp_path)
