"""The embedded tiny CLIP: exact decomposition in float64, tokenizer, hooks removed."""
import torch
from omegaconf import OmegaConf

from residual_exp.backbones import build_backbone
from residual_exp.backbones.tiny_clip import CHECKPOINT, create_tiny_clip, default_vocab
from residual_exp.decompose.hooks import count_hooks

CFG = dict(name="tiny_clip", family="tiny_clip", arch="tiny-clip", weights=None, image_size=None, logit_scale=100.0,
           cache_dir=None, params={})


def test_tiny_clip_units_sum_to_image_feature_float64():
    torch.manual_seed(0)
    bb = build_backbone(OmegaConf.create(dict(CFG, pretrained=None))).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        units, feature = bb.decompose(x)
        plain = bb.encode_image(x)
    assert units.shape == (4, 1 + 4 * 4 + 4, 64)                 # official units: no constant units
    assert bb.layout.counts() == {"embed": 1, "head": 16, "mlp": 4, "const": 0}
    assert (units.sum(1) - feature).abs().max() <= 1e-10
    # the instance forward computes attention with SDPA instead of MHA's kernel: same maths
    assert (feature - plain).abs().max() <= 1e-12
    assert count_hooks(bb) == 0


def test_embedded_checkpoint_loads_and_decomposes():
    assert CHECKPOINT.exists(), "the embedded checkpoint ships with the repo"
    assert CHECKPOINT.stat().st_size <= 5 * 2**20
    bb = build_backbone(OmegaConf.create(dict(CFG, pretrained="embedded"))).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        units, feature = bb.decompose(x)
    assert (units.sum(1) - feature).abs().max() <= 1e-10
    assert 1.0 < bb.logit_scale <= 100.0


def test_word_tokenizer_ends_with_highest_id_and_pads():
    _, _, tok = create_tiny_clip(None)
    t = tok(["a red circle", "a zebra"])
    assert t.shape == (2, tok.context_length)
    assert t[0, 0] == 2 and t[0, 4] == tok.eot and t[0, 5:].eq(0).all()
    assert t.argmax(-1).tolist() == [4, 3]      # open_clip's argmax pooling finds the end token
    assert t[1, 2] == 1                         # unknown word → <unk>
    assert "circle" in default_vocab()
