"""open_clip CLIP models: ``clip_b``, ``clip_l``, ``openclip_b``, ``openclip_l``, ``tiny_clip``
and the generic ``model=open_clip model.arch=… model.pretrained=…``.

Per-head outputs: open_clip's ``ResidualAttentionBlock`` uses ``nn.MultiheadAttention``,
whose ``out_proj`` is never called as a module, so hooks on it never fire.  Inside
:meth:`Backbone.decomposing` each block's ``attn`` gets an *instance-level* forward that
computes the same attention with ``F.scaled_dot_product_attention`` and stores the CLS
query's per-head value mix ``z [B, H, Dh]`` before the output projection (no extra cost).
The MLP contribution is read from ``ls_2``'s output, the embedding from ``ln_pre``'s.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decompose.readout import Lens, lens_from
from ..decompose.stack import cls_input_pre_hook, layer_scale
from .base import Backbone, UnsupportedArchitecture, register_backbone
from .weights import WeightsUnavailable, check_local_file, offline_hint

log = logging.getLogger(__name__)


def check_open_clip_vision(visual: nn.Module) -> None:
    """Refuse architectures whose readout is not linear in the CLS residual units."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedArchitecture(
            f"image tower {type(visual).__name__} is not a CLS-pooled VisionTransformer "
            "(ResNets and timm-tower CLIPs have no residual-unit readout); use a ViT CLIP or model=timm")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedArchitecture(
            "attention-pooled readout (CoCa / attentional pooler) is not linear in the residual units")
    if visual.pool_type != "tok":
        raise UnsupportedArchitecture(
            f"pool_type={visual.pool_type!r}: only CLS-token pooling ('tok') decomposes into CLS units")
    bad = [type(b).__name__ for b in visual.transformer.resblocks if not isinstance(b, ResidualAttentionBlock)]
    if bad:
        raise UnsupportedArchitecture(f"custom attention blocks ({bad[0]}: qk-norm / scaled-cosine "
                                      "attention) are not supported by the per-head decomposition")


class OpenClipBackbone(Backbone):
    family = "open_clip"

    def __init__(self, name: str, model: nn.Module, transform, tokenizer, image_size: int) -> None:
        visual = model.visual
        check_open_clip_vision(visual)
        blocks = visual.transformer.resblocks
        output_dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
        super().__init__(name, output_dim, len(blocks), blocks[0].attn.num_heads, transform, image_size,
                         has_text=True, logit_scale=float(model.logit_scale.detach().exp()))
        self.model = model
        self._tokenizer = tokenizer

    @property
    def vision(self) -> nn.Module:
        return self.model.visual

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

    # --- decomposition ------------------------------------------------------------------
    def _install(self, hs, store: dict) -> None:
        visual = self.model.visual
        batch_first = getattr(visual.transformer, "batch_first", True)
        # clone the CLS slices: a view would keep each layer's whole [B, N, W] activation alive
        cls = (lambda t: t[:, 0].clone()) if batch_first else (lambda t: t[0].clone())
        store["heads"], store["mlps"] = [], []
        hs.forward_hook(visual.ln_pre, lambda m, i, o: store.__setitem__("embed", cls(o)))
        for block in visual.transformer.resblocks:
            hs.instance_forward(block.attn, _make_mha_forward(block.attn, store["heads"], batch_first))
            hs.forward_hook(block.ls_2, lambda m, i, o: store["mlps"].append(cls(o)))
        # ln_post sees [B, N, W] (batch first) or the pooled [B, W] (final_ln_after_pool)
        hs.forward_pre_hook(visual.ln_post, cls_input_pre_hook(store, "final_in"))

    def final(self):
        return self.model.visual.ln_post, self.model.visual.proj, None

    def lens(self) -> Lens:
        blocks = self.model.visual.transformer.resblocks
        return lens_from([b.attn.out_proj.weight for b in blocks], [b.attn.out_proj.bias for b in blocks],
                         [layer_scale(b.ls_1) for b in blocks], self.num_heads, *self.final())


def _make_mha_forward(mha: nn.MultiheadAttention, sink: list, batch_first: bool):
    """Same computation as ``nn.MultiheadAttention`` (self-attention, eval), exposing per-head z."""
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedArchitecture("nn.MultiheadAttention with separate k/v dims or bias_k is not supported")

    def forward(query, key=None, value=None, key_padding_mask=None, need_weights=False,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if key is not None and key is not query or value is not None and value is not query:
            raise UnsupportedArchitecture("cross-attention blocks cannot be decomposed at the CLS token")
        if key_padding_mask is not None:
            raise UnsupportedArchitecture("key_padding_mask is not supported in the image tower")
        x = query if batch_first else query.transpose(0, 1)              # [B, N, W]
        B, N, W = x.shape
        H = mha.num_heads
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)           # [B, N, 3W]
        q, k, v = qkv.view(B, N, 3, H, W // H).permute(2, 0, 3, 1, 4)     # 3 × [B, H, N, Dh]
        p = mha.dropout if mha.training else 0.0
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # [B, H, N, Dh]
        sink.append(z[:, :, 0].clone())                                   # [B, H, Dh] CLS query
        out = mha.out_proj(z.transpose(1, 2).reshape(B, N, W))            # [B, N, W]
        return (out if batch_first else out.transpose(0, 1)), None

    return forward


# --- construction ---------------------------------------------------------------------
def create_open_clip(arch: str, pretrained: str | None, weights: str | None, image_size: int | None,
                     cache_dir: str | None, quick_gelu: bool = False):
    """``(model, transform, tokenizer)`` from open_clip, with offline-friendly errors."""
    import open_clip
    if arch not in open_clip.list_models():
        raise KeyError(f"model.arch={arch!r} is not an open_clip architecture; "
                       f"see open_clip.list_models() (e.g. ViT-B-16, ViT-L-14)")
    source = None
    if weights:
        source = str(check_local_file(weights, "model.weights"))
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise KeyError(f"model.pretrained={pretrained!r} is not a tag of {arch}; valid: {tags}")
        source = pretrained
    kwargs = dict(force_quick_gelu=quick_gelu, cache_dir=cache_dir)
    if image_size:
        kwargs["force_image_size"] = image_size
    try:
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=source, **kwargs)
    except Exception as e:  # hub download failures surface as many exception types
        if source is None or weights:
            raise
        raise WeightsUnavailable(
            f"could not load open_clip weights {arch}/{pretrained}: {type(e).__name__}: {e}\n"
            + offline_hint(f"open_clip {arch} '{pretrained}'",
                           "model.weights=/path/to/open_clip_model.bin (or .safetensors)",
                           cache_dir)) from e
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return model, transform, tokenizer


@register_backbone("open_clip", "any CLS-pooled open_clip ViT: model.arch=… model.pretrained=… "
                                "(model.params.quick_gelu for OpenAI weights)")
def build_open_clip(cfg) -> OpenClipBackbone:
    if not cfg.arch:
        raise ValueError("model.arch is required for model.family=open_clip (e.g. model.arch=ViT-B-16)")
    model, transform, tokenizer = create_open_clip(cfg.arch, cfg.pretrained, cfg.weights, cfg.image_size,
                                                   cfg.cache_dir, bool(cfg.params.get("quick_gelu", False)))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return OpenClipBackbone(cfg.name, model, transform, tokenizer, int(size))
