"""Every config file composes; bad overrides fail at compose time naming the key."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.conftest import CONF, compose_cfg

GROUPS = ["model", "dataset", "method", "pca", "trainer", "logger", "task"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "task" and option == "analysis":
        overrides.append("analysis=" + _options("analysis")[0]) if (CONF / "analysis").exists() else None
    cfg = compose_cfg(overrides)
    OmegaConf.to_container(cfg.get(group) if group != "task" else cfg.task, resolve=False)
    if group == "method":
        assert cfg.method.name == option


def test_default_config_is_the_embedded_synthetic_run():
    cfg = compose_cfg([])
    assert (cfg.task.name, cfg.model.name, cfg.dataset.name, cfg.method.name) == \
        ("train", "tiny_clip", "shapes_shape", "residual_full")
    assert (cfg.units.name, list(cfg.units.kinds), cfg.rank.name) == ("heads_mlps", ["head", "mlp"], "all")
    assert cfg.rank.evr is None and cfg.rank.k is None and cfg.method.others == "add"
    assert cfg.pca.reference is None and cfg.pca.split == "reference"     # the target's own reference split


def test_method_presets_choose_their_units_and_rank_and_the_command_line_wins():
    fine = compose_cfg(["method=residual_fine"])
    assert (fine.units.name, fine.rank.name, fine.rank.evr) == ("heads", "evr90", 0.9)
    assert compose_cfg(["method=residual_fine", "rank.evr=0.95"]).rank.evr == 0.95
    assert compose_cfg(["method=residual_fine", "rank=k", "rank.k=4"]).rank.k == 4
    assert compose_cfg(["method=residual_full", "units=layers", "units.layers=[3,3]"]).units.layers == [3, 3]
    assert compose_cfg(["method=base"]).units.name == "output"
    assert "evr" not in fine.pca and "evr" not in fine.method                # pca says where, rank how many


def test_pca_imagenet_is_a_dataset_node_under_the_target_root():
    cfg = compose_cfg(["model=openclip_b", "dataset=cifar100", "dataset.root=/data", "pca=imagenet"])
    assert cfg.pca.reference.name == "imagenet" and cfg.pca.split == "train"
    assert cfg.pca.reference.root == "/data"           # the README example reads /data/imagenet
    other = compose_cfg(["pca=imagenet", "dataset@pca.reference=sun397"])
    assert other.pca.reference.name == "sun397"


def test_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["trainer.max_epoch=3"])
    assert "max_epoch" in str(e.value.__cause__ or e.value)


def test_unknown_key_in_a_group_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["method.lambda_init=ones"])
    assert "lambda_init" in str(e.value.__cause__ or e.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["trainer.max_epochs=many"])
    msg = str(e.value.__cause__ or e.value)
    assert "max_epochs" in msg and "many" in msg


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(Exception) as e:
        compose_cfg(["dataset=cifar11"])
    msg = str(e.value)
    assert "cifar11" in msg and "shapes_color" in msg


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(Exception) as e:
        compose_cfg(["model=clip_xl"])
    assert "clip_xl" in str(e.value) and "tiny_clip" in str(e.value)
