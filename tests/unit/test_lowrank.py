"""Exact low-rank storage: units, bases and every method's inputs rebuilt from per-head z, the
projected embedding/MLPs and the final norm's statistics equal the dense ``[N, U, D]`` path —
≤ 1e-10 in float64, ≤ 1e-6 relative in float32 — for each backbone family and convention."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from residual_exp.encode import Encoded, _np_dtype, source_for, storage_arrays
from residual_exp.spectral import GroupPCA, StreamingPCA
from tests.conftest import build_adapter_of
from tests.unit.test_decompose_tiny import images, tiny_blip_backbone, tiny_open_clip_backbone, tiny_timm_backbone
from tests.unit.test_fidelity import _perturb


FAMILIES = {"open_clip": lambda: tiny_open_clip_backbone(), "timm_layerscale": lambda: tiny_timm_backbone(init_values=0.5),
            "blip": lambda: tiny_blip_backbone()}
METHODS = [("residual_full", "heads+mlps", "add", None), ("residual_fine", "heads", "drop", 0.9),
           ("residual_coarse", "heads", "mean", None), ("residual_coarse", "heads+mlps", "add", None),
           ("spectral_adapter", "output", "drop", None), ("linear_adapter", "output", "drop", None)]


def _encoded(bb, x, layout, dtype):
    with torch.no_grad():
        arrays = storage_arrays(bb, x, layout)
    name = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}[dtype]
    arrays = {k: v.double().numpy().astype(_np_dtype(k, name)) for k, v in arrays.items()}   # as the cache stores them
    return Encoded(arrays, np.zeros(len(x), dtype=np.int64), layout, source_for(bb, layout))


def _bases(bb, enc):
    gp, po = GroupPCA(enc.source), StreamingPCA(1, bb.output_dim)
    b = enc.batch(slice(None))
    gp.update(b)
    po.update(b["feature"][:, None].double())
    return gp.finalize(), po.finalize()


@pytest.fixture(scope="module", params=[(f, c) for f in FAMILIES for c in ("official", "centred")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def encodings(request):
    family, convention = request.param
    bb = FAMILIES[family]()
    _perturb(bb)
    bb.use_convention(convention)
    x = images(120, bb.image_size, seed=1)                                  # more images than D: full-rank bases
    return bb, {layout: _encoded(bb, x, layout, torch.float64) for layout in ("lowrank", "dense")}, x


def test_units_are_rebuilt_exactly(encodings):
    bb, enc, _ = encodings
    low, dense = enc["lowrank"], enc["dense"]
    np.testing.assert_allclose(low.units[:], dense.units[:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(low.units[:].sum(1), low.features, rtol=0, atol=1e-10)
    idx = [0, 3, len(bb.layout) - 1]
    np.testing.assert_allclose(low.units[5:9, idx], dense.arrays["units"][5:9][:, idx], rtol=0, atol=1e-10)
    b = low.batch(slice(0, 17))
    for sel in (bb.layout.indices("heads"), bb.layout.indices("mlps"), list(range(len(bb.layout)))):
        want = dense.arrays["units"][:17][:, sel].sum(1)
        assert np.abs(low.source.sum_units(b, sel).numpy() - want).max() <= 1e-10


def test_bases_from_lifted_statistics_equal_the_dense_pca(encodings):
    bb, enc, _ = encodings
    (ub_l, ob_l), (ub_d, ob_d) = _bases(bb, enc["lowrank"]), _bases(bb, enc["dense"])
    assert ub_l.groups.keys() == ub_d.groups.keys()
    for g in ub_l.groups:
        bl, bd = ub_l.groups[g][1], ub_d.groups[g][1]
        assert bl.components.shape == bd.components.shape                  # same rank-aware K
        assert (bl.mean - bd.mean).abs().max() <= 1e-10
        assert (bl.eigenvalues - bd.eigenvalues).abs().max() <= 1e-10 * bd.eigenvalues.max()
        # components up to sign: the projectors onto each leading direction agree
        cos = torch.einsum("skd,skd->sk", bl.components, bd.components).abs()
        strong = bd.eigenvalues > 1e-6 * bd.eigenvalues[:, :1]
        assert (cos[strong] - 1).abs().max() <= 1e-8


@pytest.mark.parametrize("method,units,others,evr", METHODS)
def test_every_method_sees_the_same_inputs(encodings, method, units, others, evr):
    bb, enc, _ = encodings
    (ub, ob) = _bases(bb, enc["dense"])
    cfg = OmegaConf.create(dict(name=method, units=units, others=others, evr=evr, k=None, dropped_value=0.0,
                                init="default" if method == "linear_adapter" else "normal", lr=0.8,
                                batch_size=64, weight_decay=0.0, grad_clip=None, cache=True))
    outs = {}
    for layout, e in enc.items():
        ad = build_adapter_of(cfg, e.source, bb.output_dim, ub, ob, seed=0).double()
        if method == "linear_adapter":
            torch.manual_seed(0)
            ad = build_adapter_of(cfg, e.source, bb.output_dim, ub, ob, seed=0).double()
        with torch.no_grad():
            outs[layout] = ad(**ad.prepare(e.batch(slice(None))))
    scale = outs["dense"].abs().max()
    assert (outs["lowrank"] - outs["dense"]).abs().max() <= 1e-10 * max(1.0, float(scale))


def test_float32_storage_is_within_1e_6(encodings):
    bb, enc, x = encodings
    low32 = _encoded(bb.float(), x.float(), "lowrank", torch.float32)
    try:
        got, want = low32.units[:], enc["dense"].arrays["units"]
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-6, rel
    finally:
        bb.double()


def test_cache_bytes_per_image():
    """Per image, low-rank = L·H·Dh + (1+L)·D (+ scalars) values instead of U·D."""
    bb = tiny_open_clip_backbone()
    x = images(4, bb.image_size)
    low, dense = _encoded(bb, x, "lowrank", torch.float16), _encoded(bb, x, "dense", torch.float16)
    L, H, D, Dh = bb.num_layers, bb.num_heads, bb.output_dim, bb.readout().head_dim
    assert low.arrays["z"].shape[1:] == (L * H, Dh) and low.arrays["vec"].shape[1:] == (1 + L, D)
    assert low.arrays["stats"].dtype == np.float32 and low.arrays["z"].dtype == np.float16
    per_image = lambda e: e.nbytes / len(e)
    assert per_image(low) == 2 * (L * H * Dh + (1 + L) * D + D) + 4 * (2 + 1 + L)
    assert per_image(dense) == 2 * (len(bb.layout) * D + D)
