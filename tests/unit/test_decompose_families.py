"""The families beyond plain ViTs (issue: any ViT a researcher brings), in float64 at tiny sizes:

* timm ``Eva`` (EVA-01 style, EVA-02 style with RoPE + SwiGLU + LayerScale, the EVA02-CLIP inner
  attention norm), timm ``VisionTransformerRelPos`` with a class token, a timm ViT read through
  ``fc_norm``, and open_clip CLIPs whose image tower is such a timm model (``TimmModel``);
* each with its 1-D parameters perturbed (biases, norm affines, LayerScale, tokens): Σ units
  equals the library's own image feature and every unit equals an independent recomputation
  (the family's :mod:`residual_exp.decompose.references`) to ≤ 1e-10;
* refusals name the offending part, before anything is built or loaded;
* the check catches a decomposition that drops every bias and the final norm's affine, which a
  check at random init (biases 0, γ = 1, β = 0) could not.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from residual_exp.backbones import UnsupportedArchitecture
from residual_exp.backbones import reference_of
from residual_exp.decompose.references import perturb_1d, reference_units
from residual_exp.tasks.check_decomposition import check_decomposition
from tests.unit.test_decompose_tiny import TIMM_CFG, _task_cfg, images

SIZE = 32
TOL = 1e-10
TINY = dict(img_size=SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4)
EVA01 = dict(TINY, global_pool="token", use_abs_pos_emb=True)
EVA02 = dict(TINY, global_pool="token", qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
             use_rot_pos_emb=True, ref_feat_shape=(4, 4), init_values=0.5)
EVA02_CLIP = dict(EVA02, scale_attn_inner=True, init_values=None)


def _eva(**kw):
    from timm.models.eva import Eva
    torch.manual_seed(0)
    return Eva(**kw)


def _relpos(**kw):
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    torch.manual_seed(0)
    return VisionTransformerRelPos(**{**TINY, "class_token": True, "global_pool": "token", **kw})


def _vit(**kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY, **kw})


def _timm_backbone(model):
    from residual_exp.backbones.timm_backbone import TimmBackbone
    return TimmBackbone("tiny", model.double().eval(), None, SIZE)


_REGISTERED: dict[str, dict] = {}


def _register_tiny_timm(name: str, factory, **kw) -> str:
    """A tiny timm model under ``name`` in timm's registry, so that open_clip's ``TimmModel``
    (which creates its trunk by name) builds it."""
    import timm
    from timm.models import register_model
    if name not in timm.list_models(name):
        def fn(pretrained=False, **extra):
            extra = {k: v for k, v in extra.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}
            model = factory(**{**kw, **extra})
            model.pretrained_cfg = model.default_cfg = {"architecture": name}   # as timm.create_model sets
            return model
        fn.__name__ = name
        fn.__module__ = __name__
        register_model(fn)
    return name


def _open_clip_timm(trunk: str, proj, proj_bias: bool = False):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    vcfg = CLIPVisionCfg(timm_model_name=trunk, timm_pool="token", timm_proj=proj, timm_proj_bias=proj_bias,
                         image_size=SIZE)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vcfg,
                                 text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=1))
    from residual_exp.backbones.open_clip_backbone import OpenClipBackbone
    return OpenClipBackbone("tiny_timm_tower", model.double().eval(), None, None, SIZE)


def _library_feature(backbone, x):
    """The library's own image feature (not ours): timm's pre-logits, open_clip's encode_image."""
    if backbone.family == "open_clip":
        return backbone.model.encode_image(x)
    m = backbone.model
    return m.forward_head(m.forward_features(x), pre_logits=True)


CASES = {
    "eva01": lambda: _timm_backbone(_eva(**EVA01)),
    "eva02_rope_swiglu_layerscale": lambda: _timm_backbone(_eva(**EVA02)),
    "eva02_clip_inner_attn_norm": lambda: _timm_backbone(_eva(**EVA02_CLIP)),
    "eva_rope_attention_gqa_qknorm_registers": lambda: _timm_backbone(_eva(**dict(
        EVA02, attn_type="rope", num_kv_heads=2, qk_norm=True, num_reg_tokens=2))),
    "relpos_cls": lambda: _timm_backbone(_relpos()),
    "relpos_cls_shared": lambda: _timm_backbone(_relpos(shared_rel_pos=True)),
    "vit_fc_norm": lambda: _timm_backbone(_vit(fc_norm=True, global_pool="token")),
    "open_clip_timm_eva02_trunk_head": lambda: _open_clip_timm(
        _register_tiny_timm("residual_test_tiny_eva02", _eva, **EVA02_CLIP), None),
    "open_clip_timm_vit_linear_proj": lambda: _open_clip_timm(
        _register_tiny_timm("residual_test_tiny_vit", _vit, **dict(TINY, global_pool="token")), "linear", True),
}


def assert_exact(backbone, convention: str, n: int = 2, tol: float = TOL):
    """Perturb every 1-D parameter, then: the decomposed forward gives the library's own feature,
    Σ units equals it, the family's reference reproduces it and every unit equals the reference's."""
    assert perturb_1d(backbone.vision, seed=0) > 0
    backbone.use_convention(convention)
    x = images(n=n)
    with torch.no_grad():
        units, feature = backbone.decompose(x)
        lib = _library_feature(backbone, x)
        ref = reference_of(backbone, x)
        want = reference_units(ref, convention)
    scale = lib.abs().amax(-1, keepdim=True)
    assert units.shape == (n, len(backbone.layout), backbone.output_dim)
    assert ((feature - lib).abs() / scale).max() <= tol
    assert ((units.sum(1) - lib).abs() / scale).max() <= tol                        # Σ units = the feature
    assert ((ref.feature() - lib).abs() / scale).max() <= tol                       # the reference is right
    assert ((units - want).abs() / scale[:, None]).max() <= tol                     # every unit, independently
    return backbone.layout.counts()


@pytest.mark.parametrize("convention", ["official", "centred"])
@pytest.mark.parametrize("name", list(CASES))
def test_family_is_exact_with_perturbed_parameters(name, convention):
    counts = assert_exact(CASES[name](), convention)
    assert counts["head"] == 2 * 4 and counts["mlp"] == 2 and counts["embed"] == 1
    assert counts["const"] == (2 if convention == "centred" else 0)


# --- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, part", [
    ("coca_ViT-B-32", "CoCa attentional pooler"),
    ("RN50", "ResNet image tower"),
    ("convnext_base_w", None),                     # a timm tower: refused on the meta device (below), not here
])
def test_open_clip_refusals_from_the_config_alone(arch, part):
    from residual_exp.backbones.open_clip_backbone import check_open_clip_arch, check_open_clip_config
    if part is None:
        check_open_clip_config(arch)
        with pytest.raises(UnsupportedArchitecture, match=f"{arch}: timm tower convnext.*ConvNeXt is not a timm ViT"):
            check_open_clip_arch(arch)
        return
    with pytest.raises(UnsupportedArchitecture, match=part) as e:
        check_open_clip_config(arch)
    assert str(e.value).startswith(arch + ":") and "\n" not in str(e.value)


def test_open_clip_post_norm_eva_refused_on_the_meta_device():
    from residual_exp.backbones.open_clip_backbone import check_open_clip_arch
    with pytest.raises(UnsupportedArchitecture, match="EvaBlockPostNorm"):
        check_open_clip_arch("EVA02-E-14")


def test_architecture_is_checked_before_weights_or_tokenizer(monkeypatch):
    import open_clip
    from residual_exp.backbones.open_clip_backbone import create_open_clip

    def forbidden(*a, **k):
        raise AssertionError("loaded before the architecture was checked")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    monkeypatch.setattr(open_clip, "get_tokenizer", forbidden)
    with pytest.raises(UnsupportedArchitecture, match="RN50"):
        create_open_clip("RN50", "openai", None, None, None)


def test_tokenizer_is_loaded_lazily_and_fails_with_an_offline_hint(monkeypatch):
    import open_clip
    from residual_exp.backbones.open_clip_backbone import LazyTokenizer
    from residual_exp.backbones.weights import WeightsUnavailable
    calls = []

    def offline(arch, cache_dir=None):
        calls.append(arch)
        raise OSError("We couldn't connect to the hub\n... 100 more lines")
    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    tok = LazyTokenizer("ViT-B-16", None)
    assert calls == []                                     # nothing loaded at construction
    with pytest.raises(WeightsUnavailable, match="tokenizer of open_clip ViT-B-16: OSError: We couldn't connect"):
        tok(["a photo"])


def test_timm_max_pool_refusal_says_how_to_read_the_cls_token():
    with pytest.raises(UnsupportedArchitecture, match=r"max pooling is not linear.*\+model.params.create_kwargs.global_pool=token"):
        _timm_backbone(_eva(**dict(EVA01, global_pool="max")))
    no_cls = _vit(global_pool="token")
    no_cls.cls_token = None                                  # (timm refuses to build this combination itself)
    with pytest.raises(UnsupportedArchitecture, match="no class token"):
        _timm_backbone(no_cls)


def test_refused_architecture_exits_2_with_one_line_offline(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "residual_exp", "task=check_decomposition", "model=open_clip",
         "model.arch=RN50", "model.pretrained=null", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["error: RN50: ResNet image tower (ModifiedResNet, vision_cfg.layers=[3, 4, 6, 3]): not a ViT, "
                     "no residual-unit readout; use a ViT CLIP or model=timm"]


# --- the check itself ----------------------------------------------------------------------------
def test_perturbation_touches_every_1d_parameter_and_token_reproducibly():
    a, b = _vit(init_values=0.5, reg_tokens=2), _vit(init_values=0.5, reg_tokens=2)
    n = perturb_1d(a, seed=3)
    perturb_1d(b, seed=3)
    names = [k for k, p in a.named_parameters() if p.ndim == 1 or k in ("cls_token", "pos_embed", "reg_token")]
    assert n == len(names)
    fresh = dict(_vit(init_values=0.5, reg_tokens=2).named_parameters())
    for k, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[k])                         # same seed, same draw
        assert torch.equal(p, fresh[k]) != (k in names), k                          # only those changed
    assert all(p.abs().min() > 0 for k, p in a.named_parameters() if k.endswith(".bias"))


def _broken_lens(self):
    """A decomposition that forgets every out-proj bias and the final norm's affine."""
    from residual_exp.decompose.readout import lens_from
    w_o, b_o, ls = self._tower.out_projections()
    norm = self.final()[0]
    bare = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False).to(w_o[0].dtype)
    return lens_from(w_o, [None] * len(b_o), ls, self.num_heads, bare, None, None)


def test_check_fails_on_a_decomposition_that_drops_biases(monkeypatch, capsys):
    import importlib
    refs = importlib.import_module("residual_exp.decompose.references")
    from residual_exp.backbones.timm_backbone import TimmBackbone
    cfg = _task_cfg(TIMM_CFG)
    assert check_decomposition(cfg) == 0
    out = capsys.readouterr().out
    assert "perturbed 1-D parameters:" in out and "max per-unit error" in out

    monkeypatch.setattr(TimmBackbone, "lens", _broken_lens)
    with monkeypatch.context() as m:                         # the check as it was: random init, unperturbed
        m.setattr(refs, "perturb_1d", lambda module, seed, scale=0.1: 0)
        assert check_decomposition(cfg) == 0                 # biases 0, γ = 1, β = 0: the bug is invisible
    capsys.readouterr()
    assert check_decomposition(cfg) == 1                     # perturbed: caught
    out = capsys.readouterr().out
    assert "FAIL: relative error" in out and "FAIL: per-unit error" in out


def test_pretrained_weights_are_not_perturbed(capsys, tmp_path):
    from residual_exp.backbones import build_backbone
    from tests.unit.test_decompose_tiny import model_cfg
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in build_backbone(model_cfg(**TIMM_CFG)).model.state_dict().items()},
              str(path))
    assert check_decomposition(_task_cfg(dict(TIMM_CFG, weights=str(path)))) == 0
    assert "pretrained weights: not perturbed" in capsys.readouterr().out


@pytest.mark.parametrize("preset, arch, where", [("timm", "vit_nope", "timm.list_models"),
                                                 ("open_clip", "ViT-X-99", "open_clip.list_models()"),
                                                 ("blip_l_flickr", "blip-nope", "blip-itm-large")])
def test_unknown_architecture_is_a_user_error_naming_where_to_look(preset, arch, where):
    from residual_exp.backbones import build_backbone
    from residual_exp.backbones.base import UnknownArchitecture
    from tests.unit.test_decompose_tiny import model_cfg
    with pytest.raises(UnknownArchitecture, match=f"model.arch='{arch}' is not a.*{re.escape(where)}"):
        build_backbone(model_cfg(name=preset, arch=arch, pretrained=None))
