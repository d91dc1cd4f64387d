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


# --- SigLIP-style heads and the classifier choice (issue 20) -------------------------------------------
def _tiny_siglip():
    """A SigLIP-shaped open_clip model (sigmoid-loss logit bias) with a toy character tokenizer."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from residual_exp.backbones.open_clip_backbone import OpenClipBackbone
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(
        embed_dim=32, init_logit_bias=-10.0, init_logit_scale=2.3,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=1,
                             no_causal_mask=True, pool_type="last")).double().eval()

    def tok(texts):
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, t in enumerate(texts):
            codes = [3 + ord(c) % 90 for c in t][:15]
            ids[i, :len(codes)] = torch.tensor(codes)
        return ids
    return OpenClipBackbone("tiny_siglip", model, None, tok, 32), tok


def test_siglip_head_reproduces_the_models_own_logits():
    """Zero-shot logits with the model's own scale and bias: open_clip's get_logits exactly."""
    bb, tok = _tiny_siglip()
    assert bb.logit_bias == pytest.approx(-10.0) and bb.logit_scale == pytest.approx(torch.tensor(2.3).exp().item())
    names = ["circle", "square", "triangle"]
    head = ClassifierHead(zero_shot_weights(bb, names, ["{}"], progress=False).double(), bb.logit_scale,
                          bias=bb.logit_bias)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = bb.model.get_logits(x, tok(names))                    # scale · cos + bias
        got = head(bb.encode_image(x))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)                 # (text weights are built in float32)
    # cross-entropy (and the argmax) do not see a bias shared by every class
    y = torch.tensor([0, 1, 2, 0])
    assert torch.allclose(F.cross_entropy(got, y), F.cross_entropy(got - bb.logit_bias, y), atol=1e-12)


def test_classifier_choice_and_the_recorded_head(tmp_path):
    from residual_exp.cache import Cache
    from residual_exp.classifiers import frozen_classifier, head_kind, record_kind
    assert head_kind("auto", True) == "text" and head_kind("auto", False) == "prototype"
    assert head_kind("prototype", True) == "prototype"
    with pytest.raises(ValueError, match="classifier=text: the model has no text tower"):
        head_kind("text", False)
    assert record_kind("prototype", True, "mean") == "prototype-mean" and record_kind("auto", True, "cosine") == "text"
    bb, _ = _tiny_siglip()

    def no_text(texts):
        raise AssertionError("tokenized")
    bb._tokenizer = no_text

    class Enc:
        features = torch.randn(6, 32, dtype=torch.float64).numpy()
        labels = torch.tensor([0, 1, 2, 0, 1, 2]).numpy()
    head = frozen_classifier(bb, ["a", "b", "c"], ["{}"], Cache(tmp_path, enabled=False), {}, lambda: Enc,
                             progress=False, choice="prototype")
    assert not head.normalize_weights and head.bias == 0.0 and head.weight.shape == (3, 32)
