"""Exact decomposition on tiny random models of every family (open_clip, timm, BLIP), float64.

Σ units must equal the image feature to 1e-10, the unit layout must match the architecture,
hooks must come off (also after an exception), unsupported readouts must be refused with a
clear message, and weights saved to a file must load back through ``model.weights=``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from residual_exp.backbones import UnsupportedArchitecture, build_backbone, list_families
from residual_exp.backbones.weights import WeightsUnavailable
from residual_exp.config import ModelConfig
from residual_exp.decompose.hooks import count_hooks

ATOL = 1e-10
SIZE = 32
MODEL_CONF = Path(__file__).resolve().parents[2] / "residual_exp" / "conf" / "model"


def model_cfg(**kw):
    """A validated ``model`` node, as Hydra would compose it: the preset ``conf/model/NAME.yaml``
    (the one source of truth for a model) with ``kw`` on top."""
    preset = MODEL_CONF / f"{kw['name']}.yaml"
    base = OmegaConf.load(preset) if preset.exists() else {}
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), base, kw)


def images(n: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# --- tiny models ------------------------------------------------------------------------
def tiny_open_clip(**vision):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    vcfg = dict(layers=2, width=64, head_width=16, patch_size=8, image_size=SIZE)
    vcfg.update(vision)
    model = open_clip.model.CLIP(
        embed_dim=32, vision_cfg=CLIPVisionCfg(**vcfg),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=1))
    return model.double().eval()


def tiny_open_clip_backbone(**vision):
    from residual_exp.backbones.open_clip_backbone import OpenClipBackbone
    return OpenClipBackbone("tiny_open_clip", tiny_open_clip(**vision), None, None, SIZE)


TIMM_TINY = dict(img_size=SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def tiny_timm(**kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(**{**TIMM_TINY, **kw}).double().eval()


def tiny_timm_backbone(**kw):
    from residual_exp.backbones.timm_backbone import TimmBackbone
    return TimmBackbone("tiny_timm", tiny_timm(**kw), None, SIZE)


BLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=SIZE, patch_size=8, initializer_range=0.02)
BLIP_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=40, bos_token_id=1, sep_token_id=2, eos_token_id=2, pad_token_id=0)


def tiny_blip():
    from transformers import BlipConfig, BlipForImageTextRetrieval
    torch.manual_seed(0)
    cfg = BlipConfig(vision_config=BLIP_VISION, text_config=BLIP_TEXT, image_text_hidden_size=16)
    return BlipForImageTextRetrieval(cfg).double().eval()


def tiny_blip_backbone(image_size: int = SIZE):
    from residual_exp.backbones.blip_backbone import BlipBackbone, blip_transform
    return BlipBackbone("tiny_blip", tiny_blip(), blip_transform(image_size), image_size)


# name → (factory, layers, heads, output dim)
CASES = {
    "open_clip": (lambda: tiny_open_clip_backbone(), 2, 4, 32),
    "open_clip_layerscale": (lambda: tiny_open_clip_backbone(ls_init_value=0.5), 2, 4, 32),
    "timm": (lambda: tiny_timm_backbone(), 2, 4, 64),
    "timm_layerscale": (lambda: tiny_timm_backbone(init_values=0.5), 2, 4, 64),
    "timm_registers": (lambda: tiny_timm_backbone(reg_tokens=4, init_values=0.5, no_embed_class=True), 2, 4, 64),
    "timm_pre_norm": (lambda: tiny_timm_backbone(pre_norm=True), 2, 4, 64),
    "timm_no_final_norm": (lambda: tiny_timm_backbone(final_norm=False), 2, 4, 64),
    "blip": (lambda: tiny_blip_backbone(), 2, 4, 16),
    "blip_interpolated_pos": (lambda: tiny_blip_backbone(image_size=48), 2, 4, 16),
}


# --- exactness --------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["official", "centred"])
@pytest.mark.parametrize("case", list(CASES))
def test_units_sum_to_feature(case, convention):
    factory, L, H, D = CASES[case]
    bb = factory().use_convention(convention)
    x = images(size=bb.image_size)
    with torch.no_grad():
        plain = bb.encode_image(x)
        units, feature = bb.decompose(x)
    consts = 2 if convention == "centred" else 0
    assert units.shape == (2, 1 + L * (H + 1) + consts, D)
    assert feature.shape == (2, D)
    assert (units.sum(1) - feature).abs().max().item() <= ATOL
    assert torch.equal(plain, feature) or (plain - feature).abs().max().item() <= ATOL
    assert feature.abs().max().item() > 1e-3           # not trivially zero
    assert bb.layout.counts() == {"embed": 1, "head": L * H, "mlp": L, "const": consts}
    assert bb.layout.names[1] == "L0H0"
    if consts:
        assert bb.layout.names[-2:] == ("attn_bias", "out_bias")
    assert count_hooks(bb) == 0


@pytest.mark.parametrize("case", ["open_clip", "timm_layerscale", "blip"])
def test_hooks_removed_after_exception(case):
    bb = CASES[case][0]()
    with pytest.raises(RuntimeError, match="boom"):
        with bb.decomposing() as store:
            with torch.no_grad():
                bb.encode_image(images(size=bb.image_size))
            assert count_hooks(bb) > 0 and store["heads"]
            raise RuntimeError("boom")
    assert count_hooks(bb) == 0


def test_head_units_are_per_head_attention_outputs():
    """The L0H{h} units of a timm ViT are exactly head h's slice through proj (× LayerScale)."""
    bb = tiny_timm_backbone(init_values=0.5)
    m = bb.model
    x = images()
    captured = {}
    h = m.blocks[0].attn.proj.register_forward_pre_hook(lambda mod, a: captured.__setitem__("z", a[0][:, 0]))
    with torch.no_grad():
        bb.encode_image(x)
        h.remove()
        z = captured["z"].view(2, 4, 16)                                       # [B, H, Dh]
        w = m.blocks[0].attn.proj.weight                                       # [D, H·Dh]
        want = torch.stack([z[:, k] @ w[:, 16 * k:16 * (k + 1)].T for k in range(4)], 1)  # [B, H, D]
        want = want * m.blocks[0].ls1.gamma
        with bb.decomposing() as store:
            bb.encode_image(x)
    got_z = store["heads"][0]                                                  # [B, H, Dh]
    assert torch.allclose(got_z, z, atol=0, rtol=0)
    w_o = w.view(64, 4, 16)
    assert torch.allclose(torch.einsum("bhd,whd->bhw", got_z, w_o) * m.blocks[0].ls1.gamma, want, atol=1e-12)


# --- refusals ---------------------------------------------------------------------------
def test_timm_refuses_two_final_norms():
    """(Average and attention pooling decompose: tests/unit/test_decompose_pooled.py.)"""
    from residual_exp.backbones.timm_backbone import TimmBackbone
    m = tiny_timm(global_pool="avg")
    m.norm = nn.LayerNorm(64)
    with pytest.raises(UnsupportedArchitecture, match="both a final norm .* and an fc_norm"):
        TimmBackbone("x", m, None, SIZE)


def test_timm_refuses_res_post_norm_blocks():
    from timm.models.vision_transformer import ResPostBlock
    from residual_exp.backbones.timm_backbone import TimmBackbone
    with pytest.raises(UnsupportedArchitecture, match="ResPostBlock"):
        TimmBackbone("x", tiny_timm(block_fn=ResPostBlock), None, SIZE)


def test_timm_refuses_distilled_and_non_vit():
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.resnet import BasicBlock, ResNet
    from residual_exp.backbones.timm_backbone import TimmBackbone
    with pytest.raises(UnsupportedArchitecture, match="overrides VisionTransformer.forward_head"):
        TimmBackbone("x", VisionTransformerDistilled(**TIMM_TINY), None, SIZE)
    with pytest.raises(UnsupportedArchitecture, match="ResNet is not a timm ViT with a residual stream"):
        TimmBackbone("x", ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10), None, SIZE)


def test_timm_builder_refuses_resnet_arch():
    with pytest.raises(UnsupportedArchitecture, match="ResNet is not a timm ViT"):
        build_backbone(model_cfg(name="timm", arch="resnet10t"))


def test_open_clip_refuses_resnet_and_pooled_towers():
    from residual_exp.backbones.open_clip_backbone import OpenClipBackbone
    with pytest.raises(UnsupportedArchitecture, match="ModifiedResNet is not an open_clip VisionTransformer"):
        OpenClipBackbone("x", tiny_open_clip(layers=(1, 1, 1, 1), width=16, head_width=8), None, None, SIZE)
    with pytest.raises(UnsupportedArchitecture, match="CoCa attentional pooler"):
        OpenClipBackbone("x", tiny_open_clip(attentional_pool=True, attn_pooler_queries=4,
                                             attn_pooler_heads=4), None, None, SIZE)


def test_generic_builders_ask_for_arch():
    with pytest.raises(ValueError, match="model.arch is required"):
        build_backbone(model_cfg(name="timm"))
    with pytest.raises(ValueError, match="model.arch is required"):
        build_backbone(model_cfg(name="open_clip"))


def test_timm_unknown_tag_lists_valid_ones():
    with pytest.raises(KeyError, match="augreg_in21k_ft_in1k"):
        build_backbone(model_cfg(name="vit_l", pretrained="no_such_tag"))


def test_registry_has_every_family_and_every_preset_names_one():
    assert set(list_families()) == {"open_clip", "tiny_clip", "timm", "blip"}
    for preset in MODEL_CONF.glob("*.yaml"):
        assert OmegaConf.load(preset).family in list_families(), preset.name


# --- weights ----------------------------------------------------------------------------
TIMM_CFG = dict(name="timm", arch="vit_tiny_patch16_224", image_size=SIZE,
                params={"create_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_weights_file_roundtrip(tmp_path, suffix):
    ref = build_backbone(model_cfg(**TIMM_CFG)).double()
    with torch.no_grad():                       # make the weights non-default
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / f"vit{suffix}"
    sd = {k: v.float().contiguous() for k, v in ref.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    loaded = build_backbone(model_cfg(**TIMM_CFG, weights=str(path))).double()
    ref.float().double()                        # same float32 round-off as the file
    x = images()
    with torch.no_grad():
        want = ref.encode_image(x)
        units, got = loaded.decompose(x)
    assert torch.equal(got, want)
    assert (units.sum(1) - got).abs().max().item() <= ATOL


def test_timm_loads_transformers_vit_file(tmp_path):
    """A transformers ViTForImageClassification file (the vit_l paper checkpoint's format)."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    hf = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=256, image_size=SIZE, patch_size=8,
                                             num_labels=1000)).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    bb = build_backbone(model_cfg(**TIMM_CFG, weights=str(path))).double()
    hf = hf.double()
    x = images()
    with torch.no_grad():
        units, feature = bb.decompose(x)
        want = hf.vit(pixel_values=x).last_hidden_state[:, 0]            # [B, D] pre-logits CLS
        logits = hf(pixel_values=x).logits
    assert bb.model.norm.eps == 1e-12
    assert (feature - want).abs().max().item() <= ATOL
    assert (units.sum(1) - feature).abs().max().item() <= ATOL
    assert bb.model.num_classes == 0          # the classifier head is not loaded (nor finetuned)
    # the key conversion itself is complete: a timm ViT with a head reproduces the logits
    import functools
    from timm.models.vision_transformer import VisionTransformer
    from residual_exp.backbones.timm_backbone import convert_hf_vit_state_dict
    full = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=1000,
                             norm_layer=functools.partial(nn.LayerNorm, eps=1e-12)).double().eval()
    full.load_state_dict(convert_hf_vit_state_dict(hf.state_dict()), strict=True)
    with torch.no_grad():
        assert (full(x) - logits).abs().max().item() <= ATOL


BLIP_CFG = dict(name="blip_l_flickr", pretrained=None,
                params={"vision_config": BLIP_VISION, "text_config": BLIP_TEXT, "image_text_hidden_size": 16})


def test_blip_weights_file_roundtrip(tmp_path):
    ref = build_backbone(model_cfg(**BLIP_CFG)).double()
    assert ref.image_size == SIZE and ref.logit_scale == pytest.approx(1 / 0.07)     # the preset's BLIP temperature
    path = tmp_path / "blip.pt"
    torch.save(ref.model.state_dict(), path)
    loaded = build_backbone(model_cfg(**BLIP_CFG, weights=str(path))).double()
    x = images()
    with torch.no_grad():
        want = ref.encode_image(x)
        units, got = loaded.decompose(x)
    assert torch.equal(got, want)
    assert (units.sum(1) - got).abs().max().item() <= ATOL


def test_blip_features_match_transformers_itc_score():
    bb = tiny_blip_backbone()
    x = images()
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = bb.model(input_ids=ids, pixel_values=x, use_itm_head=False, attention_mask=torch.ones_like(ids))
        img = nn.functional.normalize(bb.encode_image(x), dim=-1)
        txt = nn.functional.normalize(bb.encode_text({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), dim=-1)
    assert (out.itm_score - img @ txt.T).abs().max().item() <= ATOL


def test_blip_tokenizer_unavailable_is_clear():
    bb = build_backbone(model_cfg(**BLIP_CFG))
    with pytest.raises(WeightsUnavailable, match="vocab file.*model.params.tokenizer"):
        bb.tokenize(["a photo of a cat"])


def test_blip_temp_sets_logit_scale():
    bb = build_backbone(model_cfg(**{**BLIP_CFG, "params": {**BLIP_CFG["params"], "temp": 0.02}}))
    assert bb.logit_scale == pytest.approx(50.0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return str(tmp_path / "empty_cache")


@pytest.mark.parametrize("cfg", [
    dict(name="timm", arch="vit_tiny_patch16_224", pretrained="augreg_in21k_ft_in1k"),
    dict(name="vit_l", pretrained="google/vit-large-patch16-224"),
])
def test_offline_pretrained_is_clear(offline, cfg):
    with pytest.raises(WeightsUnavailable, match="(?s)Missing: the weights of .*model.weights=.*model.pretrained=null"):
        build_backbone(model_cfg(**cfg, cache_dir=offline))


def test_missing_weights_file_is_clear(tmp_path):
    from residual_exp.backbones.weights import BadWeightsFile            # a user error: one line, exit 2
    with pytest.raises(BadWeightsFile, match="model.weights=.*no such file"):
        build_backbone(model_cfg(**TIMM_CFG, weights=str(tmp_path / "nope.safetensors")))


# --- configs and the check task ------------------------------------------------------------
MODEL_YAMLS = ["clip_b", "clip_l", "openclip_b", "openclip_l", "vit_l", "dinov2_l", "blip_l_flickr",
               "open_clip", "timm"]


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_model_yaml_validates(name):
    conf = MODEL_CONF / f"{name}.yaml"
    text = conf.read_text()
    assert text.startswith("# "), "one-line comment on top"
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(conf))  # unknown keys fail here
    assert node.name == name
    assert set(OmegaConf.load(conf)) <= set(ModelConfig.__dataclass_fields__)      # a preset lists what differs
    assert node.spec.description                                                     # and says what it is


def _task_cfg(model: dict, **task):
    return OmegaConf.create({"model": OmegaConf.to_container(model_cfg(**model)), "device": "cpu",
                             "task": {"name": "check_decomposition", "batch_size": 2, "dtype": "float64",
                                      "tolerance": 1e-10, "seed": 0, **task}})


def test_check_decomposition_task(capsys):
    from residual_exp.tasks.check_decomposition import check_decomposition
    assert check_decomposition(_task_cfg(TIMM_CFG)) == 0
    out = capsys.readouterr().out
    assert "1 embed + 8 head + 2 mlp + 0 const" in out and "OK" in out        # official units
    assert check_decomposition(_task_cfg(BLIP_CFG, dtype="float32", tolerance=1e-5)) == 0
    assert check_decomposition(_task_cfg(TIMM_CFG, tolerance=-1.0)) == 1
    assert "FAIL: relative error" in capsys.readouterr().out
