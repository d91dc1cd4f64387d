"""open_clip CLIP models: ``clip_b``, ``clip_l``, ``openclip_b``, ``openclip_l``, ``tiny_clip``
and the generic ``model=open_clip model.arch=… model.pretrained=…``.

Two kinds of image tower decompose exactly into residual units:

* open_clip's own :class:`~open_clip.transformer.VisionTransformer` with CLS-token pooling
  (``pool_type='tok'``) or average pooling (``'avg'``, CLIPA: ``ln_post`` after the pool or on
  every token), no attentional pooler.  Per-head outputs: its
  ``ResidualAttentionBlock`` uses ``nn.MultiheadAttention``, whose ``out_proj`` is never
  called as a module, so hooks on it never fire.  Inside :meth:`Backbone.decomposing` each
  block's ``attn`` gets an *instance-level* forward that computes the same attention with
  ``F.scaled_dot_product_attention`` and stores the CLS query's per-head value mix
  ``z [B, H, Dh]`` before the output projection (no extra cost).  The MLP contribution is
  read from ``ls_2``'s output, the embedding from ``ln_pre``'s.
* a timm tower (:class:`~open_clip.timm_model.TimmModel`: ``trunk`` + ``head``) whose trunk is
  a timm ViT that :mod:`.timm_backbone` supports, read at its CLS token, by average or by
  attention pooling (SigLIP / SigLIP2 and PE-Core: ``timm_pool='map'``; EVA01-g-14,
  MobileCLIP-B, ViTamin, ``vit_relpos_medium_patch16_cls_224``), with a *linear* projection: the
  trunk's own classifier (``timm_proj`` unset: ``trunk.head``, with bias) and/or
  ``TimmModel.head.proj`` (``timm_proj='linear'``), composed into one ``[W, D]`` map + bias.

The architecture is checked before anything is loaded: :func:`check_open_clip_arch` reads
``open_clip.get_model_config(arch)`` and refuses what cannot be decomposed, naming the part
(max pooling, CoCa's attentional pooler, ResNet towers, 2-D attention pools, MLP heads, custom
blocks), then builds the image tower alone on the meta device for the structural check.  The
tokenizer is loaded lazily, on the first :meth:`OpenClipBackbone.tokenize` (some, e.g. SigLIP's,
come from the hub), and a Hugging Face text tower (nllb / xlm-roberta / mt5 CLIPs) is built on
the first ``encode_text`` (:class:`VisionOnlyCLIP`), so a supported model builds, decomposes and
trains with ``classifier=prototype`` offline; text needed offline fails in one line.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decompose.pooling import TOKEN, Pool
from ..decompose.readout import Lens, compose_linears, lens_from
from ..decompose.references import open_clip_reference
from ..decompose.stack import cls_input_pre_hook, layer_scale
from .base import Backbone, UnknownArchitecture, UnsupportedArchitecture, register_backbone
from .timm_backbone import CLS_HINT, TimmTower
from .weights import WeightsUnavailable, check_local_file, offline_hint

log = logging.getLogger(__name__)

_CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_TIMM_POOLS = {"max": "max", "avgmax": "average+max"}
TIMM_CLS_HINT = " (to read the trunk's CLS token instead: model=timm model.arch={name} " \
                "+model.params.create_kwargs.global_pool=token, no text tower)"


def check_open_clip_config(arch: str, cfg: dict | None = None) -> None:
    """Refuse, from ``open_clip.get_model_config(arch)`` alone (nothing is built or loaded), the
    towers whose readout is not linear in the residual units — one line naming the part."""
    import open_clip
    cfg = open_clip.get_model_config(arch) if cfg is None else cfg
    if not cfg:
        return
    v = dict(cfg.get("vision_cfg") or {})
    if v.get("attentional_pool"):
        raise UnsupportedArchitecture(
            f"{arch}: CoCa attentional pooler (vision_cfg.attentional_pool=True): a cross-attention over "
            "ln_post(x) whose 256 query outputs are normalised again is not decomposed")
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
        if pool in ("abs_attn", "rot_attn"):
            raise UnsupportedArchitecture(
                f"{arch}: timm tower with {pool} attention pooling over a 2-D feature map (vision_cfg.timm_pool="
                f"{pool!r}, {name}): not a ViT readout, not decomposed")
        if pool in _TIMM_POOLS:
            raise UnsupportedArchitecture(
                f"{arch}: timm tower with {_TIMM_POOLS[pool]} pooling (vision_cfg.timm_pool={pool!r}, {name}): a "
                "maximum over tokens is not linear in the residual units" + TIMM_CLS_HINT.format(name=name))
        if proj == "mlp":
            raise UnsupportedArchitecture(
                f"{arch}: timm tower with an MLP head (vision_cfg.timm_proj='mlp', {name}): the projection is "
                "not linear, so the units cannot be pushed through it")
        return
    pool = v.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise UnsupportedArchitecture(
            f"{arch}: vision_cfg.pool_type={pool!r}: no pooled feature (every token is returned), nothing to decompose")
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


def check_open_clip_vision(visual: nn.Module, arch: str | None = None) -> None:
    """Refuse image towers whose readout is not linear in the residual units."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    where = f"{arch}: " if arch else ""
    if isinstance(visual, TimmModel):
        try:
            TimmTower(visual.trunk)
            _timm_head_linears(visual)
        except UnsupportedArchitecture as e:
            msg = str(e).replace(CLS_HINT, TIMM_CLS_HINT.format(name=_timm_name(visual.trunk)))
            raise UnsupportedArchitecture(where + (msg if msg.startswith("timm tower") else
                                                   f"timm tower {_timm_name(visual.trunk)}: {msg}")) from None
        return
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedArchitecture(
            f"{where}image tower {type(visual).__name__} is not an open_clip VisionTransformer or a timm ViT tower "
            "(ResNet towers have no residual-unit readout); use a ViT CLIP or model=timm")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedArchitecture(
            f"{where}CoCa attentional pooler (attention-pooled readout over ln_post(x), normalised again): not "
            "decomposed")
    if visual.pool_type not in ("tok", "avg"):
        raise UnsupportedArchitecture(
            f"{where}pool_type={visual.pool_type!r} (no pooled feature): only CLS-token ('tok') and average ('avg') "
            "pooling decompose")
    bad = [type(b).__name__ for b in visual.transformer.resblocks if not isinstance(b, ResidualAttentionBlock)]
    if bad:
        raise UnsupportedArchitecture(f"{where}custom attention blocks ({bad[0]}: qk-norm / scaled-cosine "
                                      "attention) are not supported by the per-head decomposition")


def open_clip_pool(visual: nn.Module) -> Pool:
    """The readout of an open_clip ``VisionTransformer``: its CLS token, or the mean of the patch
    tokens (CLIPA) normalised after the pool (``final_ln_after_pool``) or per token before it."""
    if visual.pool_type == "avg":
        return Pool("avg", 1, per_token_norm=not visual.final_ln_after_pool)
    return TOKEN


def text_unavailable(arch: str, what: str, e: Exception, cache_dir: str | None) -> WeightsUnavailable:
    """One line: the text side of ``arch`` needs hub files that are not here (offline)."""
    import os
    first = (str(e).strip().splitlines() or [""])[0]
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return WeightsUnavailable(
        f"could not load the {what} of open_clip {arch}: {type(e).__name__}: {first} — its files come from the "
        f"Hugging Face hub (cached under {cache}): run once with internet, or use classifier=prototype (no text needed)")


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
                raise text_unavailable(self.arch, "tokenizer", e, self.cache_dir) from e
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
            output_dim = linears[-1].out_features if linears else (
                visual.trunk.attn_pool.out_features if tower.pool.kind == "map" else tower.width)
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
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = float(bias.detach()) if bias is not None else 0.0     # SigLIP: the sigmoid loss's bias

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
    def pooling(self) -> Pool:
        return self._timm.pool if self._timm is not None else open_clip_pool(self.model.visual)

    def _install(self, hs, store: dict) -> None:
        if self._timm is not None:
            self._timm.install(hs, store)
            return
        visual = self.model.visual
        batch_first = getattr(visual.transformer, "batch_first", True)
        rows = self.pooling().rows
        # CLS rows are cloned: a view would keep each layer's whole [B, N, W] activation alive
        cls = rows if batch_first else (lambda t: rows(t.transpose(0, 1)))
        store["heads"], store["mlps"] = [], []
        hs.forward_hook(visual.ln_pre, lambda m, i, o: store.__setitem__("embed", cls(o)))
        for block in visual.transformer.resblocks:
            hs.instance_forward(block.attn, _make_mha_forward(block.attn, store["heads"], batch_first, rows))
            hs.forward_hook(block.ls_2, lambda m, i, o: store["mlps"].append(cls(o)))
        # ln_post sees [B, N, W] (batch first) or the pooled [B, W] (final_ln_after_pool)
        hs.forward_pre_hook(visual.ln_post, cls_input_pre_hook(store, "final_in", cls))

    def final(self):
        if self._timm is not None:
            return (self._timm.final_norm(), *compose_linears(_timm_head_linears(self.model.visual)))
        return self.model.visual.ln_post, self.model.visual.proj, None

    def lens(self) -> Lens:
        if self._timm is not None:
            _, proj, bias = self.final()
            return self._timm.lens(self.num_heads, proj, bias)
        blocks = self.model.visual.transformer.resblocks
        return lens_from([b.attn.out_proj.weight for b in blocks], [b.attn.out_proj.bias for b in blocks],
                         [layer_scale(b.ls_1) for b in blocks], self.num_heads, *self.final())


def _make_mha_forward(mha: nn.MultiheadAttention, sink: list, batch_first: bool, rows=None):
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
        # [B, H, Dh] the CLS query's (or [B, N, H, Dh] every token's, or their mean)
        sink.append(z[:, :, 0].clone() if rows is None else rows(z.transpose(1, 2)))
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
    if "hf_model_name" in (open_clip.get_model_config(arch).get("text_cfg") or {}):
        # a Hugging Face text tower needs the hub even with random weights: build it on first use only
        model, transform = _vision_only(arch, source, bool(weights), quick_gelu, image_size, cache_dir,
                                        lambda: open_clip.create_model_and_transforms(arch, pretrained=source,
                                                                                      **kwargs)[0])
        return model.eval(), transform, LazyTokenizer(arch, cache_dir)
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


class VisionOnlyCLIP(nn.Module):
    """An open_clip CLIP whose text tower is built on first use (``encode_text``): open_clip's
    Hugging Face text towers (nllb-clip, xlm-roberta, mt5) need hub files even with random weights,
    and the image side never needs them.  The built text model is kept outside the module tree."""

    def __init__(self, visual: nn.Module, logit_scale: float, logit_bias: float | None, build_full, name: str,
                 cache_dir: str | None) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.ones([]) * float(logit_scale))
        self.logit_bias = nn.Parameter(torch.ones([]) * float(logit_bias)) if logit_bias is not None else None
        self._build_full, self._full, self.name, self.cache_dir = build_full, None, name, cache_dir

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.visual(image)
        return F.normalize(f, dim=-1) if normalize else f

    def text_model(self) -> nn.Module:
        if self._full is None:
            try:
                full = self._build_full()
            except Exception as e:  # offline hub access fails with many exception types
                raise text_unavailable(self.name, "text tower", e, self.cache_dir) from e
            p = next(self.visual.parameters())
            self._full = (full.to(device=p.device, dtype=p.dtype).eval(),)
        return self._full[0]

    def encode_text(self, text, normalize: bool = False) -> torch.Tensor:
        return self.text_model().encode_text(text, normalize=normalize)


def _vision_only(arch: str, source: str | None, is_file: bool, quick_gelu: bool, image_size: int | None,
                 cache_dir: str | None, build_full):
    """``(VisionOnlyCLIP, transform)``: open_clip's image tower of ``arch`` alone, with the image
    weights of ``source`` (a tag or a file: its ``visual.*``, ``logit_scale`` and ``logit_bias``)."""
    import copy
    from dataclasses import asdict

    import numpy as np
    import open_clip
    from open_clip.factory import load_state_dict
    from open_clip.model import _build_vision_tower, resize_pos_embed
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    vcfg = cfg["vision_cfg"]
    if image_size:
        vcfg["image_size"] = image_size
    if "timm_model_name" in vcfg:
        vcfg["timm_model_pretrained"] = False
    visual = _build_vision_tower(cfg["embed_dim"], vcfg, quick_gelu=quick_gelu or bool(cfg.get("quick_gelu")))
    model = VisionOnlyCLIP(visual, cfg.get("init_logit_scale", np.log(1 / 0.07)), cfg.get("init_logit_bias"),
                           build_full, arch, cache_dir)
    preprocess = asdict(PreprocessCfg())
    if source:
        path = source
        if not is_file:
            tag_cfg = open_clip.get_pretrained_cfg(arch, source)
            preprocess = merge_preprocess_dict(preprocess, tag_cfg)
            try:
                path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
            except Exception as e:  # hub download failures surface as many exception types
                raise WeightsUnavailable(
                    f"could not load open_clip weights {arch}/{source}: {type(e).__name__}: {e}\n"
                    + offline_hint(f"open_clip {arch} '{source}'",
                                   "model.weights=/path/to/open_clip_model.bin (or .safetensors)", cache_dir)) from e
        sd = {k: v for k, v in load_state_dict(path).items()
              if k.startswith("visual.") or k in ("logit_scale", "logit_bias")}
        resize_pos_embed(sd, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "logit_bias"]
        if missing or unexpected:
            raise KeyError(f"weights {source} do not match the image tower of open_clip {arch}: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
    preprocess["size"] = visual.image_size
    return model, image_transform_v2(PreprocessCfg(**preprocess), is_train=False)


@register_backbone("open_clip", "any open_clip ViT or timm-ViT tower with a CLS, average or attention-pooled "
                                "readout: model.arch=… model.pretrained=… (model.params.quick_gelu for OpenAI weights)",
                   reference=lambda bb, images: open_clip_reference(bb.model.visual, images))
def build_open_clip(cfg) -> OpenClipBackbone:
    if not cfg.arch:
        raise ValueError("model.arch is required for model.family=open_clip (e.g. model.arch=ViT-B-16)")
    model, transform, tokenizer = create_open_clip(cfg.arch, cfg.pretrained, cfg.weights, cfg.image_size,
                                                   cfg.cache_dir, bool(cfg.params.get("quick_gelu", False)))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return OpenClipBackbone(cfg.name, model, transform, tokenizer, int(size))
