"""Average- and attention-pooled readouts and the families beyond the pre-norm ViT, in float64 at
tiny sizes (issue 20):

* timm ``global_pool='avg'`` (norm after the pool, per-token norm before it, no norm) and
  ``'map'`` (with and without class / register tokens), Eva (PE-Core-style MAP over every token,
  RoPE), a final RmsNorm, BEiT (relative position bias), CaiT (class-attention layers as the CLS
  units), NaFlexVit, both parallel-block kinds, and open_clip towers pooled the same ways (timm
  ``map`` / ``avg`` towers with or without a head, CLIPA's ``pool_type='avg'``);
* each with every 1-D parameter perturbed: Σ units equals the *library's own* feature and every
  unit equals the family's independent recomputation (:mod:`residual_exp.decompose.references`)
  to ≤ 1e-10, under both unit conventions;
* the low-rank cache keeps head_dim numbers per head for average pooling (the σ*-weighted token
  mean of a head's value mix) and rebuilds the same units; MAP readouts store units as such;
* refusals that remain name the part (and say how to read the CLS token where there is one).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from residual_exp.backbones import UnsupportedArchitecture
from residual_exp.decompose.references import perturb_1d
from tests.unit.test_decompose_families import _register_tiny_timm, assert_exact
from tests.unit.test_decompose_tiny import images

SIZE = 32
TINY = dict(img_size=SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def _timm(cls_path: str, **kw):
    import importlib
    module, name = cls_path.rsplit(".", 1)
    torch.manual_seed(0)
    return getattr(importlib.import_module(module), name)(**kw)


def vit(**kw):
    return _timm("timm.models.vision_transformer.VisionTransformer", **{**TINY, **kw})


def eva(**kw):
    return _timm("timm.models.eva.Eva", **{**TINY, **kw})


def naflex(**kw):
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg
    torch.manual_seed(0)
    return NaFlexVit(NaFlexVitCfg(patch_size=8, embed_dim=64, depth=2, num_heads=4, **kw), img_size=SIZE)


def timm_bb(model):
    from residual_exp.backbones.timm_backbone import TimmBackbone
    return TimmBackbone("tiny", model.double().eval(), None, SIZE)


def open_clip_timm(trunk: str, pool: str, proj, **clip):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from residual_exp.backbones.open_clip_backbone import OpenClipBackbone
    torch.manual_seed(0)
    vcfg = CLIPVisionCfg(timm_model_name=trunk, timm_pool=pool, timm_proj=proj, image_size=SIZE)
    model = open_clip.model.CustomTextCLIP(embed_dim=48, vision_cfg=vcfg, **clip,
                                           text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4,
                                                                layers=1))
    return OpenClipBackbone("tiny_siglip", model.double().eval(), None, None, SIZE)


def clipa(after: bool):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from residual_exp.backbones.open_clip_backbone import OpenClipBackbone
    torch.manual_seed(0)
    vcfg = CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=SIZE, pool_type="avg",
                         final_ln_after_pool=after, no_ln_pre=True)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vcfg,
                                 text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=1))
    return OpenClipBackbone("tiny_clipa", model.double().eval(), None, None, SIZE)


def _siglip_trunk():
    return _register_tiny_timm("residual_test_tiny_siglip", vit, global_pool="map", class_token=False)


def _pe_trunk():
    return _register_tiny_timm("residual_test_tiny_pe", eva, global_pool="map", use_rot_pos_emb=True,
                               ref_feat_shape=(4, 4), attn_type="rope", use_pre_transformer_norm=True)


def _gap_trunk():
    return _register_tiny_timm("residual_test_tiny_gap", vit, global_pool="avg", fc_norm=False, class_token=False)


# name → (factory, readout, heads per layer, pool units)
CASES = {
    "vit_map_siglip": (lambda: timm_bb(vit(global_pool="map", class_token=False)), "map", 4, 1),
    "vit_map_cls_registers": (lambda: timm_bb(vit(global_pool="map", reg_tokens=2, init_values=0.3)), "map", 4, 1),
    "vit_map_rmsnorm": (lambda: timm_bb(vit(global_pool="map", class_token=False, norm_layer=_rms())), "map", 4, 1),
    "vit_avg_fc_norm": (lambda: timm_bb(vit(global_pool="avg")), "avg", 4, 0),
    "vit_avg_norm_per_token_siglip_gap": (lambda: timm_bb(vit(global_pool="avg", fc_norm=False, class_token=False)),
                                          "avg", 4, 0),
    "vit_avg_no_norm": (lambda: timm_bb(vit(global_pool="avg", fc_norm=False, final_norm=False)), "avg", 4, 0),
    "vit_token_rmsnorm": (lambda: timm_bb(vit(global_pool="token", norm_layer=_rms())), "token", 4, 0),
    "eva_map_pe_core": (lambda: timm_bb(eva(global_pool="map", use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                                            attn_type="rope", use_pre_transformer_norm=True)), "map", 4, 1),
    "eva_avg_fc_norm": (lambda: timm_bb(eva(global_pool="avg", init_values=0.3)), "avg", 4, 0),
    "beit_relpos_avg": (lambda: timm_bb(_timm("timm.models.beit.Beit", **TINY, use_rel_pos_bias=True,
                                              init_values=0.2)), "avg", 4, 0),
    "beitv2_shared_relpos_token": (lambda: timm_bb(_timm("timm.models.beit.Beit", **TINY, use_shared_rel_pos_bias=True,
                                                         init_values=0.2, global_pool="token", use_fc_norm=False)),
                                   "token", 4, 0),
    "cait_class_attention": (lambda: timm_bb(_timm("timm.models.cait.Cait", **TINY, depth_token_only=2,
                                                   init_values=0.2)), "token", 4, 0),
    "naflexvit_map": (lambda: timm_bb(naflex(global_pool="map")), "map", 4, 1),
    "naflexvit_avg_registers": (lambda: timm_bb(naflex(global_pool="avg", reg_tokens=2, fc_norm=True)), "avg", 4, 0),
    "parallel_scaling_block": (lambda: timm_bb(vit(block_fn=_block("ParallelScalingBlock"), qkv_bias=False,
                                                   init_values=0.3)), "token", 4, 0),
    "parallel_scaling_fused_out_proj": (lambda: timm_bb(vit(block_fn=_block("ParallelScalingBlock", fuse_out_proj=True),
                                                            qkv_bias=False)), "token", 4, 0),
    "parallel_things_block": (lambda: timm_bb(vit(global_pool="avg", block_fn=_block("ParallelThingsBlock"),
                                                  init_values=0.3)), "avg", 8, 0),
    "open_clip_siglip_map_tower": (lambda: open_clip_timm(_siglip_trunk(), "map", "none", init_logit_bias=-10),
                                   "map", 4, 1),
    "open_clip_pe_core_map_head": (lambda: open_clip_timm(_pe_trunk(), "map", None), "map", 4, 1),
    "open_clip_gap_tower_linear": (lambda: open_clip_timm(_gap_trunk(), "avg", "linear"), "avg", 4, 0),
    "open_clip_clipa_avg_ln_after_pool": (lambda: clipa(True), "avg", 4, 0),
    "open_clip_avg_ln_per_token": (lambda: clipa(False), "avg", 4, 0),
}


def _rms():
    from timm.layers import RmsNorm
    return RmsNorm


def _block(name: str, **kw):
    from functools import partial

    import timm.models.vision_transformer as vt
    return partial(getattr(vt, name), **kw)


@pytest.mark.parametrize("convention", ["official", "centred"])
@pytest.mark.parametrize("name", list(CASES))
def test_pooled_readouts_are_exact_per_unit(name, convention):
    factory, readout, heads, pool_units = CASES[name]
    bb = factory()
    counts = assert_exact(bb, convention, n=3)
    assert bb.pooling().kind == readout
    assert counts["head"] == 2 * heads and counts["mlp"] == 2 and counts.get("pool", 0) == pool_units
    assert counts["const"] == (2 if convention == "centred" else 0)
    if pool_units:
        assert "pool.mlp" in bb.layout.names


def test_cait_units_are_the_class_attention_layers():
    """The units are the class-attention layers' (not the patch blocks'); the embed unit is the
    class token itself, the same for every image before the final norm."""
    bb = CASES["cait_class_attention"][0]()
    assert bb.num_layers == 2 and len(bb.model.blocks) == 2 and bb.layout.num_layers == 2
    perturb_1d(bb.vision, 0)
    with torch.no_grad():
        raw = bb.decompose_raw(images())
    want = bb.model.norm.weight * bb.model.cls_token[0, 0]                  # Pᵀ(γ ⊙ c), P = I
    assert torch.allclose(raw["vec"][:, 0], want.expand(2, -1), atol=1e-14, rtol=0)


def test_average_pool_cache_keeps_head_dim_per_head_and_rebuilds_the_units():
    from residual_exp.decompose.readout import DenseSource
    for name in ("vit_avg_fc_norm", "vit_avg_norm_per_token_siglip_gap", "open_clip_clipa_avg_ln_after_pool"):
        bb = CASES[name][0]()
        perturb_1d(bb.vision, 1)
        x = images()
        with torch.no_grad():
            raw = bb.decompose_raw(x)
            units, _ = bb.decompose(x)
        r = bb.readout()
        assert raw["z"].shape == (2, 8, 16) and r.storage_shapes()["z"] == (8, 16)     # head_dim per head
        assert r.rank("heads", 1000) == 16
        dense = DenseSource.like(r)
        assert torch.equal(dense.units({"units": units, "feature": raw["feature"]}), units)
        assert torch.allclose(r.sum_units(raw, range(len(r.layout))), raw["feature"], atol=1e-12, rtol=0)


def test_attention_pool_cache_stores_units_and_the_pool_channels():
    bb = CASES["vit_map_siglip"][0]()
    perturb_1d(bb.vision, 2)
    x = images()
    for convention in ("official", "centred"):
        bb.use_convention(convention)
        with torch.no_grad():
            raw = bb.decompose_raw(x)
            units, feature = bb.decompose(x)
        r = bb.readout()
        J = bb.model.attn_pool.num_heads
        assert set(raw) == set(r.keys) and {k: tuple(v.shape[1:]) for k, v in raw.items()} == r.storage_shapes()
        assert raw["heads"].shape == (2, 8, 64) and raw["stats"].shape == (2, 2 * J)
        assert r.maps("heads") is None and r.rank("heads", 1000) == min(J * 16, 64)
        lifted = torch.cat([r.lift(raw, g) for g in ("heads", "vectors", "consts") if r.groups.get(g)], 1)
        order = [u for g in ("heads", "vectors", "consts") for u in r.groups.get(g, [])]
        assert torch.allclose(lifted, units[:, order], atol=1e-12, rtol=0)
        assert torch.allclose(r.sum_units(raw, range(len(r.layout))), feature, atol=1e-12, rtol=0)


def test_map_pool_unit_is_the_pool_mlp_branch():
    """pool.mlp is exactly ``attn_pool.mlp(attn_pool.norm(p))`` — the library's own branch."""
    bb = CASES["vit_map_siglip"][0]()
    perturb_1d(bb.vision, 3)
    x = images()
    seen = {}
    h = bb.model.attn_pool.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("r", o[:, 0]))
    with torch.no_grad():
        bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
    h.remove()
    with torch.no_grad():
        units, _ = bb.decompose(x)
    assert torch.allclose(units[:, bb.layout.index("pool.mlp")], seen["r"], atol=1e-13, rtol=0)


# --- refusals that remain -------------------------------------------------------------------------
@pytest.mark.parametrize("make, part", [
    (lambda: vit(global_pool="max"), r"global_pool='max': max pooling is not linear.*global_pool=token"),
    (lambda: vit(global_pool="avgmax"), r"average\+max pooling is not linear"),
    (lambda: vit(global_pool="", class_token=False), r"no pooling \(every token is returned\) is not linear"),
])
def test_non_linear_readouts_are_refused_naming_the_part(make, part):
    from residual_exp.backbones.timm_backbone import TimmBackbone
    with pytest.raises(UnsupportedArchitecture, match=part) as e:
        TimmBackbone("x", make(), None, SIZE)
    assert "\n" not in str(e.value)


def test_attention_pool_variants_refused_with_the_cls_hint():
    from timm.layers import AttentionPoolLatent

    from residual_exp.backbones.timm_backbone import TimmBackbone
    m = vit(global_pool="map")
    m.fc_norm = nn.LayerNorm(64)
    with pytest.raises(UnsupportedArchitecture, match=r"fc_norm \(LayerNorm\) after the pool.*global_pool=token"):
        TimmBackbone("x", m, None, SIZE)
    m = vit(global_pool="map", class_token=False)
    m.attn_pool = AttentionPoolLatent(64, num_heads=4, latent_len=2, norm_layer=nn.LayerNorm)
    with pytest.raises(UnsupportedArchitecture, match="latent_len > 1") as e:
        TimmBackbone("x", m, None, SIZE)
    assert "global_pool=token" not in str(e.value)                 # no class token to suggest


def test_cait_average_pool_and_unknown_norm_refused():
    from timm.layers import SimpleNorm

    from residual_exp.backbones.timm_backbone import TimmBackbone
    with pytest.raises(UnsupportedArchitecture, match="CaiT's patch tokens are not in its class-attention stream"):
        TimmBackbone("x", _timm("timm.models.cait.Cait", **TINY, depth_token_only=1, global_pool="avg"), None, SIZE)
    with pytest.raises(UnsupportedArchitecture, match="final norm SimpleNorm is neither a LayerNorm nor an RmsNorm"):
        TimmBackbone("x", vit(norm_layer=SimpleNorm), None, SIZE)


def test_blocks_are_refused_for_their_structure():
    from timm.models.vision_transformer import Block, ResPostBlock

    from residual_exp.backbones.timm_backbone import TimmBackbone

    class Scaled(Block):                                           # same class tree, another forward
        def forward(self, x, attn_mask=None, is_causal=False):
            return 2 * super().forward(x)
    with pytest.raises(UnsupportedArchitecture, match="ResPostBlock .*norm over the summed heads"):
        TimmBackbone("x", vit(block_fn=ResPostBlock), None, SIZE)
    with pytest.raises(UnsupportedArchitecture, match="blocks\\[0\\] is Scaled: not a pre-norm block"):
        TimmBackbone("x", vit(block_fn=Scaled), None, SIZE)


def test_open_clip_config_refusals_name_the_part():
    from residual_exp.backbones.open_clip_backbone import check_open_clip_config
    timm_cfg = lambda **v: {"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit_x", **v}, "text_cfg": {}}
    with pytest.raises(UnsupportedArchitecture, match=r"timm_pool='max'.*model=timm model.arch=vit_x "
                                                      r"\+model.params.create_kwargs.global_pool=token"):
        check_open_clip_config("X", timm_cfg(timm_pool="max"))
    with pytest.raises(UnsupportedArchitecture, match="rot_attn attention pooling over a 2-D feature map"):
        check_open_clip_config("X", timm_cfg(timm_pool="rot_attn"))
    for arch in ("ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP2", "PE-Core-B-16", "ViT-L-14-CLIPA", "nllb-clip-base"):
        check_open_clip_config(arch)                               # accepted now
