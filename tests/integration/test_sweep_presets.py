"""Experiment presets: the paper's 70 pairs, the sweep grids, the SLURM launcher (compose only)."""
from __future__ import annotations

import importlib.util
import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import CONF, ROOT, compose_cfg

spec = importlib.util.spec_from_file_location("gen_experiments", ROOT / "scripts" / "gen_experiments.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)


def sweep_cells(preset: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for ``-m +experiment=<preset> *extra``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    # exactly what BasicSweeper.sweep does: preset params first, command-line arguments after
    overrides = OverridesParser.create().parse_overrides(params + [f"+experiment={preset}", *extra])
    return BasicSweeper.split_arguments(overrides, None)[0]


def cell(job: list[str]) -> tuple[str, str, str]:
    d = dict(o.split("=", 1) for o in job)
    return d["model"], d["dataset"], d["method"]


def test_generated_presets_are_committed_and_current():
    for rel, text in gen.presets().items():
        path = CONF / "experiment" / rel
        assert path.exists(), f"{rel} missing: run scripts/gen_experiments.py"
        assert path.read_text() == text, f"{rel} is stale: run scripts/gen_experiments.py"
    assert len(list((CONF / "experiment" / "paper").glob("*.yaml"))) == 70


def test_the_paper_grid_expands_to_70_pairs_times_7_methods():
    cells = [cell(j) for j in sweep_cells("sweep/paper")]
    assert len(cells) == len(set(cells)) == 490
    assert {(m, d) for m, d, _ in cells} == set(itertools.product(gen.MODELS, gen.DATASETS))
    assert {me for *_, me in cells} == set(gen.METHODS)


def _check_paper_cell(cfg, model, dataset, method):
    assert (cfg.model.name, cfg.dataset.name, cfg.method.name) == (model, dataset, method)
    assert cfg.pca.reference.name == "imagenet" and cfg.pca.split == "train"      # bases on ImageNet train
    assert cfg.logger._target_.endswith("WandbLogger")
    assert cfg.resume is True
    if method == "residual_fine":
        assert cfg.rank.evr == 0.9              # the method preset still applies on top of pca=imagenet


def test_every_pair_of_the_paper_grid_composes():
    """All 70 (model, dataset) pairs compose as real configs (one method each; the methods are
    composed against every pair by the slow test below)."""
    jobs = sweep_cells("sweep/paper")
    methods = itertools.cycle(gen.METHODS)
    seen = set()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs:
            model, dataset, _ = cell(job)
            if (model, dataset) in seen:
                continue
            seen.add((model, dataset))
            method = next(methods)
            overrides = [o for o in job if not o.startswith("method=")] + [f"method={method}"]
            _check_paper_cell(compose("config", overrides=overrides), model, dataset, method)
    assert len(seen) == 70


@pytest.mark.slow
def test_every_cell_of_the_paper_grid_composes():
    jobs = sweep_cells("sweep/paper")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs:
            _check_paper_cell(compose("config", overrides=job), *cell(job))
    assert len(jobs) == 490


@pytest.mark.parametrize("model", gen.MODELS)
def test_per_model_slices(model):
    cells = [cell(j) for j in sweep_cells(f"sweep/paper_{model}")]
    assert len(cells) == 70 and {m for m, *_ in cells} == {model}


@pytest.mark.parametrize("method", gen.METHODS)
def test_per_method_slices(method):
    cells = [cell(j) for j in sweep_cells(f"sweep/paper_{method}")]
    assert len(cells) == 70 and {me for *_, me in cells} == {method}


def test_command_line_overrides_win_over_sweep_params():
    cells = [cell(j) for j in sweep_cells("sweep/paper", ("model=clip_b", "dataset=cifar10,svhn"))]
    assert set(cells) == {("clip_b", d, m) for d in ("cifar10", "svhn") for m in gen.METHODS}
    job = sweep_cells("sweep/paper", ("model=clip_b", "trainer.max_epochs=3", "pca=target"))[0]
    cfg = compose_cfg(job)
    assert cfg.trainer.max_epochs == 3 and cfg.pca.reference is None and cfg.pca.split == "train"


def test_single_run_presets():
    cfg = compose_cfg(["+experiment=paper/openclip_l_cifar10"])
    assert (cfg.model.name, cfg.dataset.name, cfg.pca.reference.name) == ("openclip_l", "cifar10", "imagenet")
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.method.name == "residual_full"
    cfg = compose_cfg(["+experiment=paper/dinov2_l_svhn", "method=residual_fine", "logger=none"])
    assert (cfg.model.name, cfg.dataset.name, cfg.rank.evr, cfg.logger._target_) == ("dinov2_l", "svhn", 0.9, None)


def test_synthetic_grid_is_offline_and_cpu_sized():
    jobs = sweep_cells("sweep/synthetic")
    cells = [cell(j) for j in jobs]
    assert {m for m, *_ in cells} == {"tiny_clip"}
    assert len({d for _, d, _ in cells}) >= 3 and {me for *_, me in cells} == set(gen.METHODS)
    for job in jobs[:: len(gen.METHODS)]:
        cfg = compose_cfg(job)
        assert cfg.dataset.name.startswith("shapes_") and cfg.trainer.max_epochs <= 5
        assert cfg.logger._target_.endswith("CSVLogger") and cfg.pca.reference is None


def test_slurm_launcher_config_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    """Hand conf/hydra/launcher/slurm.yaml to submitit exactly as SlurmLauncher.launch does and
    check the sbatch script it would submit (a stub `srun` stands in for the cluster)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf, open_dict

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=sweep/paper", "hydra/launcher=slurm",
                                           "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.array_parallelism > 0
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    init_keys = {"submitit_folder", "max_num_timeout"}
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in init_keys})
    text = executor._executor._make_submission_file_text("python -m residual_exp", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --nodes=1", "#SBATCH --signal=USR2@120", "srun "):
        assert line in text, text


def test_submitit_local_launcher_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=sweep/synthetic", "hydra/launcher=submitit_local"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
