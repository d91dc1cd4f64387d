"""The seven paper backbones at real size with random weights: Σ units == feature (float32).

Slow (ViT-L forwards on CPU): run with ``pytest -m slow tests/unit/test_decompose_real.py``.
Each test builds its model from the real ``conf/model/<name>.yaml`` with ``pretrained=null``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from residual_exp.backbones import build_backbone
from residual_exp.config import ModelConfig
from residual_exp.decompose.hooks import count_hooks

CONF = Path(__file__).resolve().parents[2] / "residual_exp" / "conf" / "model"
REL_TOL = 1e-5

# name → (layers, heads, output dim)
BACKBONES = {
    "clip_b": (12, 12, 512),
    "openclip_b": (12, 12, 512),
    "clip_l": (24, 16, 768),
    "openclip_l": (24, 16, 768),
    "vit_l": (24, 16, 1024),
    "dinov2_l": (24, 16, 1024),
    "blip_l_flickr": (24, 16, 256),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_real_size_decomposition(name):
    L, H, D = BACKBONES[name]
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"),
                          {"pretrained": None, "image_size": 224})
    torch.manual_seed(0)
    bb = build_backbone(cfg).float().eval()
    assert bb.image_size == 224
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    # the default (official) convention shares the final norm's centring and bias among the units, so it has
    # no constant units; the centred convention keeps them as two explicit units (DESIGN.md §2)
    for convention, n_const in (("official", 0), ("centred", 2)):
        bb.use_convention(convention)
        assert bb.layout.counts() == {"embed": 1, "head": L * H, "mlp": L, "const": n_const}
        assert len(bb.layout) == 1 + L * (H + 1) + n_const      # official B/16: 157, L: 409
        with torch.no_grad():
            units, feature = bb.decompose(x)
        assert units.shape == (2, len(bb.layout), D)
        diff = units.sum(1) - feature                            # [B, D]
        abs_err = diff.abs().max().item()
        rel_err = (diff.abs().amax(-1) / feature.abs().amax(-1)).max().item()
        print(f"\n{name} {convention}: units {len(bb.layout)} {bb.layout.counts()}  abs {abs_err:.3e}  rel {rel_err:.3e}")
        assert rel_err <= REL_TOL
        assert count_hooks(bb) == 0
