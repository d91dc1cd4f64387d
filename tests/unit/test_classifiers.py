"""Frozen classifiers: zero-shot text head built the standard way, prototypes = class means."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from residual_exp.backbones import build_backbone
from residual_exp.classifiers import ClassifierHead, prototype_weights, zero_shot_weights

CFG = OmegaConf.create(dict(name="tiny_clip", family="tiny_clip", arch="tiny-clip", pretrained="embedded", weights=None,
                            image_size=None, logit_scale=100.0, cache_dir=None, params={}))


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(CFG).double().eval()


def test_zero_shot_weights_average_normalised_templates_per_class(backbone):
    names, templates = ["red", "green", "blue"], ["the {} shape.", "something {}.", "a drawing in {}."]
    w = zero_shot_weights(backbone, names, templates, batch_size=4, progress=False)   # batches split classes
    assert w.shape == (3, backbone.output_dim)
    assert torch.allclose(w.norm(dim=-1), torch.ones(3, dtype=w.dtype), atol=1e-6)
    with torch.no_grad():
        for c, name in enumerate(names):
            feats = F.normalize(backbone.encode_text(backbone.tokenize([t.format(name) for t in templates])).float(), dim=-1)
            expected = F.normalize(feats.mean(0), dim=-1)
            assert torch.allclose(w[c], expected, atol=1e-6)


def test_zero_shot_rejects_bad_templates(backbone):
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_weights(backbone, ["red"], ["no placeholder"], progress=False)


def test_prototypes_are_class_means_of_normalised_features():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(50) % 3
    w = prototype_weights(feats, labels, 3)
    for c in range(3):
        assert torch.allclose(w[c], F.normalize(feats[labels == c], dim=-1).mean(0), atol=1e-12)
    with pytest.raises(ValueError, match="no training example"):
        prototype_weights(feats, labels, 4)


def test_head_is_scaled_cosine():
    w = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    head = ClassifierHead(w, scale=10.0)
    logits = head(torch.tensor([[5.0, 0.0], [1.0, 1.0]]))
    assert torch.allclose(logits, torch.tensor([[10.0, 0.0], [7.0710678, 7.0710678]]), atol=1e-5)
