"""open_clip CLIP models: ``clip_b``, ``clip_l``, ``openclip_b``, ``openclip_l``, ``tiny_clip``
and the generic ``model=open_clip model.arch=… model.pretrained=…``.

Two kinds of image tower decompose exactly into CLS residual units:

* open_clip's own :class:`~open_clip.transformer.VisionTransformer` with CLS-token pooling
  (``pool_type='tok'``, no attentional pooler).  Per-head outputs: its
  ``ResidualAttentionBlock`` uses ``nn.MultiheadAttention``, whose ``out_proj`` is never
  called as a module, so hooks on it never fire.  Inside :meth:`Backbone.decomposing` each
  block's ``attn`` gets an *instance-level* forward that computes the same attention with
  ``F.scaled_dot_product_attention`` and stores the CLS query's per-head value mix
  ``z [B, H, Dh]`` before the output projection (no extra cost).  The MLP contribution is
  read from ``ls_2``'s output, the embedding from ``ln_pre``'s.
* a timm tower (:class:`~open_clip.timm_model.TimmModel`: ``trunk`` + ``head``) whose trunk is
  a CLS-pooled timm ViT that :mod:`.timm_backbone` supports (``VisionTransformer``, ``Eva``,
  ``VisionTransformerRelPos`` with a class token; e.g. EVA01-g-14, MobileCLIP-B,
  MobileCLIP2-L-14, ``vit_relpos_medium_patch16_cls_224``), with a *linear* projection: the
  trunk's own classifier (``timm_proj`` unset: ``trunk.head``, with bias) and/or
  ``TimmModel.head.proj`` (``timm_proj='linear'``), composed into one ``[W, D]`` map + bias.

The architecture is checked before anything is loaded: :func:`check_open_clip_arch` reads
``open_clip.get_model_config(arch)`` and refuses what cannot be decomposed, naming the part
(attention / average pooling, CoCa's attentional pooler, ResNet towers, MLP heads, custom
blocks), then builds the image tower alone on the meta device for the structural check.  The
tokenizer is loaded lazily, on the first :meth:`OpenClipBackbone.tokenize` (some, e.g. SigLIP's,
come from the hub), so a supported model builds offline with random weights.
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
from .base import Backbone, UnknownArchitecture, UnsupportedArchitecture, register_backbone
from .timm_backbone import TimmTower
from .weights import WeightsUnavailable, check_local_file, offline_hint

log = logging.getLogger(__name__)

_CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_TIMM_POOLS = {"avg": "average", "max": "max", "avgmax": "average+max"}


def check_open_clip_config(arch: str, cfg: dict | None = None) -> None:
    """Refuse, from ``open_clip.get_model_config(arch)`` alone (nothing is built or loaded), the
    towers whose readout is not linear in the CLS residual units — one line naming the part."""
    import open_clip
    cfg = open_clip.get_model_config(arch) if cfg is None else cfg
    if not cfg:
        return
    v = dict(cfg.get("vision_cfg") or {})
    if v.get("attentional_pool"):
        raise UnsupportedArchitecture(
            f"{arch}: CoCa attentional pooler (vision_cfg.attentional_pool=True): attention pooling is not "
            "linear in the residual units")
    if "multimodal_cfg" in cfg:
        raise UnsupportedArchitecture(
            f"{arch}: CoCa model (multimodal_cfg): its image latent (L2-normalised, with token outputs for the "
            "captioning decoder) is not supported; use a CLIP ViT")
    if isinstance(v.get("layers"), (list, tuple)):
        raise UnsupportedArchitecture(
            f"{arch}: ResNet image tower (ModifiedResNet, vision_cfg.layers={list(v['layers'])}): not a ViT, "
            "no residual-unit readout; use a ViT CLIP or model=timm")
    name = v.get("timm_model_name")
    if name:
        pool, proj = v.get("timm_pool", "avg"), v.get("timm_proj", "linear")
        if pool == "map":
            raise UnsupportedArchitecture(
                f"{arch}: timm tower with map (attention) pooling (vision_cfg.timm_pool='map', {name}): the "
                "readout is not linear in the residual units")
        if pool in ("abs_attn", "rot_attn"):
            raise UnsupportedArchitecture(
                f"{arch}: timm tower with {pool} attention pooling (vision_cfg.timm_pool={pool!r}, {name}): the "
                "readout is not linear in the residual units")
        if pool in _TIMM_POOLS:
            raise UnsupportedArchitecture(
                f"{arch}: timm tower with {_TIMM_POOLS[pool]} pooling (vision_cfg.timm_pool={pool!r}, {name}): "
                "the readout mixes the patch tokens; only CLS-token pooling is linear in the CLS residual units")
        if proj == "mlp":
            raise UnsupportedArchitecture(
                f"{arch}: timm tower with an MLP head (vision_cfg.timm_proj='mlp', {name}): the projection is "
                "not linear, so the units cannot be pushed through it")
        return
    pool = v.get("pool_type", "tok")
    if pool == "avg":
        raise UnsupportedArchitecture(
            f"{arch}: average pooling (vision_cfg.pool_type='avg', e.g. CLIPA): the readout mixes the patch "
            "tokens; only CLS-token pooling ('tok') is linear in the CLS residual units")
    if pool != "tok":
        raise UnsupportedArchitecture(
            f"{arch}: vision_cfg.pool_type={pool!r}: no CLS-token pooling, nothing to decompose at the CLS token")
    custom = [k for k in _CUSTOM_BLOCK_KEYS if v.get(k)] + (["block_type=custom"] if v.get("block_type") == "custom" else [])
    if custom:
        raise UnsupportedArchitecture(
            f"{arch}: custom attention blocks (vision_cfg: {', '.join(custom)}) are not supported by the "
            "per-head decomposition")


def check_open_clip_arch(arch: str) -> None:
    """:func:`check_open_clip_config`, then the structural check of the image tower built alone
    on the meta device (no weights allocated, no text tower, no tokenizer)."""
    import open_clip
    cfg = open_clip.get_model_config(arch)
    check_open_clip_config(arch, cfg)
    if not cfg:
        return
    try:
        from open_clip.model import _build_vision_tower
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=bool(cfg.get("quick_gelu")))
    except Exception as e:  # a tower that cannot be built on meta: checked after creation instead
        log.debug("meta-device precheck of open_clip %s failed (%s); checking after creation", arch, e)
        return
    check_open_clip_vision(visual, arch)


def _timm_name(trunk: nn.Module) -> str:
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(trunk).__name__


def _timm_head_linears(visual: nn.Module) -> list[nn.Linear]:
    """The linear maps after a timm tower's pooled CLS row: ``trunk.head`` (timm's classifier,
    used as the projection when ``timm_proj`` is unset) then ``TimmModel.head``'s ``proj``."""
    name = _timm_name(visual.trunk)
    linears = []
    th = visual.trunk.head
    if isinstance(th, nn.Linear):
        linears.append(th)
    elif not isinstance(th, nn.Identity):
        raise UnsupportedArchitecture(f"timm tower {name}: trunk.head is {type(th).__name__}, not a linear map")
    for key, m in visual.head.named_children():
        if isinstance(m, (nn.Dropout, nn.Identity)):
            continue
        if isinstance(m, nn.Linear):
            linears.append(m)
        elif key == "mlp":
            raise UnsupportedArchitecture(
                f"timm tower {name} with an MLP head (TimmModel.head.mlp, timm_proj='mlp'): the projection is not "
                "linear, so the units cannot be pushed through it")
        elif key == "pool":
            raise UnsupportedArchitecture(
                f"timm tower {name} with {type(m).__name__} attention pooling (TimmModel.head.pool): the readout "
                "is not linear in the residual units")
        else:
            raise UnsupportedArchitecture(
                f"timm tower {name}: head module {key!r} ({type(m).__name__}) is not a linear projection")
    return linears


def compose_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(P [W, D], b [D])`` with ``x @ P + b`` = applying ``linears`` in order (x @ W1ᵀ + b1, then
    @ W2ᵀ + b2, …); ``(None, None)`` for none."""
    proj, bias = None, None
    for lin in linears:
        w = lin.weight.T                                                  # [in, out]
        if proj is None:
            proj, bias = w, lin.bias
            continue
        proj, bias = proj @ w, (bias @ w if bias is not None else None)
        if lin.bias is not None:
            bias = lin.bias if bias is None else bias + lin.bias
    return proj, bias


def check_open_clip_vision(visual: nn.Module, arch: str | None = None) -> None:
    """Refuse image towers whose readout is not linear in the CLS residual units."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    where = f"{arch}: " if arch else ""
    if isinstance(visual, TimmModel):
        try:
            TimmTower(visual.trunk)
            _timm_head_linears(visual)
        except UnsupportedArchitecture as e:
            msg = str(e)
            raise UnsupportedArchitecture(where + (msg if msg.startswith("timm tower") else
                                                   f"timm tower {_timm_name(visual.trunk)}: {msg}")) from None
        return
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedArchitecture(
            f"{where}image tower {type(visual).__name__} is not a CLS-pooled VisionTransformer or a timm ViT tower "
            "(ResNet towers have no residual-unit readout); use a ViT CLIP or model=timm")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedArchitecture(
            f"{where}attention-pooled readout (CoCa / attentional pooler) is not linear in the residual units")
    if visual.pool_type != "tok":
        kind = "average pooling" if visual.pool_type == "avg" else "no CLS-token pooling"
        raise UnsupportedArchitecture(
            f"{where}pool_type={visual.pool_type!r} ({kind}): only CLS-token pooling ('tok') decomposes into CLS units")
    bad = [type(b).__name__ for b in visual.transformer.resblocks if not isinstance(b, ResidualAttentionBlock)]
    if bad:
        raise UnsupportedArchitecture(f"{where}custom attention blocks ({bad[0]}: qk-norm / scaled-cosine "
                                      "attention) are not supported by the per-head decomposition")


class LazyTokenizer:
    """``open_clip.get_tokenizer(arch)`` on the first call (some tokenizers come from the hub)."""

    def __init__(self, arch: str, cache_dir: str | None = None) -> None:
        self.arch, self.cache_dir, self._tokenizer = arch, cache_dir, None

    def load(self):
        if self._tokenizer is None:
            import open_clip
            try:
                self._tokenizer = open_clip.get_tokenizer(self.arch, cache_dir=self.cache_dir)
            except Exception as e:  # offline hub tokenizers fail with many exception types
                first = (str(e).strip().splitlines() or [""])[0]
                raise WeightsUnavailable(
                    f"could not load the tokenizer of open_clip {self.arch}: {type(e).__name__}: {first}\n"
                    + offline_hint(f"the {self.arch} tokenizer", "a cached copy of the tokenizer files",
                                   self.cache_dir)) from e
        return self._tokenizer

    def __call__(self, texts, *args, **kwargs):
        return self.load()(texts, *args, **kwargs)


class OpenClipBackbone(Backbone):
    family = "open_clip"

    def __init__(self, name: str, model: nn.Module, transform, tokenizer, image_size: int) -> None:
        from open_clip.timm_model import TimmModel
        visual = model.visual
        check_open_clip_vision(visual)
        if isinstance(visual, TimmModel):
            tower = TimmTower(visual.trunk)
            layers, heads = tower.num_layers, tower.num_heads
            linears = _timm_head_linears(visual)
            output_dim = linears[-1].out_features if linears else tower.width
        else:
            tower = None
            blocks = visual.transformer.resblocks
            layers, heads = len(blocks), blocks[0].attn.num_heads
            output_dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
        super().__init__(name, output_dim, layers, heads, transform, image_size,
                         has_text=True, logit_scale=float(model.logit_scale.detach().exp()))
        self.model = model
        self._timm = tower
        self._tokenizer = tokenizer

    @property
    def vision(self) -> nn.Module:
        return self.model.visual

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            raise NotImplementedError(f"{self.name} was built without a tokenizer")
        return self._tokenizer(texts)

    # --- decomposition ------------------------------------------------------------------
    def _install(self, hs, store: dict) -> None:
        if self._timm is not None:
            self._timm.install(hs, store)
            return
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
        if self._timm is not None:
            return (self._timm.final_norm(), *compose_linears(_timm_head_linears(self.model.visual)))
        return self.model.visual.ln_post, self.model.visual.proj, None

    def lens(self) -> Lens:
        if self._timm is not None:
            return lens_from(*self._timm.out_projections(), self.num_heads, *self.final())
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
    """``(model, transform, tokenizer)`` from open_clip, with offline-friendly errors.

    The architecture is checked first (:func:`check_open_clip_arch`); the tokenizer is a
    :class:`LazyTokenizer` (loaded on first use)."""
    import open_clip
    if arch not in open_clip.list_models():
        raise UnknownArchitecture(f"model.arch={arch!r} is not an open_clip architecture; "
                       f"see open_clip.list_models() (e.g. ViT-B-16, ViT-L-14)")
    check_open_clip_arch(arch)   # before any weights, text tower or tokenizer
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
        if weights:             # a local file that is not the weights of this architecture: say why
            from .weights import diagnose
            raise diagnose(weights, e, f"open_clip {arch}") from None
        if source is None:
            raise
        raise WeightsUnavailable(
            f"could not load open_clip weights {arch}/{pretrained}: {type(e).__name__}: {e}\n"
            + offline_hint(f"open_clip {arch} '{pretrained}'",
                           "model.weights=/path/to/open_clip_model.bin (or .safetensors)",
                           cache_dir)) from e
    model.eval()
    return model, transform, LazyTokenizer(arch, cache_dir)


@register_backbone("open_clip", "any CLS-pooled open_clip ViT or timm-ViT tower: model.arch=… model.pretrained=… "
                                "(model.params.quick_gelu for OpenAI weights)")
def build_open_clip(cfg) -> OpenClipBackbone:
    if not cfg.arch:
        raise ValueError("model.arch is required for model.family=open_clip (e.g. model.arch=ViT-B-16)")
    model, transform, tokenizer = create_open_clip(cfg.arch, cfg.pretrained, cfg.weights, cfg.image_size,
                                                   cfg.cache_dir, bool(cfg.params.get("quick_gelu", False)))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return OpenClipBackbone(cfg.name, model, transform, tokenizer, int(size))
