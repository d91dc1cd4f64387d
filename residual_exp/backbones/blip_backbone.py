"""BLIP ITM/ITC retrieval models (transformers ``BlipForImageTextRetrieval``): ``blip_l_flickr``.

The image feature is the one BLIP's retrieval model scores with ``use_itm_head=False``
(transformers ``BlipForImageTextRetrieval.forward``)::

    image_embeds = vision_model(pixel_values).last_hidden_state   # post_layernorm applied once
    feature      = vision_proj(image_embeds[:, 0])                # [B, 256], before L2-normalising

(the vision model's ``pooler_output`` applies ``post_layernorm`` a second time; retrieval does
not use it).  The text feature is ``text_proj(text_encoder(ids, mask).last_hidden_state[:, 0])``
(BERT-base in bidirectional "text" mode).

BLIP's vision layer is pre-norm like CLIP's ViT (``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``),
has no norm before the first layer and ``post_layernorm`` as its final norm, so the CLS
feature decomposes exactly:

* ``embed``   the CLS row of ``vision_model.embeddings``' output (class + position embedding)
* ``LlHh``    a forward pre-hook on ``self_attn.projection`` sees ``[B, N, H·Dh]``; head h's
              unit is ``z_h @ W_O[:, h]ᵀ`` with ``W_O = projection.weight.view(D, H, Dh)``
* ``Ll.mlp``  the CLS row of ``layer.mlp``'s output
* ``attn_bias``, ``out_bias``  Σ_l ``projection.bias`` and ``post_layernorm``'s β through ``vision_proj`` (+ its bias)

Weights: ``model.pretrained=Salesforce/blip-itm-large-flickr`` (a hub repo; the checkpoint runs
at 384 px) → ``BlipForImageTextRetrieval.from_pretrained``; ``model.weights=`` a
``save_pretrained`` directory, or a state-dict file in the installed transformers' layout
(``torch.save(model.state_dict())`` / safetensors) loaded strictly into the ``model.arch`` preset
(+ ``model.params.vision_config`` / ``text_config`` overrides); ``model.pretrained=null`` →
random weights with the preset architecture (``blip-itm-large``: ViT-L/16 vision tower, width
1024, 24 layers, 16 heads, 384 px; BERT-base text tower; 256-d ITC space).

Image size: ``model.image_size`` (e.g. 224 in tests) builds random models at that size; for
loaded weights at another size the position embeddings are interpolated at run time with
transformers' ``interpolate_pos_encoding=True``.

Temperature: BLIP scores ``sim / temp`` with a learned ``temp``.  transformers'
``BlipForImageTextRetrieval`` does not carry it (the hub checkpoints drop it), so
``logit_scale`` is ``1 / model.params.temp`` when given, else ``1 / model.temp`` if a future
port has one, else ``model.logit_scale`` (the YAML uses 1/0.07, BLIP's initial temperature).

Tokenizer: BLIP's BERT tokenizer needs its vocab file from the hub repo (``model.pretrained``,
else ``model.params.tokenizer``: a repo id or a local directory); when it is unavailable,
:meth:`BlipBackbone.tokenize` raises :class:`WeightsUnavailable` (no fake vocabulary).
"""
from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..decompose.readout import Lens, lens_from
from ..decompose.references import blip_reference
from ..decompose.stack import cls_heads_pre_hook, cls_input_pre_hook
from .base import Backbone, UnknownArchitecture, UnsupportedArchitecture, register_backbone
from .weights import WeightsUnavailable, check_local_file, offline_hint

log = logging.getLogger(__name__)

BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_REPO = "Salesforce/blip-itm-large-flickr"
TEXT_MAX_LENGTH = 35  # BLIP's retrieval captions are truncated to 35 tokens

# Architecture presets for random weights / state-dict files (values of the hub configs).
_TEXT_BERT_BASE = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=512)
PRESETS: dict[str, dict[str, Any]] = {
    "blip-itm-large": dict(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=384, patch_size=16, initializer_range=0.02),
        text_config=_TEXT_BERT_BASE, image_text_hidden_size=256),
    "blip-itm-base": dict(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=384, patch_size=16, initializer_range=0.02),
        text_config=_TEXT_BERT_BASE, image_text_hidden_size=256),
}


def _to_rgb(image):
    return image.convert("RGB")


def blip_transform(image_size: int):
    """BLIP's eval preprocessing (as ``BlipImageProcessor``): RGB, bicubic resize to
    ``image_size²`` (no crop), BLIP/CLIP mean/std.  Plain torchvision, so it works offline."""
    from torchvision import transforms as T
    return T.Compose([
        T.Lambda(_to_rgb),
        T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(BLIP_MEAN, BLIP_STD),
    ])


def check_blip_vision(vision_model: nn.Module) -> None:
    """Refuse BLIP variants whose layers differ from the pre-norm layer decomposed here."""
    from transformers.models.blip.modeling_blip import BlipAttention, BlipEncoderLayer, BlipVisionModel
    if not isinstance(vision_model, BlipVisionModel):
        raise UnsupportedArchitecture(f"{type(vision_model).__name__} is not a BlipVisionModel")
    for i, layer in enumerate(vision_model.encoder.layers):
        if type(layer).forward is not BlipEncoderLayer.forward:
            raise UnsupportedArchitecture(f"vision layer {i} is {type(layer).__name__}, not BlipEncoderLayer")
        if type(layer.self_attn).forward is not BlipAttention.forward:
            raise UnsupportedArchitecture(f"vision layer {i} attention is {type(layer.self_attn).__name__}, "
                                          "not BlipAttention: per-head outputs unavailable")


class _BlipImageTower(nn.Module):
    """``vision_model`` + ``vision_proj``: what ``finetune`` trains; ``forward`` is the image feature."""

    def __init__(self, vision_model: nn.Module, vision_proj: nn.Linear, interpolate_pos_encoding: bool) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.vision_proj = vision_proj
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=images, interpolate_pos_encoding=self.interpolate_pos_encoding)
        return self.vision_proj(out.last_hidden_state[:, 0])               # [B, D]


class BlipBackbone(Backbone):
    """BLIP retrieval model: ITC image/text features (unnormalised) and their decomposition."""

    family = "blip"

    def __init__(self, name: str, model: nn.Module, transform, image_size: int,
                 tokenizer_source: str | None = None, cache_dir: str | None = None,
                 logit_scale: float = 100.0) -> None:
        vision = model.vision_model
        check_blip_vision(vision)
        vcfg = vision.config
        native = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        interpolate = int(image_size) != int(native)
        if interpolate and "interpolate_pos_encoding" not in inspect.signature(type(vision).forward).parameters:
            raise UnsupportedArchitecture(
                f"this transformers version cannot run BLIP at {image_size} px (checkpoint: {native} px): "
                "no interpolate_pos_encoding; use model.image_size=null")
        super().__init__(name, model.vision_proj.out_features, vcfg.num_hidden_layers, vcfg.num_attention_heads,
                         transform, image_size, has_text=True, logit_scale=logit_scale)
        self.model = model
        # not registered as a submodule: its parameters are model's, listed once in state_dict()
        object.__setattr__(self, "_tower", _BlipImageTower(vision, model.vision_proj, interpolate))
        self._tokenizer_source = tokenizer_source
        self._cache_dir = cache_dir
        self._tokenizer = None

    @property
    def vision(self) -> nn.Module:
        return self._tower

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._tower(images)

    def encode_text(self, tokens) -> torch.Tensor:
        """``tokens``: what :meth:`tokenize` returns (input_ids + attention_mask), or an ids tensor."""
        if isinstance(tokens, torch.Tensor):
            ids, mask = tokens, torch.ones_like(tokens)
        else:
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
        out = self.model.text_encoder(input_ids=ids, attention_mask=mask)  # bidirectional text mode
        return self.model.text_proj(out.last_hidden_state[:, 0])         # [B, D]

    def tokenize(self, texts: list[str]):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer(list(texts), padding="longest", truncation=True, max_length=TEXT_MAX_LENGTH,
                               return_tensors="pt")

    def _load_tokenizer(self):
        src = self._tokenizer_source
        hint = ("BLIP's tokenizer needs its vocab file (vocab.txt / tokenizer.json) from the hub repo "
                f"{src or DEFAULT_REPO}. ")
        if not src:
            raise WeightsUnavailable(hint + "No tokenizer source: set model.pretrained (hub repo) or "
                                     "model.params.tokenizer (repo id or local directory).")
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(src, cache_dir=self._cache_dir)
        except Exception as e:
            raise WeightsUnavailable(
                f"could not load the BLIP tokenizer from {src}: {type(e).__name__}: {e}\n{hint}"
                + offline_hint(f"the tokenizer of {src}", "model.params.tokenizer=/dir/with/tokenizer_files",
                               self._cache_dir)) from e

    # --- decomposition ------------------------------------------------------------------
    def _install(self, hs, store: dict) -> None:
        # CLS rows are cloned so that no layer's whole [B, N, W] activation is kept alive.
        vision = self.model.vision_model
        store["heads"], store["mlps"] = [], []
        hs.forward_hook(vision.embeddings, lambda m, i, o: store.__setitem__("embed", o[:, 0].clone()))  # [B, W]
        for layer in vision.encoder.layers:
            attn = layer.self_attn
            hs.forward_pre_hook(attn.projection, cls_heads_pre_hook(store["heads"], attn.num_heads, attn.head_dim))
            hs.forward_hook(layer.mlp, lambda m, i, o: store["mlps"].append(o[:, 0].clone()))  # [B, W]
        hs.forward_pre_hook(vision.post_layernorm, cls_input_pre_hook(store, "final_in"))

    def final(self):
        vp = self.model.vision_proj
        return self.model.vision_model.post_layernorm, vp.weight.T, vp.bias

    def lens(self) -> Lens:
        layers = self.model.vision_model.encoder.layers
        return lens_from([l.self_attn.projection.weight for l in layers], [l.self_attn.projection.bias for l in layers],
                         [None] * len(layers), self.num_heads, *self.final())


# --- construction ---------------------------------------------------------------------
def blip_config(arch: str, image_size: int | None = None, params: dict | None = None):
    """A ``BlipConfig`` from the ``arch`` preset, ``params.vision_config`` / ``text_config``
    overrides and (for random weights) ``image_size``."""
    from transformers import BlipConfig
    if arch not in PRESETS:
        raise UnknownArchitecture(f"model.arch={arch!r} is not a BLIP preset; valid: {sorted(PRESETS)}")
    params = dict(params or {})
    kw = copy.deepcopy(PRESETS[arch])
    kw["vision_config"].update(dict(params.get("vision_config") or {}))
    kw["text_config"].update(dict(params.get("text_config") or {}))
    if params.get("image_text_hidden_size"):
        kw["image_text_hidden_size"] = int(params["image_text_hidden_size"])
    if image_size:
        kw["vision_config"]["image_size"] = int(image_size)
    return BlipConfig(**kw)


def create_blip(arch: str, pretrained: str | None = None, weights: str | None = None,
                image_size: int | None = None, cache_dir: str | None = None,
                params: dict | None = None) -> nn.Module:
    """A ``BlipForImageTextRetrieval`` in eval mode with the requested weights."""
    from transformers import BlipForImageTextRetrieval
    if weights:
        p = Path(weights).expanduser()
        if p.is_dir():
            model = BlipForImageTextRetrieval.from_pretrained(str(p), local_files_only=True)
        else:
            from .timm_backbone import load_state_dict_file
            src = check_local_file(weights, "model.weights")
            model = BlipForImageTextRetrieval(blip_config(arch, None, params))  # checkpoint's own size
            from .weights import check_fits
            state = load_state_dict_file(src)
            check_fits(model, state, src, f"the BLIP preset {arch} (a state dict of this transformers version's "
                                          "BlipForImageTextRetrieval, or a save_pretrained directory)")
            model.load_state_dict(state, strict=True)
    elif pretrained:
        try:
            model = BlipForImageTextRetrieval.from_pretrained(pretrained, cache_dir=cache_dir)
        except Exception as e:  # offline, missing repo, …
            raise WeightsUnavailable(
                f"could not load BLIP weights {pretrained}: {type(e).__name__}: {e}\n"
                + offline_hint(f"BLIP {pretrained} (config.json and model.safetensors)",
                               "model.weights=/path/to/save_pretrained_dir", cache_dir)) from e
    else:
        model = BlipForImageTextRetrieval(blip_config(arch, image_size, params))
    return model.eval()


@register_backbone("blip", "BLIP ITC retrieval models (transformers BlipForImageTextRetrieval): "
                           "model.arch=<preset> model.pretrained=<hub repo | null>",
                   reference=lambda bb, images: blip_reference(bb.vision.vision_model, images,
                                                               bb.vision.interpolate_pos_encoding, bb.vision.vision_proj))
def build_blip(cfg) -> BlipBackbone:
    if not cfg.arch:
        raise ValueError(f"model.arch is required for model.family=blip; presets: {sorted(PRESETS)}")
    params = dict(cfg.params or {})
    model = create_blip(cfg.arch, cfg.pretrained, cfg.weights, cfg.image_size,
                        cfg.cache_dir, params)
    native = model.config.vision_config.image_size
    size = int(cfg.image_size or (native if isinstance(native, int) else native[0]))
    if params.get("temp"):
        logit_scale = 1.0 / float(params["temp"])
    elif isinstance(getattr(model, "temp", None), torch.Tensor):
        logit_scale = 1.0 / float(model.temp.detach())
    else:
        logit_scale = float(cfg.logit_scale)
    tok = cfg.pretrained if (cfg.pretrained and not cfg.weights) else params.get("tokenizer")
    if cfg.weights and Path(cfg.weights).expanduser().is_dir() and not tok:
        tok = str(Path(cfg.weights).expanduser())
    return BlipBackbone(cfg.name, model, blip_transform(size), size, tokenizer_source=tok,
                        cache_dir=cfg.cache_dir, logit_scale=logit_scale)
