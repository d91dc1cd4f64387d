"""The `analysis` config group: every option composes against its schema; bad keys fail at compose time."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from residual_exp.analysis.config import ANALYSES, SCHEMAS
from tests.conftest import CONF, compose_cfg


def test_the_group_holds_the_four_analyses() -> None:
    assert sorted(p.stem for p in (CONF / "analysis").glob("*.yaml")) == sorted(ANALYSES)
    assert sorted(SCHEMAS) == sorted(f"{a}_schema" for a in ANALYSES)


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
    from residual_exp.tasks.analysis import model_nodes
    nodes = model_nodes(cfg, cfg.analysis.models)
    assert [l for l, _ in nodes] == ["tiny_clip", "random"]
    assert nodes[0][1].pretrained == "embedded" and nodes[1][1].pretrained is None
