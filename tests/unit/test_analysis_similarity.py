"""The spectral-similarity analysis layer: per-head grids, tables, cross-model profiles.

(The spectral cosine itself — 1 for identical, sign/order invariant, 0 for orthogonal — is
tested in tests/unit/test_similarity.py.)
"""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from residual_exp.analysis.similarity import (cross_model_grid, dataset_similarity, grid_of, layer_profile,
                                              profile_correlation, similarity_rows)
from residual_exp.decompose.units import UnitLayout
from residual_exp.spectral import StreamingPCA


def _basis(x: torch.Tensor):
    pca = StreamingPCA(x.shape[1], x.shape[2])
    pca.update(x)
    return pca.finalize()


def _units(n: int, layout: UnitLayout, d: int, gen: torch.Generator, rank: int = 3) -> torch.Tensor:
    """``[n, U, d]``: each unit spans its own random rank-``rank`` subspace (decreasing variances)."""
    out = []
    for _ in range(len(layout)):
        q, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
        scale = torch.tensor([3.0, 2.0, 1.0][:rank], dtype=torch.float64)
        out.append((torch.randn(n, rank, generator=gen, dtype=torch.float64) * scale) @ q.T)
    return torch.stack(out, 1)


def test_grid_of_places_heads_and_leaves_nan() -> None:
    g = grid_of([0.1, 0.2, 0.3], layers=[0, 1, 1], heads=[1, 0, 1], num_layers=2, num_heads=2)
    assert g.shape == (2, 2) and math.isnan(g[0, 0])
    assert (g[0, 1], g[1, 0], g[1, 1]) == (0.1, 0.2, 0.3)
    assert layer_profile(g).tolist() == pytest.approx([0.1, 0.25])


def test_dataset_similarity_table_and_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    layout = UnitLayout.vit(2, 3)                               # embed, 2×(3 heads + mlp), 2 const
    d = 16
    x = _units(400, layout, d, gen)
    ref = _basis(x)
    same = _basis(x[torch.randperm(400, generator=gen)] * -1.0)  # same data, reordered, sign flipped
    # "other dataset": heads of layer 1 get a fresh random subspace
    y = x.clone()
    heads = layout.indices("heads")
    changed = [i for i in heads if layout.layers[i] == 1]
    y[:, changed] = _units(400, layout, d, gen)[:, changed]
    other = _basis(y)
    for weighted in (True, False):
        s_same = dataset_similarity(ref, same, heads, weighted, evr=0.9)
        assert s_same.shape == (6,) and np.allclose(s_same, 1.0, atol=1e-6)
        s_other = dataset_similarity(ref, other, heads, weighted, evr=0.9)
        kept = [p for p, i in enumerate(heads) if i not in changed]
        moved = [p for p, i in enumerate(heads) if i in changed]
        assert np.allclose(s_other[kept], 1.0, atol=1e-6)
        assert (s_other[moved] < 0.9).all()
        names = [layout.names[i] for i in heads]
        rows = similarity_rows("m", "ds", "weighted" if weighted else "unweighted", names,
                               [layout.layers[i] for i in heads], [layout.heads[i] for i in heads], s_other)
        assert [r["unit"] for r in rows] == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
        g = grid_of([r["similarity"] for r in rows], [r["layer"] for r in rows], [r["head"] for r in rows], 2, 3)
        assert np.allclose(g[0], 1.0, atol=1e-6) and (g[1] < 0.9).all()
        prof = layer_profile(g)
        assert prof[0] == pytest.approx(1.0) and prof[1] < 0.9


def test_profile_correlation_and_resampling() -> None:
    a = {"ds1": np.array([1.0, 0.9, 0.5, 0.6]), "ds2": np.array([0.9, 0.8, 0.4, 0.5])}
    b = {"ds1": np.array([1.0, 0.9, 0.5, 0.6]) * 0.5 + 0.2, "ds2": np.array([0.9, 0.8, 0.4, 0.5]) * 0.5 + 0.2}
    c = {"ds1": np.interp(np.linspace(0, 1, 7), np.linspace(0, 1, 4), a["ds1"])}     # deeper model
    rows = profile_correlation({"a": a, "b": b, "c": c})
    by = {(r["model_a"], r["model_b"]): r for r in rows}
    assert by[("a", "b")]["pearson_r"] == pytest.approx(1.0) and by[("a", "b")]["n_values"] == 8
    assert by[("a", "c")]["datasets"] == "ds1" and by[("a", "c")]["n_values"] == 4
    assert by[("a", "c")]["pearson_r"] == pytest.approx(1.0, abs=0.05)


def test_cross_model_raw_needs_a_common_space() -> None:
    gen = torch.Generator().manual_seed(1)
    layout = UnitLayout.vit(1, 2)
    ba = _basis(_units(200, layout, 8, gen))
    bb = _basis(_units(200, layout, 6, gen))
    with pytest.raises(ValueError, match="different spaces"):
        cross_model_grid(ba, [1, 2], bb, [1, 2], True, 0.9)
    g = cross_model_grid(ba, [1, 2], ba, [1, 2], True, 0.9)
    assert g.shape == (2, 2) and np.allclose(np.diag(g), 1.0, atol=1e-6)


def test_spectral_similarity_end_to_end(make_cfg, tmp_path) -> None:
    from tests.conftest import TINY_DATA
    from residual_exp.run import run
    cfg = make_cfg(["task=analysis", "analysis=spectral_similarity", "model.pretrained=null", "logger=none",
                    "analysis.progress=false", "analysis.max_samples=100", "analysis.units=heads+mlps",
                    "analysis.models=[tiny_clip,{name:tiny_clip,label:twin}]",
                    "analysis.datasets=[shapes_shape,{name:shapes_color,label:other_seed,params:{seed:3,n_test:100}}]",
                    *TINY_DATA])
    assert run(cfg) == 0
    out = tmp_path / "run"
    for f in ("similarity.csv", "similarity.md", "similarity_summary.csv", "similarity_tiny_clip.png",
              "similarity_twin.png", "similarity_profiles.png", "cross_model.csv"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "similarity.csv")))
    # 2 models × 2 datasets × 2 variants × 20 units (16 heads + 4 MLPs)
    assert len(rows) == 160
    assert all(0.0 <= float(r["similarity"]) <= 1.0 for r in rows)
    assert {r["reference"] for r in rows} == {"shapes_shape/reference"}
    cross = list(csv.DictReader(open(out / "cross_model.csv")))
    # the same model twice: identical profiles
    assert len(cross) == 1 and float(cross[0]["pearson_r"]) == pytest.approx(1.0)
    # raw mode (same output space here: the same weights twice) → every head matches itself
    cfg.analysis.cross_model = "raw"
    cfg.analysis.variants = ["weighted"]
    assert run(cfg) == 0
    raw = list(csv.DictReader(open(out / "cross_model.csv")))
    assert len(raw) == 16 and all(float(r["same_name"]) == pytest.approx(1.0) for r in raw)
    assert (out / "cross_model_tiny_clip_twin.png").is_file()
