"""Formula-for-formula equivalence with what the official ResiDual code computes.

Every expected value here is re-derived in the test from the published formulas (float64, tiny
random models with perturbed biases and norms), never by importing the authors' code:

* units under the official convention: ``γ⊙c_u/σ − (γ⊙µ/σ − β)/N_u`` through the output
  projection (BLIP: with ``b_P/N_u``), ``N_u = 2L+1`` (embedding, MLPs), ``(2L+1)·H`` (heads,
  which carry ``b_O/H``; LayerScale applied to the head + bias share);
* the prototype classifier: ``normalize(x) · µ_c`` with raw class means;
* the EVR rule: smallest k with cumulative EVR ``>`` the threshold (``compat=official``: k = 1
  when never reached);
* the compat adapters: (a) ``(f − µ) ⊙ λ``; (b) the official einsums over zero-padded square
  bases; (d) the batch mean of the ablated units;
* the official parameter accounting and the paper presets' protocol.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from residual_exp.classifiers import ClassifierHead, class_means
from residual_exp.decompose.readout import DenseSource
from residual_exp.decompose.units import UnitLayout
from residual_exp.spectral import GroupPCA, StreamingPCA, num_components_for_evr
from tests.conftest import build_adapter_of
from tests.unit.test_decompose_tiny import images, tiny_blip_backbone, tiny_open_clip_backbone, tiny_timm_backbone


TOL = 1e-10


def _perturb(bb, scale: float = 0.3) -> None:
    """Random biases, norm affines, LayerScales: every term of the readout is exercised."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in bb.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _pieces_timm(bb, x):
    """Independently: per-layer per-head z from q, k, v; MLP outputs; embed; the final norm input."""
    m = bb.model
    out = {"z": [], "mlp": []}
    h = m.patch_embed(x)
    h = m._pos_embed(h)
    h = m.norm_pre(h)
    out["embed"] = h[:, 0]
    for blk in m.blocks:
        a = blk.attn
        y = blk.norm1(h)
        B, N, W = y.shape
        qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], a.q_norm(qkv[1] * 0 + qkv[1]), qkv[2]
        q = a.q_norm(q)
        att = (q * a.scale) @ k.transpose(-2, -1)
        z = att.softmax(-1) @ v                                              # [B, H, N, Dh]
        out["z"].append(z[:, :, 0])                                          # [B, H, Dh]
        attn_out = a.proj(z.transpose(1, 2).reshape(B, N, W))
        h = h + blk.ls1(attn_out)
        mlp = blk.ls2(blk.mlp(blk.norm2(h)))
        out["mlp"].append(mlp[:, 0])
        h = h + mlp
    out["x"] = h[:, 0]
    w_o = [blk.attn.proj.weight.view(W, a.num_heads, a.head_dim) for blk in m.blocks]
    b_o = [blk.attn.proj.bias for blk in m.blocks]
    ls = [blk.ls1.gamma if hasattr(blk.ls1, "gamma") else torch.ones(W, dtype=x.dtype) for blk in m.blocks]
    return out, w_o, b_o, ls, m.norm, None, None


def _pieces_open_clip(bb, x):
    v = bb.model.visual
    out = {"z": [], "mlp": []}
    h = v._embeds(x)
    out["embed"] = h[:, 0]
    for blk in v.transformer.resblocks:
        mha = blk.attn
        y = blk.ln_1(h)
        B, N, W = y.shape
        H = mha.num_heads
        q, k, vv = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        split = lambda t: t.view(B, N, H, W // H).transpose(1, 2)
        att = (split(q) / (W // H) ** 0.5) @ split(k).transpose(-2, -1)
        z = att.softmax(-1) @ split(vv)                                     # [B, H, N, Dh]
        out["z"].append(z[:, :, 0])
        h = h + blk.ls_1(mha.out_proj(z.transpose(1, 2).reshape(B, N, W)))
        mlp = blk.ls_2(blk.mlp(blk.ln_2(h)))
        out["mlp"].append(mlp[:, 0])
        h = h + mlp
    out["x"] = h[:, 0]
    blocks = v.transformer.resblocks
    W, H = v.transformer.width, blocks[0].attn.num_heads
    w_o = [b.attn.out_proj.weight.view(W, H, W // H) for b in blocks]
    b_o = [b.attn.out_proj.bias for b in blocks]
    ls = [b.ls_1.gamma if hasattr(b.ls_1, "gamma") else torch.ones(W, dtype=x.dtype) for b in blocks]
    return out, w_o, b_o, ls, v.ln_post, v.proj, None


def _pieces_blip(bb, x):
    vm = bb.model.vision_model
    out = {"z": [], "mlp": []}
    h = vm.embeddings(x)
    out["embed"] = h[:, 0]
    for layer in vm.encoder.layers:
        sa = layer.self_attn
        y = layer.layer_norm1(h)
        B, N, W = y.shape
        H = sa.num_heads
        qkv = sa.qkv(y).reshape(B, N, 3, H, W // H).permute(2, 0, 3, 1, 4)
        att = (qkv[0] * sa.scale) @ qkv[1].transpose(-2, -1)
        z = att.softmax(-1) @ qkv[2]
        out["z"].append(z[:, :, 0])
        h = h + sa.projection(z.transpose(1, 2).reshape(B, N, W))
        mlp = layer.mlp(layer.layer_norm2(h))
        out["mlp"].append(mlp[:, 0])
        h = h + mlp
    out["x"] = h[:, 0]
    layers = vm.encoder.layers
    W, H = vm.config.hidden_size, vm.config.num_attention_heads
    w_o = [l.self_attn.projection.weight.view(W, H, W // H) for l in layers]
    b_o = [l.self_attn.projection.bias for l in layers]
    ls = [torch.ones(W, dtype=x.dtype) for _ in layers]
    vp = bb.model.vision_proj
    return out, w_o, b_o, ls, vm.post_layernorm, vp.weight.T, vp.bias


def official_units(pieces, w_o, b_o, ls, ln, proj, proj_bias) -> torch.Tensor:
    """The official tracers' units, written from the formula (see the module docstring)."""
    x = pieces["x"]
    mu = x.mean(-1, keepdim=True)
    sd = x.std(-1, unbiased=False, keepdim=True)
    den = torch.sqrt(sd ** 2 + ln.eps)
    L, H = len(w_o), w_o[0].shape[1]
    n_unit, n_head = 2 * L + 1, (2 * L + 1) * H

    def lens(c, n):
        y = ln.weight / den * c - (ln.weight / den * mu - ln.bias) / n
        if proj is None:
            return y
        return y @ proj + (proj_bias / n if proj_bias is not None else 0)

    units = [lens(pieces["embed"], n_unit)]
    for l in range(L):
        for h in range(H):
            c = ls[l] * (pieces["z"][l][:, h] @ w_o[l][:, h].T + b_o[l] / H)
            units.append(lens(c, n_head))
        units.append(lens(pieces["mlp"][l], n_unit))
    return torch.stack(units, 1)


@pytest.mark.parametrize("family,factory,pieces", [
    ("open_clip", lambda: tiny_open_clip_backbone(), _pieces_open_clip),
    ("open_clip_layerscale", lambda: tiny_open_clip_backbone(ls_init_value=0.5), _pieces_open_clip),
    ("timm_dinov2_like", lambda: tiny_timm_backbone(init_values=0.5), _pieces_timm),
    ("timm_vit", lambda: tiny_timm_backbone(), _pieces_timm),
    ("blip", lambda: tiny_blip_backbone(), _pieces_blip),
])
def test_units_equal_the_official_tracers(family, factory, pieces):
    bb = factory()
    _perturb(bb)
    x = images(3, bb.image_size)
    with torch.no_grad():
        want = official_units(*pieces(bb, x))
        got, feature = bb.use_convention("official").decompose(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    assert (want.sum(1) - feature).abs().max().item() <= TOL          # the official units sum to the feature


def test_centred_convention_stays_available_and_differs():
    bb = tiny_open_clip_backbone()
    _perturb(bb)
    x = images(3, bb.image_size)
    with torch.no_grad():
        off, f = bb.use_convention("official").decompose(x)
        cen, f2 = bb.use_convention("centred").decompose(x)
    assert torch.equal(f, f2) and cen.shape[1] == off.shape[1] + 2
    assert (cen[:, 1:-2] - cen[:, 1:-2].mean(-1, keepdim=True)).abs().max() > 0
    assert (cen[:, 0] - off[:, 0]).abs().max() > 1e-3                 # the definitions really differ
    assert (cen.sum(1) - f).abs().max() <= TOL


# --- classifier ----------------------------------------------------------------------------
def test_prototype_head_is_normalize_x_dot_raw_class_means():
    g = torch.Generator().manual_seed(0)
    f = 3 + torch.randn(60, 12, generator=g, dtype=torch.float64)
    y = torch.arange(60) % 4
    means = torch.stack([f[y == c].mean(0) for c in range(4)])          # [C, D] raw
    head = ClassifierHead(class_means(f, y, 4), 1.0, normalize_weights=False).double()
    x = torch.randn(7, 12, generator=g, dtype=torch.float64)
    want = F.normalize(x, dim=-1) @ means.T
    assert (head(x) - want).abs().max().item() <= TOL


# --- EVR rule ----------------------------------------------------------------------------------
def test_evr_rule_is_strict_and_the_official_bug_is_opt_in():
    r = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]],
                     dtype=torch.float64)                                  # exact binary fractions
    assert num_components_for_evr(r, 0.75).tolist() == [3, 4, 0]          # > 0.75: needs the third
    assert num_components_for_evr(r, 0.75, rule="inclusive").tolist() == [2, 3, 0]
    assert num_components_for_evr(r, 1.0).tolist() == [4, 4, 0]           # never > 1: all kept
    assert num_components_for_evr(r, 1.0, unreachable="one").tolist() == [1, 1, 1]   # official (c)
    official = lambda ratio, t: ((ratio.cumsum(-1) > t).float().argmax(-1) + 1)   # the official rule
    for t in (0.3, 0.5, 0.75, 0.9, 1.0):
        assert num_components_for_evr(r[:2], t, unreachable="one").tolist() == official(r[:2], t).tolist()


# --- compat adapters ------------------------------------------------------------------------------
L, H, D = 2, 3, 8
LAYOUT = UnitLayout.vit(L, H, constants=False)
U = len(LAYOUT)


def _data():
    g = torch.Generator().manual_seed(3)
    units = torch.randn(300, U, D, generator=g, dtype=torch.float64) * torch.linspace(2, 0.2, D, dtype=torch.float64)
    units = units + torch.randn(U, D, generator=g, dtype=torch.float64)
    return units, units.sum(1)


def _method(name, **kw):
    base = dict(name=name, units="heads", others="drop", evr=None, k=None, dropped_value=0.0, init="normal",
                lr=0.8, batch_size=64, weight_decay=0.0, grad_clip=None, cache=True)
    return OmegaConf.create({**base, **kw})


def _fit(units, feature, source):
    gp, po = GroupPCA(source), StreamingPCA(1, D)
    gp.update({"units": units, "feature": feature}); po.update(feature[:, None])
    return gp.finalize(), po.finalize()


def test_compat_a_spectral_adapter_scales_output_coordinates():
    units, feature = _data()
    src = DenseSource(LAYOUT, D, head_dim=2, width=D, dtype=torch.float64)
    ub, ob = _fit(units, feature, src)
    ad = build_adapter_of(_method("spectral_adapter", units="output"), src, D, ub, ob, compat="official").double()
    with torch.no_grad():
        ad.lam.copy_(torch.linspace(-1, 2, D, dtype=torch.float64))
        got = ad(**ad.prepare({"units": units, "feature": feature}))
    want = (feature - ob.mean[0]) * torch.linspace(-1, 2, D, dtype=torch.float64)
    assert (got - want).abs().max().item() <= TOL
    paper = build_adapter_of(_method("spectral_adapter", units="output"), src, D, ub, ob).double()
    with torch.no_grad():
        paper.lam.copy_(torch.linspace(-1, 2, D, dtype=torch.float64))
        assert (paper(**paper.prepare({"units": units, "feature": feature})) - want).abs().max() > 1e-3


def official_residual_full(x, idx, bases, means, lam_flat, lengths, padding=1.0):
    """The official ResiDual.forward, re-written from its description: bases zero-padded to
    [S, K_max, D] (here square), λ split per unit and padded with ``padding``, projection with
    Φ⊙λ, reconstruction with the 'inverse' = Φᵀ for square bases, the rest added."""
    S = len(idx)
    kmax = max(b.shape[0] for b in bases)
    Phi = torch.zeros(S, kmax, D, dtype=x.dtype)
    for s, b in enumerate(bases):
        Phi[s, :b.shape[0]] = b
    lam = torch.full((S, kmax), padding, dtype=x.dtype)
    start = 0
    for s, n in enumerate(lengths):
        lam[s, :n] = lam_flat[start:start + n]
        start += n
    inverse = Phi.transpose(1, 2) if kmax == D else torch.linalg.inv(Phi @ Phi.transpose(1, 2)) @ Phi
    a = torch.einsum("nrd,rkd->nrk", x[:, idx] - means, Phi * lam[..., None])
    a = torch.einsum("nrk,rkd->nrd", a, inverse).sum(1)
    rest = [u for u in range(x.shape[1]) if u not in idx]
    return a + x[:, rest].sum(1)


def test_compat_b_residual_full_reconstructs_with_the_transpose_of_square_bases():
    units, feature = _data()
    src = DenseSource(LAYOUT, D, head_dim=2, width=D, dtype=torch.float64)    # heads K = 2, MLPs K = D
    ub, ob = _fit(units, feature, src)
    m = _method("residual_full", units="heads+mlps", others="add")
    ad = build_adapter_of(m, src, D, ub, ob, compat="official").double()
    blocks = ub.blocks(LAYOUT.indices("heads+mlps"))
    idx = [u for _, i, _ in blocks for u in i]
    bases = [b.components[s] for _, _, b in blocks for s in range(b.num_units)]
    means = torch.cat([b.mean for _, _, b in blocks])
    lengths = [b.shape[0] for b in bases]
    with torch.no_grad():
        got = ad(**ad.prepare({"units": units, "feature": feature}))
        want = official_residual_full(units, idx, bases, means, ad.lam.double(), lengths)
    assert ad.trainable_params() == L * H * 2 + L * D
    assert (got - want).abs().max().item() <= TOL
    # the paper's formula (default): λ = 1 reconstructs the centred selected units exactly
    paper = build_adapter_of(m, src, D, ub, ob, seed=0).double()
    with torch.no_grad():
        paper.lam.fill_(1.0)
        out = paper(**paper.prepare({"units": units, "feature": feature}))
        heads = LAYOUT.indices("heads")
        proj = [b.components[s] for g, _, b in blocks if g == "heads" for s in range(b.num_units)]
        exp_heads = sum(((units[:, u] - ub.mean[u]) @ P.T) @ P for u, P in zip(heads, proj))
        mlps = LAYOUT.indices("mlps")
        exp = exp_heads + (units[:, mlps] - ub.mean[mlps]).sum(1) + units[:, [0]].sum(1)
    assert (out - exp).abs().max().item() <= 1e-9


def test_compat_d_mean_ablation_uses_the_batch_mean():
    units, feature = _data()
    src = DenseSource(LAYOUT, D, head_dim=D, width=D, dtype=torch.float64)
    ub, ob = _fit(units, feature, src)
    m = _method("residual_coarse", others="mean")
    official = build_adapter_of(m, src, D, ub, ob, compat="official").double()
    paper = build_adapter_of(m, src, D, ub, ob).double()
    heads = LAYOUT.indices("heads")
    rest = [u for u in range(U) if u not in heads]
    batch = units[:50]
    with torch.no_grad():
        lam = official.lam.double()
        want_official = torch.einsum("nrd,r->nd", batch[:, heads], lam) + batch[:, rest].mean(0).sum(0)
        want_paper = torch.einsum("nrd,r->nd", batch[:, heads], lam) + ub.mean[rest].sum(0)
        got_o = official(**official.prepare({"units": batch, "feature": batch.sum(1)}))
        got_p = paper(**paper.prepare({"units": batch, "feature": batch.sum(1)}))
    assert (got_o - want_official).abs().max().item() <= TOL
    assert (got_p - want_paper).abs().max().item() <= TOL


def test_official_parameter_accounting():
    """residual_full: head_dim per head + min(width, D) per MLP (CLIP-B/16: 144·64 + 12·512 = 15,360)."""
    units, feature = _data()
    src = DenseSource(LAYOUT, D, head_dim=2, width=16, dtype=torch.float64)
    ub, ob = _fit(units, feature, src)
    count = lambda name, **kw: build_adapter_of(_method(name, **kw), src, D, ub, ob).trainable_params()
    assert count("base", units="output") == 0
    assert count("linear_adapter", units="output", init="default") == D * D + D
    assert count("spectral_adapter", units="output") == D
    assert count("residual_coarse") == L * H
    assert count("residual_full", units="heads+mlps", others="add") == L * H * 2 + L * min(16, D)
    fine = count("residual_fine", evr=0.9)
    assert L * H <= fine <= L * H * 2
    for name, (layers, heads, dim, width, want) in {
            "clip_b": (12, 12, 512, 768, 15360), "clip_l": (24, 16, 768, 1024, 43008),
            "vit_l": (24, 16, 1024, 1024, 49152), "blip_l_flickr": (24, 16, 256, 1024, 30720)}.items():
        from residual_exp.decompose.readout import official_rank
        got = layers * heads * official_rank("heads", 64, width, dim, 10**6) + \
            layers * official_rank("vectors", 64, width, dim, 10**6)
        assert got == want, name


# --- paper presets -------------------------------------------------------------------------------
PROTOCOL = {   # method: (lr, batch, init, units, others, evr)
    "base": (0.0, 128, None, "output", "drop", None),
    "finetune": (1e-5, 128, None, "output", "drop", None),
    "linear_adapter": (1e-3, 64, "default", "output", "drop", None),
    "spectral_adapter": (1e-3, 64, "normal", "output", "drop", None),
    "residual_coarse": (0.8, 64, "normal", "heads", "drop", None),
    "residual_fine": (0.8, 64, "normal", "heads", "drop", 0.9),
    "residual_full": (0.8, 64, "normal", "heads+mlps", "add", None),
}


@pytest.mark.parametrize("method", list(PROTOCOL))
def test_paper_presets_compose_to_the_official_protocol(method):
    from tests.conftest import compose_cfg
    for pair in ("clip_b_cifar10", "vit_l_sun397", "blip_l_flickr_svhn"):
        cfg = compose_cfg([f"+experiment=paper/{pair}", f"method={method}"])
        lr, batch, init, units, others, evr = PROTOCOL[method]
        m, kinds = cfg.method, {"output": [], "heads": ["head"], "heads+mlps": ["head", "mlp"]}[units]
        assert (m.lr, m.batch_size, m.others, cfg.rank.evr, cfg.rank.k) == (lr, batch, others, evr, None)
        assert list(cfg.units.kinds) == kinds and (cfg.units.by == "output") == (units == "output")
        assert cfg.units.layers is None and not cfg.units.include and not cfg.units.exclude
        if init is not None:
            assert m.init == init
        assert (cfg.trainer.max_epochs, cfg.trainer.patience, cfg.trainer.precision) == (30, 5, "32-true")
        assert cfg.pca.reference.name == "imagenet" and cfg.pca.split == "train"
        assert (cfg.conventions.units, cfg.conventions.prototype, cfg.conventions.evr_rule) == \
            ("official", "mean", "strict")
        assert m.grad_clip == (1.0 if method == "finetune" else None)
