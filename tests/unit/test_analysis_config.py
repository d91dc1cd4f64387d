"""The `analysis` config group: every option composes against its schema; bad keys fail at compose time."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from residual_exp.analysis.config import ANALYSES
from tests.conftest import CONF, compose_cfg


def test_the_group_holds_the_four_analyses() -> None:
    assert sorted(p.stem for p in (CONF / "analysis").glob("*.yaml")) == sorted(ANALYSES)


@pytest.mark.parametrize("name", ANALYSES)
def test_each_analysis_composes_with_task_analysis(name: str) -> None:
    cfg = compose_cfg(["task=analysis", f"analysis={name}"])
    assert cfg.task.name == "analysis" and cfg.analysis.name == name
    assert list(cfg.analysis.models) == []


def test_no_analysis_by_default() -> None:
    assert compose_cfg(["task=analysis"]).analysis is None
    assert compose_cfg([]).analysis is None


@pytest.mark.parametrize("override,key", [("analysis.max_sample=3", "max_sample"),
                                          ("analysis.max_samples=many", "max_samples"),
                                          ("analysis.keep_fractions=[half]", "keep_fractions")])
def test_bad_keys_fail_naming_them(override: str, key: str) -> None:
    name = "coarse_selection"
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["task=analysis", f"analysis={name}", override])
    assert key in str(e.value.__cause__ or e.value)


def test_models_accept_names_and_override_dicts() -> None:
    cfg = compose_cfg(["task=analysis", "analysis=intrinsic_dimension",
                       "analysis.models=[tiny_clip,{name:tiny_clip,pretrained:null,label:random}]"])
    from residual_exp.compose import entry_nodes
    nodes = entry_nodes(cfg.analysis.models, "model", cfg)
    assert [l for l, _ in nodes] == ["tiny_clip", "random"]
    assert nodes[0][1].pretrained == "embedded" and nodes[1][1].pretrained is None


def test_other_models_and_datasets_are_composed_by_hydra_with_the_job_paths() -> None:
    from residual_exp.compose import entry_nodes, group_node
    cfg = compose_cfg(["task=analysis", "analysis=spectral_similarity", "paths.data_dir=/somewhere",
                       "analysis.models=[clip_b,{name:vit_l,image_size:112}]"])
    (_, clip), (label, vit) = entry_nodes(cfg.analysis.models, "model", cfg)
    assert (clip.family, clip.arch, clip.params.quick_gelu) == ("open_clip", "ViT-B-16", True)
    assert (label, vit.family, vit.image_size) == ("vit_l(image_size=112)", "timm", 112)
    assert group_node("dataset", "cifar10", cfg).root == "/somewhere"          # ${paths.data_dir} of this job
    with pytest.raises(KeyError, match="model='nope'.*clip_b"):
        group_node("model", "nope", cfg)
