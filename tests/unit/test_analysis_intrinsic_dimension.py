"""The per-unit intrinsic-dimension layer (the estimators themselves: tests/unit/test_intrinsic_dim.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from residual_exp.analysis.intrinsic_dimension import layer_profiles, unit_dimensions

AMBIENT = 768


def _sphere(d: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 768]`` uniform on S^d ⊂ R^{d+1}, randomly rotated into 768 dims."""
    z = torch.randn(n, d + 1, generator=gen, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    q, _ = torch.linalg.qr(torch.randn(AMBIENT, d + 1, generator=gen, dtype=torch.float64))
    return z @ q.T


def _subspace(k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 768]`` Gaussian data spanning exactly a random k-dim subspace (equal variances)."""
    q, _ = torch.linalg.qr(torch.randn(AMBIENT, k, generator=gen, dtype=torch.float64))
    return torch.randn(n, k, generator=gen, dtype=torch.float64) @ q.T


@pytest.mark.parametrize("d,n", [(2, 2000), (5, 2000), (10, 4000)])   # TwoNN's variance grows with d
def test_unit_table_twonn_recovers_sphere_dimension(d: int, n: int) -> None:
    gen = torch.Generator().manual_seed(d)
    units = _sphere(d, n, gen)[:, None]                                          # [n, 1, 768]
    (row,) = unit_dimensions(units.numpy(), [f"s{d}"], threshold=0.99)
    assert row["twonn"] == pytest.approx(d, rel=0.10)
    assert row["linear_dim"] == d + 1          # S^d spans d+1 directions with equal variance
    assert row["ratio"] == pytest.approx(row["linear_dim"] / row["twonn"])
    assert row["n_samples"] == n and row["n_distinct"] == n and row["note"] == ""


def test_unit_table_linear_dim_of_subspaces_and_constant_unit() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 1000
    units = torch.stack([_subspace(3, n, gen), _subspace(7, n, gen),
                         torch.ones(n, AMBIENT, dtype=torch.float64)], dim=1)  # [n, 3, 768]
    rows = unit_dimensions(units, ["p3", "p7", "const"], kinds=["head", "head", "const"],
                           layers=[0, 1, -1], heads=[0, 0, -1], threshold=0.99)
    by = {r["unit"]: r for r in rows}
    # data in a k-dim subspace with equal variances: 99% of the variance needs all k PCs
    assert by["p3"]["linear_dim"] == 3 and by["p7"]["linear_dim"] == 7
    assert by["p3"]["twonn"] == pytest.approx(3, rel=0.15)
    assert (by["p7"]["kind"], by["p7"]["layer"], by["p7"]["head"]) == ("head", 1, 0)
    c = by["const"]
    assert c["linear_dim"] == 0 and math.isnan(c["twonn"]) and math.isnan(c["ratio"]) and c["note"] == "constant unit"


def test_duplicates_and_indices() -> None:
    gen = torch.Generator().manual_seed(1)
    x = _sphere(3, 1500, gen)
    dup = torch.cat([x, x[:500]])                          # 500 exact duplicates
    units = torch.stack([dup, dup * 2.0], 1)               # [2000, 2, 768]
    rows = unit_dimensions(units, ["a", "b"], indices=[1])
    assert [r["unit"] for r in rows] == ["b"]
    assert rows[0]["n_samples"] == 2000 and rows[0]["n_distinct"] == 1500
    assert np.isfinite(rows[0]["twonn"]) and rows[0]["twonn"] == pytest.approx(3, rel=0.15)


def test_layer_profiles_average_heads_only() -> None:
    rows = [
        {"unit": "L0H0", "kind": "head", "layer": 0, "linear_dim": 4, "twonn": 2.0, "ratio": 2.0},
        {"unit": "L0H1", "kind": "head", "layer": 0, "linear_dim": 6, "twonn": float("nan"), "ratio": float("nan")},
        {"unit": "L0.mlp", "kind": "mlp", "layer": 0, "linear_dim": 100, "twonn": 50.0, "ratio": 2.0},
        {"unit": "L1H0", "kind": "head", "layer": 1, "linear_dim": 8, "twonn": 4.0, "ratio": 2.0},
        {"unit": "embed", "kind": "embed", "layer": -1, "linear_dim": 0, "twonn": float("nan"), "ratio": float("nan")},
    ]
    prof = layer_profiles(rows)
    assert [p["layer"] for p in prof] == [0, 1] and all(p["num_layers"] == 2 for p in prof)
    assert prof[0]["n_units"] == 2 and prof[0]["linear_mean"] == 5 and prof[0]["twonn_mean"] == 2.0
    assert prof[1]["linear_mean"] == 8 and prof[1]["ratio_std"] == 0
    mlp = layer_profiles(rows, kind="mlp")
    assert [p["linear_mean"] for p in mlp] == [100]


def test_intrinsic_dimension_end_to_end(make_cfg, tmp_path) -> None:
    from tests.conftest import TINY_DATA
    from residual_exp.run import run
    cfg = make_cfg(["task=analysis", "analysis=intrinsic_dimension", "model.pretrained=null", "logger=none",
                    "analysis.max_samples=150", "analysis.progress=false",
                    "analysis.models=[tiny_clip,{name:tiny_clip,label:again}]", *TINY_DATA])
    assert run(cfg) == 0
    out = tmp_path / "run"
    for f in ("intrinsic_dimension.csv", "intrinsic_dimension.md", "id_profiles.csv", "id_profiles.md",
              "id_profiles.png", "id_heads.png"):
        assert (out / f).is_file(), f
    import csv
    rows = list(csv.DictReader(open(out / "intrinsic_dimension.csv")))
    # tiny CLIP: 4 layers × (4 heads + MLP) = 20 units per model, two models
    assert len(rows) == 40 and {r["model"] for r in rows} == {"tiny_clip", "again"}
    assert all(0 < int(r["linear_dim"]) <= 64 and 0 < float(r["twonn"]) < 64 for r in rows)
    prof = list(csv.DictReader(open(out / "id_profiles.csv")))
    assert len(prof) == 8 and {int(p["n_units"]) for p in prof} == {4}
