"""The seven adapters: parameter counts, exact identities, λ training on a planted signal."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from residual_exp.classifiers import ClassifierHead
from residual_exp.decompose.readout import DenseSource
from residual_exp.decompose.units import UnitLayout
from residual_exp.methods import SpectralReweighting
from residual_exp.spectral import GroupPCA, StreamingPCA
from tests.conftest import build_adapter_of


L, H, D = 2, 3, 8
LAYOUT = UnitLayout.vit(L, H)                      # 1 + 2·(3 + 1) + 2 = 11 units
U = len(LAYOUT)
SRC = DenseSource(LAYOUT, D, head_dim=D, width=D, dtype=torch.float64)     # every unit may span D dims


def _method(name, **kw):
    base = dict(name=name, units="heads", others="drop", evr=None, k=None, dropped_value=0.0, init="normal",
                lr=0.8, batch_size=64, weight_decay=0.0, grad_clip=None, cache=True)
    return OmegaConf.create({**base, **kw})


def _bases(units: torch.Tensor, feature: torch.Tensor, source=SRC):
    pu, po = GroupPCA(source), StreamingPCA(1, D)
    pu.update({"units": units, "feature": feature}); po.update(feature[:, None])
    return pu.finalize(), po.finalize()


def _sel(ub, kinds="heads"):
    idx = LAYOUT.indices(kinds)
    return idx, [(g, i, b) for g, i, b in ub.blocks(idx)]


def _batch(units, feature):
    return {"units": units, "feature": feature}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    # heads live in 2-d subspaces so that EVR pruning has something to prune
    basis = torch.randn(U, 2, D, generator=g, dtype=torch.float64)
    units = torch.einsum("nuk,ukd->nud", torch.randn(400, U, 2, generator=g, dtype=torch.float64), basis)
    units = units + 0.01 * torch.randn(400, U, D, generator=g, dtype=torch.float64)
    return units, units.sum(1)


def test_parameter_counts_match_the_formulas(data):
    units, feature = data
    ub, ob = _bases(units, feature)
    heads, mlps = L * H, L
    count = lambda name, **kw: build_adapter_of(_method(name, **kw), SRC, D, ub, ob).trainable_params()
    assert count("base") == 0
    assert count("linear_adapter", init="default") == D * D + D
    assert count("spectral_adapter") == D
    assert count("residual_coarse") == heads
    assert count("residual_full", units="heads+mlps", others="add") == (heads + mlps) * D
    kept = ub.select(LAYOUT.indices("heads")).prune(evr=0.9).kept()
    assert count("residual_fine", evr=0.9) == int(kept.sum()) < heads * D
    assert count("residual_fine", k=3) == heads * 3
    # rank-aware: heads of head_dim 2 keep 2 components each (the official accounting)
    narrow = DenseSource(LAYOUT, D, head_dim=2, width=D, dtype=torch.float64)
    ub2, _ = _bases(units, feature, narrow)
    full = build_adapter_of(_method("residual_full", units="heads+mlps", others="add"), narrow, D, ub2, ob)
    assert full.trainable_params() == heads * 2 + mlps * D


def test_lambda_one_all_components_reproduces_centred_units(data):
    units, feature = data
    ub, _ = _bases(units, feature)
    sel, blocks = _sel(ub, "heads+mlps")
    ad = SpectralReweighting(blocks, SRC, U, others="drop", init="ones").double()
    out = ad(**ad.prepare(_batch(units, feature)))
    expected = (units[:, sel] - ub.mean[sel]).sum(1)
    assert (out - expected).abs().max() <= 1e-10
    # others="add" puts the rest back unchanged: feature minus the selected units' means
    ad = SpectralReweighting(blocks, SRC, U, others="add", init="ones").double()
    out = ad(**ad.prepare(_batch(units, feature)))
    assert (out - (feature - ub.mean[sel].sum(0))).abs().max() <= 1e-10


def test_dropped_value_one_passes_pruned_components_through(data):
    units, feature = data
    ub, _ = _bases(units, feature)
    sel, blocks = _sel(ub)
    blocks = [(g, i, b.prune(k=1)) for g, i, b in blocks]
    ad = SpectralReweighting(blocks, SRC, U, dropped_value=1.0, init="ones").double()
    assert ad.trainable_params() == len(sel)
    out = ad(**ad.prepare(_batch(units, feature)))
    assert (out - (units[:, sel] - ub.mean[sel]).sum(1)).abs().max() <= 1e-10


def test_init_options(data):
    units, feature = data
    ub, _ = _bases(units, feature)
    sel, blocks = _sel(ub)
    ad = SpectralReweighting(blocks, SRC, U, init="eigenvalues")
    lam = ad.lambdas()
    assert torch.allclose(lam[:, 0], torch.ones(len(sel), dtype=lam.dtype))  # normalised by the top one
    assert (lam[:, :-1] >= lam[:, 1:] - 1e-12).all()
    g = torch.Generator().manual_seed(0)
    lam = SpectralReweighting(blocks, SRC, U, init="normal", generator=g).lam
    lam = lam.detach()
    assert abs(float(lam.mean()) - 1) < 0.2 and abs(float(lam.std()) - 1) < 0.2
    with pytest.raises(ValueError, match="method.init"):
        SpectralReweighting(blocks, SRC, U, init="zeros")
    with pytest.raises(ValueError, match="method.others"):
        SpectralReweighting(blocks, SRC, U, others="keep")


def test_planted_signal_lambda_learns_the_informative_pc():
    """Labels live in PC 3 of head L1H1 only; every unit has its own random orthonormal basis.

    Bases come from a label-free reference sample (as ImageNet plays that role in the
    paper); the frozen head is ±(that PC).  Zero-shot sees the signal drowned in the other
    units' noise; ResiDual must give that PC the largest λ of its unit, well above the
    typical λ, and beat zero-shot.
    """
    g = torch.Generator().manual_seed(1)
    n, target, pc = 3000, LAYOUT.index("L1H1"), 3
    rot = torch.linalg.qr(torch.randn(U, D, D, generator=g, dtype=torch.float64))[0]  # [U, D, D]
    scales = torch.linspace(2.0, 0.5, D, dtype=torch.float64)

    def sample(signal: float):
        labels = torch.randint(0, 2, (n,), generator=g)
        coef = torch.randn(n, U, D, generator=g, dtype=torch.float64) * scales        # [n, U, K]
        coef[:, target, pc] += (2.0 * labels - 1) * signal
        return torch.einsum("nuk,ukd->nud", coef, rot.transpose(1, 2)), labels       # [n, U, D]

    reference, _ = sample(0.0)
    ub, _ = _bases(reference, reference.sum(1))
    units, labels = sample(5.0)
    feature = units.sum(1)
    d = ub.select([target]).components[0, pc]
    d = d * torch.sign(d @ rot[target][:, pc])                           # class 1 along +d
    head = ClassifierHead(torch.stack([-d, d]).float(), scale=10.0)
    zs = (head(feature.float()).argmax(-1) == labels).double().mean()
    sel, blocks = _sel(ub)
    ad = SpectralReweighting(blocks, SRC, U, init="ones").float()
    prep = {k: v.float() for k, v in ad.prepare(_batch(units.float(), feature.float())).items()}
    opt = torch.optim.Adam(ad.parameters(), lr=0.05)
    losses = []
    for _ in range(300):
        loss = F.cross_entropy(head(ad(**prep)), labels)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss))
    lam = ad.lambdas().abs().detach()
    t = sel.index(target)
    assert int(lam[t].argmax()) == pc, f"λ of {LAYOUT.names[target]}: {lam[t].tolist()}"
    assert lam[t, pc] > 2 * lam.median(), (float(lam[t, pc]), float(lam.median()))
    with torch.no_grad():
        acc = (head(ad(**prep)).argmax(-1) == labels).double().mean()
    assert losses[-1] < 0.5 * losses[0]
    assert acc > zs + 0.05 and acc > 0.98, (float(zs), float(acc))


def test_the_protocol_reports_what_each_adapter_trained(data):
    """λ file contents and logged λ come from the adapter itself (no name checks, no attribute probing)."""
    units, feature = data
    ub, ob = _bases(units, feature)
    fine = build_adapter_of(_method("residual_fine", evr=0.9), SRC, D, ub, ob)
    tensors, names = fine.lambda_state(LAYOUT)
    assert names == [LAYOUT.names[i] for i in LAYOUT.indices("heads")]
    assert torch.equal(tensors["lambda"][tensors["mask"]], fine.lam.detach())     # pruned entries hold 0
    assert torch.equal(fine.lambda_values(), fine.lam.detach().float())
    coarse = build_adapter_of(_method("residual_coarse"), SRC, D, ub, ob)
    assert coarse.lambda_state(LAYOUT)[0]["lambda"].shape == (L * H,) and coarse.lambda_values().shape == (L * H,)
    linear = build_adapter_of(_method("linear_adapter", init="identity"), SRC, D, ub, ob)
    assert linear.lambda_values() is None and set(linear.lambda_state(LAYOUT)[0]) == {"linear.weight", "linear.bias"}
    base = build_adapter_of(_method("base"), SRC, D, ub, ob)
    assert base.lambda_values() is None and base.lambda_state(LAYOUT) == ({}, [])
