"""timm Vision Transformers: ``vit_l``, ``dinov2_l`` and the generic
``model=timm model.arch=… model.pretrained=<timm tag | HF ViT repo | null>``.

These timm model classes decompose exactly into residual units when their blocks add their
attention and MLP branches to the stream unchanged (pre-norm, or parallel branches), one
LayerNorm or RmsNorm is the final norm (``norm`` before the pool or ``fc_norm`` after it) or
there is none, and the readout is the CLS token (``global_pool='token'``), the token mean
(``'avg'``) or timm's attention pool (``'map'``, :mod:`residual_exp.decompose.pooling`):

* :class:`~timm.models.vision_transformer.VisionTransformer` (ViT, DINOv2, SigLIP, AIMv2,
  CLIP-style towers with ``pre_norm``, registers, LayerScale) with timm's ``Block`` /
  ``Attention``, ``ParallelScalingBlock`` (ViT-22B: one in-projection, heads and MLP in
  parallel, fused or separate out-projections) or ``ParallelThingsBlock`` (several attention
  branches: their heads are the layer's heads; their MLPs summed are the layer's MLP unit);
* :class:`~timm.models.beit.Beit` (BEiT, BEiTv2: relative position bias inside the logits,
  ``gamma_1`` / ``gamma_2``), :class:`~timm.models.naflexvit.NaFlexVit` (image input; ViT or Eva
  blocks), and :class:`~timm.models.cait.Cait`, whose CLS units are its class-attention layers
  (the patch tokens run through their own blocks and never add to the class token: the embed
  unit is the class token itself);
* :class:`~timm.models.eva.Eva` (EVA-01/02, RoPE ViTs) with ``EvaBlock`` and ``EvaAttention``
  or ``AttentionRope``: RoPE, fused or separate q/k/v, qk-norm, sigmoid-gated attention, GQA,
  SwiGLU / GluMlp / Mlp with or without the inner norm (``scale_mlp``), LayerScale
  (``gamma_1`` / ``gamma_2``, attention-only too) — all of it lives *inside* a branch;
* :class:`~timm.models.vision_transformer_relpos.VisionTransformerRelPos` with a class token
  (``vit_relpos_*_cls_*``): the relative position bias is added to the attention logits.

Units (:class:`TimmTower` installs the hooks):

* ``embed``   the stream entering block 0 (cls/pos embed, register tokens and ``norm_pre``
              already applied; CLS is index 0 in timm, registers follow it), read as the readout
              reads it (:meth:`~residual_exp.decompose.pooling.Pool.rows`: CLS row, token mean,
              or every token for a deferred pool)
* ``LlHh``    per-head outputs: a forward pre-hook on ``block.attn.proj`` sees the head
              concatenation ``[B, N, H·Dh]`` for free (every supported attention calls ``proj``
              as a module, after RoPE, relative bias, inner norm and gate); head h's unit is
              ``z_h @ W_O[:, h]ᵀ`` with ``W_O = proj.weight.view(D, H, Dh)``, times LayerScale
              (``ls1.gamma``, DINOv2; ``gamma_1``, Eva).  With an inner norm over the head
              concatenation (timm ``scale_attn_norm``, Eva ``scale_attn_inner`` as in the
              EVA02-CLIP towers), ``z_h`` is head h's slice of the *normalised* concatenation
              ``γ ⊙ (z − µ)/σ + β`` that ``proj`` reads: per token the norm is one affine map with
              a mean and σ shared by all heads (as the final norm's σ is shared by all units), so
              the heads' units still sum exactly to the branch; µ and σ depend on every head
* ``Ll.mlp``  the CLS row of ``block.ls2``'s output (MLP × LayerScale; Eva: ``mlp`` × ``gamma_2``)
* ``attn_bias``, ``out_bias``  Σ_l ``proj.bias`` (× LayerScale) and the final norm's β

The feature is timm's pre-logits feature after the final norm and the pool,
``model.forward_head(model.forward_features(x), pre_logits=True)`` (1024-d for ViT-L); the
final norm is linearised by :mod:`residual_exp.decompose.readout` with no projection (units
live in the model width).  No text tower: zero-shot
classifiers for these models are class-mean image prototypes, built elsewhere.

Weights (``model.pretrained`` / ``model.weights``):

* a timm tag, e.g. ``augreg_in21k_ft_in1k``: ``timm.create_model("<arch>.<tag>", pretrained=True)``
  (downloaded from the ``timm/`` hub repo, then cached);
* a Hugging Face *transformers* ViT repo id (contains ``/``), e.g.
  ``google/vit-large-patch16-224``: ``model.safetensors`` (or ``pytorch_model.bin``) and
  ``config.json`` are fetched with ``huggingface_hub`` and the ``ViTForImageClassification``
  state dict is converted to timm's key layout (:func:`convert_hf_vit_state_dict`); the
  LayerNorm eps is taken from ``config.json`` (1e-12 for Google's ViTs; timm's default is 1e-6);
* ``model.weights=/path/file.{pt,pth,bin,safetensors}``: a timm state dict, a transformers
  ViT state dict (auto-detected and converted, eps from ``model.params.layer_norm_eps``,
  default 1e-12) or any format timm's ``checkpoint_filter_fn`` understands (original DINOv2,
  OpenAI CLIP, …); loaded strictly (after position-embedding resampling when
  ``model.image_size`` differs from the checkpoint's grid);
* ``model.pretrained=null``: random weights (tests, decomposition checks).

``vit_l`` weights choice.  The paper's ViT-L/16 is Hugging Face ``google/vit-large-patch16-224``:
Google's *original* ImageNet-21k pre-training fine-tuned on ImageNet-1k at 224 px.  timm has
no copy of that run: ``vit_large_patch16_224.augreg_in21k_ft_in1k`` is a different training
run (AugReg, Steiner et al. 2021: stronger augmentation/regularisation, other accuracy) and
``vit_large_patch16_224.orig_in21k`` is the original 21k run *without* the 1k fine-tune.  So
``vit_l`` defaults to the paper's checkpoint, ``model.pretrained=google/vit-large-patch16-224``,
loaded into the identical timm architecture by key conversion (same pre-norm blocks, exact
GELU, qkv bias, LN eps 1e-12), with the checkpoint's own preprocessing (224×224 bilinear
squash resize, mean = std = 0.5).  ``model.pretrained=augreg_in21k_ft_in1k`` selects timm's
AugReg run instead.

Refused (:class:`UnsupportedArchitecture`, one line naming the part; the architecture is
checked on the meta device before any weights are read or downloaded): models without a stream
of global-attention blocks (ResNets, ConvNeXt, Swin, FastViT, …); max / avg+max / no pooling
(with the CLS hint where there is a class token); attention pools with several latents, a
position embedding or an ``fc_norm`` after them; CaiT read by average pooling; both a final
norm and an ``fc_norm``, or a final norm that is neither a LayerNorm nor an RmsNorm; blocks whose
forward is not one of the above (``ResPostBlock``, ``EvaBlockPostNorm`` as in EVA02-E,
``ResPostRelPosBlock``, subclasses overriding ``forward``); attention modules other than the
ones above; models overriding ``forward_features`` / ``forward_head`` / ``pool`` (DeiT's
distillation token).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..decompose.pooling import MapLens, Pool, map_weights_hook
from ..decompose.readout import Lens, lens_from, norm_kind
from ..decompose.references import timm_reference
from ..decompose.stack import cls_heads_pre_hook, cls_input_pre_hook, layer_scale
from .base import Backbone, UnknownArchitecture, UnsupportedArchitecture, register_backbone
from .weights import HF_WEIGHT_FILES, WeightsUnavailable, check_local_file, offline_hint

log = logging.getLogger(__name__)

HF_VIT_LAYER_NORM_EPS = 1e-12   # transformers ViTConfig default (Google's ViT checkpoints)


# --- architecture checks ----------------------------------------------------------------
_POOL_NAMES = {"max": "max pooling", "avgmax": "average+max pooling", "avgmaxc": "average+max pooling",
               "": "no pooling (every token is returned)"}
CLS_HINT = " (to read this model's CLS token instead: +model.params.create_kwargs.global_pool=token)"


@dataclass
class BlockUnits:
    """Where one block's units live: the out-projections whose input is a head concatenation
    (several for parallel attention branches), the modules whose outputs make the MLP unit, and
    the per-branch ``(W_O [W, H·Dh], bias, LayerScale)`` of the lens."""
    projs: list            # [(module, heads, head_dim, width of the head concatenation or None)]
    mlps: list             # [(module, "out" | "fused", LayerScale getter)]: output × scale, summed
    lens: list             # [(weight, bias, ls)] per attention branch


def _unmodified(obj: nn.Module, cls: type) -> bool:
    return isinstance(obj, cls) and type(obj).forward is cls.forward


def _ls_gamma(ls) -> torch.Tensor | None:
    return ls if isinstance(ls, torch.Tensor) or ls is None else layer_scale(ls)


def block_units(block: nn.Module, i: int, where: str = "blocks") -> BlockUnits:
    """The units of a pre-norm block whose branches are summed into the stream unchanged (refused,
    naming the part, otherwise)."""
    from timm.layers import Attention, AttentionRope, LayerScale
    from timm.models.beit import Attention as BeitAttention
    from timm.models.beit import Block as BeitBlock
    from timm.models.cait import ClassAttn, LayerScaleBlockClassAttn
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block, ParallelScalingBlock, ParallelThingsBlock, ResPostBlock
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock
    name = f"{where}[{i}]"
    if isinstance(block, (ResPostBlock, ResPostRelPosBlock, EvaBlockPostNorm)):
        raise UnsupportedArchitecture(
            f"{name} is {type(block).__name__} (res-post-norm, e.g. EVA02-E, vit_relpos_*_rpn): a norm over the "
            "summed heads after the output projection mixes the heads, so per-head units are undefined")

    def attn(a, classes, what: str):
        if not any(_unmodified(a, c) for c in classes):
            raise UnsupportedArchitecture(f"{what} is {type(a).__name__}, not {' / '.join(c.__name__ for c in classes)}: "
                                          "per-head outputs unavailable")
        return a

    if _unmodified(block, Block) or _unmodified(block, RelPosBlock):
        a = attn(block.attn, (Attention, AttentionRope, RelPosAttention), f"{name}.attn")
        for ls_name in ("ls1", "ls2"):
            if not isinstance(getattr(block, ls_name), (LayerScale, nn.Identity)):
                raise UnsupportedArchitecture(f"{name}.{ls_name} is {type(getattr(block, ls_name)).__name__}, "
                                              "not LayerScale or Identity")
        return BlockUnits([(a.proj, a.num_heads, a.head_dim, None)], [(block.ls2, "out", lambda: None)],
                          [(a.proj.weight, a.proj.bias, layer_scale(block.ls1))])
    if _unmodified(block, EvaBlock) or _unmodified(block, BeitBlock) or _unmodified(block, LayerScaleBlockClassAttn):
        classes = {EvaBlock: (EvaAttention, AttentionRope), BeitBlock: (BeitAttention,),
                   LayerScaleBlockClassAttn: (ClassAttn,)}[type(block)]
        a = attn(block.attn, classes, f"{name}.attn")
        H = a.num_heads
        return BlockUnits([(a.proj, H, a.proj.in_features // H, None)], [(block.mlp, "out", lambda: block.gamma_2)],
                          [(a.proj.weight, a.proj.bias, block.gamma_1)])
    if _unmodified(block, ParallelScalingBlock):
        if not isinstance(block.q_norm, (nn.Identity, nn.LayerNorm)) or not isinstance(block.ls, (LayerScale, nn.Identity)):
            raise UnsupportedArchitecture(f"{name} ({type(block).__name__}): unsupported qk-norm or LayerScale")
        W = block.in_norm.normalized_shape[0]
        gamma = layer_scale(block.ls)
        if block.out_proj is not None:                 # fused out-projection of [heads, MLP hidden]
            w = block.out_proj.weight
            return BlockUnits([(block.out_proj, block.num_heads, block.head_dim, W)],
                              [(block.out_proj, "fused", lambda: layer_scale(block.ls))],
                              [(w[:, :W], block.out_proj.bias, gamma)])
        return BlockUnits([(block.attn_out_proj, block.num_heads, block.head_dim, None)],
                          [(block.mlp_out_proj, "out", lambda: layer_scale(block.ls))],
                          [(block.attn_out_proj.weight, block.attn_out_proj.bias, gamma)])
    if _unmodified(block, ParallelThingsBlock):
        projs, lens = [], []
        for p, branch in enumerate(block.attns):
            a = attn(branch.attn, (Attention,), f"{name}.attns[{p}].attn")
            projs.append((a.proj, a.num_heads, a.head_dim, None))
            lens.append((a.proj.weight, a.proj.bias, layer_scale(branch.ls)))
        return BlockUnits(projs, [(ffn, "out", lambda: None) for ffn in block.ffns], lens)
    raise UnsupportedArchitecture(
        f"{name} is {type(block).__name__}: not a pre-norm block whose attention and MLP branches are added to the "
        "stream unchanged (or a subclass overriding forward); per-head units are undefined")


def _check_overrides(model: nn.Module, base: type, methods=("forward_features", "forward_head", "pool")) -> None:
    for meth in methods:
        if hasattr(base, meth) and getattr(type(model), meth) is not getattr(base, meth):
            raise UnsupportedArchitecture(
                f"{type(model).__name__} overrides {base.__name__}.{meth} (e.g. DeiT's distillation token "
                "averaged into the readout): the readout is not the CLS token alone")


def _families() -> dict:
    """timm model class → (readout family, the blocks whose units are read, hint of the embed hook)."""
    from timm.models.beit import Beit
    from timm.models.cait import Cait
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    return {Eva: "eva", VisionTransformerRelPos: "relpos", Beit: "beit", Cait: "cait", NaFlexVit: "naflex",
            VisionTransformer: "vit"}


def _final_norms(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.norm, getattr(model, "fc_norm", None) or nn.Identity()


def _check_norm(norm: nn.Module, where: str) -> None:
    if norm_kind(norm) is None:
        raise UnsupportedArchitecture(
            f"{where} {type(norm).__name__} is neither a LayerNorm nor an RmsNorm: no per-sample linearisation")


def check_pool(model: nn.Module, kind: str) -> tuple[Pool, nn.Module]:
    """``(the readout's Pool, the one final norm)`` of a timm model, or a refusal naming the part."""
    from timm.layers import AttentionPoolLatent
    gp = getattr(model, "global_pool", None)
    attn_pool = getattr(model, "attn_pool", None)
    norm, fc = _final_norms(model)
    has_cls = getattr(model, "cls_token", None) is not None
    npt = int(getattr(model, "num_prefix_tokens", 1 if has_cls else 0))
    start = 0 if getattr(model, "pool_include_prefix", False) else npt
    if attn_pool is not None or gp == "map":
        if not _unmodified(attn_pool, AttentionPoolLatent):
            raise UnsupportedArchitecture(f"global_pool={gp!r}: attention pool {type(attn_pool).__name__} is not timm's "
                                          "AttentionPoolLatent: not decomposed" + (CLS_HINT if has_cls else ""))
        why = ("latent_len > 1 (several pooled queries)" if attn_pool.latent_len != 1 else
               "a position embedding inside the pool (pos_embed='abs')" if attn_pool.pos_embed is not None else
               f"an fc_norm ({type(fc).__name__}) after the pool" if not isinstance(fc, nn.Identity) else None)
        if why:
            raise UnsupportedArchitecture(f"global_pool='map': attention pool with {why} is not decomposed"
                                          + (CLS_HINT if has_cls else ""))
        _check_norm(norm, "final norm")
        return Pool("map", per_token_norm=True), norm
    if not isinstance(norm, nn.Identity) and not isinstance(fc, nn.Identity):
        raise UnsupportedArchitecture(
            f"both a final norm ({type(norm).__name__}) and an fc_norm ({type(fc).__name__}) are set: "
            "two norms in a row are not supported by the single-norm lens")
    if kind == "cait" and gp != "token":
        raise UnsupportedArchitecture(
            f"global_pool={gp!r}: CaiT's patch tokens are not in its class-attention stream (the residual units "
            "are the class-attention layers'), only the CLS token (global_pool='token') decomposes")
    if gp == "token":
        if not has_cls:
            raise UnsupportedArchitecture("no class token (class_token=False): there is no CLS row to decompose")
        final = fc if not isinstance(fc, nn.Identity) else norm
        _check_norm(final, "fc_norm" if final is fc else "final norm")
        return Pool("token"), final
    if gp == "avg":
        if not isinstance(fc, nn.Identity):                 # norm after the pool
            _check_norm(fc, "fc_norm")
            return Pool("avg", start), fc
        _check_norm(norm, "final norm")
        return Pool("avg", start, per_token_norm=not isinstance(norm, nn.Identity)), norm
    kind_name = _POOL_NAMES.get(gp, f"{gp!r} pooling")
    raise UnsupportedArchitecture(
        f"global_pool={gp!r}: {kind_name} is not linear in the residual units; CLS-token, average and attention "
        "(map) pooling decompose" + (CLS_HINT if has_cls else ""))


def check_timm_model(model: nn.Module) -> str:
    """Refuse models whose readout is not linear in the residual units (see the module docstring);
    return the supported family: ``vit`` | ``eva`` | ``relpos`` | ``beit`` | ``cait`` | ``naflex``."""
    kind = None
    for cls, k in _families().items():
        if isinstance(model, cls):
            kind = k
            _check_overrides(model, cls)
            break
    if kind is None:
        has_blocks = isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential))
        raise UnsupportedArchitecture(
            f"{type(model).__name__} is not a timm ViT with a residual stream of global-attention blocks "
            + ("(its forward is not one of the ViT families' forwards the decomposition knows)" if has_blocks else
               "(ResNets, ConvNeXt, Swin, FastViT, … have no per-head residual units)"))
    check_pool(model, kind)
    blocks = model.blocks_token_only if kind == "cait" else model.blocks
    for i, block in enumerate(blocks):
        block_units(block, i, "blocks_token_only" if kind == "cait" else "blocks")
    return kind


check_timm_vit = check_timm_model   # the former name


class TimmTower:
    """Where the residual units of a checked timm ViT live (``VisionTransformer``, ``Eva``,
    ``VisionTransformerRelPos``, ``Beit``, ``Cait``'s class-attention layers, ``NaFlexVit``): the
    hooks that fill the store, the readout's pooling and the out-projections of the lens.  Shared
    by :class:`TimmBackbone` and open_clip's timm image towers."""

    def __init__(self, model: nn.Module) -> None:
        self.kind = check_timm_model(model)
        self.model = model
        self.pool, self._final = check_pool(model, self.kind)
        self.blocks = list(model.blocks_token_only if self.kind == "cait" else model.blocks)
        where = "blocks_token_only" if self.kind == "cait" else "blocks"
        self.units = [block_units(b, i, where) for i, b in enumerate(self.blocks)]
        first = self.units[0].projs
        self.num_layers = len(self.blocks)
        self.num_heads = sum(h for _, h, _, _ in first)
        self.head_dim = first[0][2]
        self.width = model.embed_dim

    def final_norm(self) -> nn.Module:
        return self._final

    def install(self, hs, store: dict) -> None:
        # CLS rows are cloned: a view would keep each layer's whole [B, N, ·] activation alive
        # until the units are built (views cost ×3 peak memory at B/16, batch 8, in open_clip;
        # with the copies the decomposed forward peaks at the plain forward's memory).  Deferred
        # pools (attention pooling, average pooling after a per-token norm) keep the token tensors.
        rows = self.pool.rows
        store["heads"], store["mlps"] = [], []

        if self.kind == "cait":                        # the class token entering the class-attention layers
            hs.forward_pre_hook(self.blocks[0], lambda m, args: store.__setitem__("embed", rows(args[1])))
        else:
            hs.forward_pre_hook(self.blocks[0], lambda m, args: store.__setitem__("embed", rows(args[0])))
        for units in self.units:
            for p, (proj, H, Dh, width) in enumerate(units.projs):
                hs.forward_pre_hook(proj, _heads_hook(store["heads"], H, Dh, width, rows, p == 0))
            for p, (module, how, scale) in enumerate(units.mlps):
                if how == "fused":
                    hs.forward_pre_hook(module, _fused_mlp_hook(store["mlps"], module, scale, rows))
                else:
                    hs.forward_hook(module, _mlp_hook(store["mlps"], scale, rows, p == 0))
        if self.pool.kind == "map":
            pool = self.model.attn_pool
            hs.forward_pre_hook(pool, map_weights_hook(pool, store), with_kwargs=True)
            if pool.mlp is not None:
                hs.forward_hook(pool.mlp, lambda m, i, o: store.__setitem__("pool_mlp", o[:, 0]))
        # the final norm sees [B, N, W] (norm) or the pooled [B, W] (fc_norm); Identity is called too
        hs.forward_pre_hook(self.final_norm(), cls_input_pre_hook(store, "final_in", rows))

    def out_projections(self) -> tuple[list, list, list]:
        """``(W_O [W, H·Dh], b_O, ls1)`` per layer, for :func:`~residual_exp.decompose.readout.lens_from`
        (parallel attention branches: concatenated along the heads, LayerScale folded in)."""
        w_o, b_o, ls = [], [], []
        for units in self.units:
            if len(units.lens) == 1:
                w, b, g = units.lens[0]
                w_o.append(w), b_o.append(b), ls.append(_ls_gamma(g))
                continue
            ws, bs = [], []
            for w, b, g in units.lens:
                g = _ls_gamma(g)
                ws.append(w * g[:, None] if g is not None else w)
                bs.append((b if b is not None else torch.zeros_like(w[:, 0])) * (g if g is not None else 1))
            w_o.append(torch.cat(ws, 1)), b_o.append(sum(bs)), ls.append(None)
        return w_o, b_o, ls

    def lens(self, num_heads: int, proj: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None) -> Lens:
        """The lens of the tower with the linear maps after the pool (``x @ proj + proj_bias``)."""
        lens = lens_from(*self.out_projections(), num_heads, self.final_norm(), proj, proj_bias)
        if self.pool.kind == "map":
            lens.pool = MapLens.of(self.model.attn_pool)
        return lens


def _heads_hook(sink: list, H: int, Dh: int, width: int | None, rows, first: bool):
    inner = cls_heads_pre_hook(sink, H, Dh, rows, width)
    if first:
        return inner

    def hook(module, args):                           # a further parallel branch: more heads of the layer
        prev = sink.pop()
        inner(module, args)
        sink.append(torch.cat([prev, sink.pop()], -2))
    return hook


def _mlp_hook(sink: list, scale, rows, first: bool):
    def hook(module, args, out):
        g = scale()
        t = rows(out) if g is None else rows(out) * g                  # [B, W] (or [B, N, W])  MLP × LayerScale
        if first:
            sink.append(t)
        else:                                                          # a further parallel MLP of the layer
            sink.append(sink.pop() + t)
    return hook


def _fused_mlp_hook(sink: list, proj: nn.Linear, scale, rows):
    """ParallelScalingBlock with a fused out-projection: the MLP's part of it, from its input."""
    def hook(module, args):
        W = proj.out_features
        t = rows(args[0])[..., W:]                                     # the MLP hidden (after the heads)
        out = nn.functional.linear(t, proj.weight[:, W:])
        g = scale()
        sink.append(out * g if g is not None else out)
    return hook


class TimmBackbone(Backbone):
    """A timm ViT; the feature is its pre-logits feature (CLS token, token mean or attention pool)."""

    family = "timm"

    def __init__(self, name: str, model: nn.Module, transform, image_size: int,
                 logit_scale: float = 100.0) -> None:
        tower = TimmTower(model)
        super().__init__(name, tower.width, tower.num_layers, tower.num_heads, transform, image_size,
                         has_text=False, logit_scale=logit_scale)
        self.model = model
        self._tower = tower

    @property
    def vision(self) -> nn.Module:
        return self.model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)  # [B, D]

    # --- decomposition ------------------------------------------------------------------
    def _install(self, hs, store: dict) -> None:
        self._tower.install(hs, store)

    def pooling(self) -> Pool:
        return self._tower.pool

    def final(self):
        return self._tower.final_norm(), None, None

    def lens(self) -> Lens:
        return self._tower.lens(self.num_heads)


# --- state dicts ----------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``.pt/.pth/.bin``), unwrapped
    from a ``{"state_dict": …}`` / ``{"model": …}`` checkpoint if needed."""
    from .weights import load_weights_file
    return load_weights_file(path)


def is_hf_vit_state_dict(sd: dict) -> bool:
    """A transformers ``ViTModel`` / ``ViTForImageClassification`` state dict?"""
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in sd)


# transformers ViT per-layer names → timm names, for both layouts: the hub files
# (``encoder.layer.N.attention.attention.query``, transformers < 5) and transformers ≥ 5's
# in-memory modules (``layers.N.attention.q_proj``).
_HF_LAYER = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_LAYER_RE = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def convert_hf_vit_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ViT keys → timm ``VisionTransformer`` keys (q, k, v fused into ``qkv``).

    Both the hub-file layout and transformers ≥ 5's module names are understood.  The pooler
    (unused by the classifier) and the mask token are dropped; any other unknown key raises,
    so nothing is silently lost.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        k = key[len("vit."):] if key.startswith("vit.") else key
        if k.startswith("pooler.") or k == "embeddings.mask_token":
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_LAYER_RE.match(k)
        if m is None or m.group(2) not in _HF_LAYER:
            raise KeyError(f"unexpected key {key!r} in a transformers ViT state dict")
        i, target, kind = int(m.group(1)), _HF_LAYER[m.group(2)], m.group(3)
        if target in ("q", "k", "v"):
            qkv.setdefault((i, kind), {})[target] = v
        else:
            out[f"blocks.{i}.{target}.{kind}"] = v
    for (i, kind), parts in qkv.items():
        assert set(parts) == {"q", "k", "v"}, (i, kind, sorted(parts))
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)  # [3D, D] / [3D]
    return out


# --- construction ---------------------------------------------------------------------
def _hf_hub_vit(repo: str, cache_dir: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, config.json)`` of a transformers ViT repo, from the hub cache or the hub."""
    from huggingface_hub import hf_hub_download
    hint = offline_hint(f"the transformers ViT {repo} (config.json and model.safetensors or pytorch_model.bin)",
                        "model.weights=/path/to/model.safetensors (the repo's file; "
                        "set model.params.layer_norm_eps if its config.json differs from 1e-12)", cache_dir)
    try:
        config = json.loads(Path(hf_hub_download(repo, "config.json", cache_dir=cache_dir)).read_text())
    except Exception as e:  # offline, missing repo, …
        raise WeightsUnavailable(f"could not fetch {repo}/config.json: {type(e).__name__}: {e}\n{hint}") from e
    errors = []
    for fname in HF_WEIGHT_FILES:
        try:
            return load_state_dict_file(hf_hub_download(repo, fname, cache_dir=cache_dir)), config
        except Exception as e:
            errors.append(f"{fname}: {type(e).__name__}: {e}")
    raise WeightsUnavailable(f"could not fetch the weights of {repo}: " + "; ".join(errors) + "\n" + hint)


def _checkpoint_filter(kind: str):
    """timm's own state-dict filter of the model family (pos-embed / rel-pos resampling, foreign formats)."""
    import importlib
    module = {"eva": "eva", "relpos": "vision_transformer_relpos", "beit": "beit", "cait": "cait",
              "naflex": "naflexvit"}.get(kind, "vision_transformer")
    return importlib.import_module(f"timm.models.{module}").checkpoint_filter_fn


def precheck_timm(arch: str, kwargs: dict | None = None) -> None:
    """The architecture check of ``timm.create_model(arch, **kwargs)`` on the meta device: no
    weights are allocated, read or downloaded (raises :class:`UnsupportedArchitecture`)."""
    import timm
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **(kwargs or {}))
    except UnsupportedArchitecture:
        raise
    except Exception as e:  # a model that cannot be built on meta: checked after creation instead
        log.debug("meta-device precheck of timm %s failed (%s); checking after creation", arch, e)
        return
    check_timm_model(model)


def create_timm(arch: str, pretrained: str | None = None, weights: str | None = None,
                image_size: int | None = None, cache_dir: str | None = None,
                params: dict | None = None) -> nn.Module:
    """A timm ViT in eval mode with the requested weights (see the module docstring).

    ``params.create_kwargs`` is passed to ``timm.create_model`` (e.g. ``{depth: 2}`` for
    tests); ``params.layer_norm_eps`` sets the LayerNorm eps for transformers ViT files.
    """
    import timm

    params = dict(params or {})
    if arch not in timm.list_models():
        raise UnknownArchitecture(f"model.arch={arch!r} is not a timm architecture; see timm.list_models('vit_*') "
                       "(e.g. vit_large_patch16_224, vit_large_patch14_dinov2)")
    # no classifier head: the feature is the pre-logits CLS token, and a head would count as
    # (untrained) finetune parameters
    kwargs = {"num_classes": 0, **dict(params.get("create_kwargs") or {})}
    if image_size:
        kwargs["img_size"] = int(image_size)
    if pretrained or weights:
        precheck_timm(arch, kwargs)   # refuse before any weights are read or downloaded
    state_dict, source = None, None
    if weights:
        source = str(check_local_file(weights, "model.weights"))
        state_dict = load_state_dict_file(source)
        if is_hf_vit_state_dict(state_dict):
            state_dict = convert_hf_vit_state_dict(state_dict)
            eps = float(params.get("layer_norm_eps", HF_VIT_LAYER_NORM_EPS))
            kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=eps)
    elif pretrained and "/" in pretrained:                    # a transformers ViT repo on the hub
        source = pretrained
        state_dict, hf_cfg = _hf_hub_vit(pretrained, cache_dir)
        state_dict = convert_hf_vit_state_dict(state_dict)
        eps = float(hf_cfg.get("layer_norm_eps", HF_VIT_LAYER_NORM_EPS))
        kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=eps)
        if not image_size and "image_size" in hf_cfg:
            kwargs["img_size"] = int(hf_cfg["image_size"])
    if pretrained and not weights and "/" not in pretrained:  # a timm tag
        name = f"{arch}.{pretrained}"
        if not timm.list_pretrained(name):
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
            raise KeyError(f"model.pretrained={pretrained!r} is not a timm tag of {arch}; valid: {tags} "
                           "(or a transformers ViT repo id such as google/vit-large-patch16-224)")
        try:
            model = timm.create_model(name, pretrained=True, cache_dir=cache_dir, **kwargs)
        except Exception as e:  # hub download failures surface as many exception types
            hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id or "?"
            raise WeightsUnavailable(
                f"could not load timm weights {name} (hub repo {hub_id}, model.safetensors): "
                f"{type(e).__name__}: {e}\n"
                + offline_hint(f"timm {name}", "model.weights=/path/to/model.safetensors", cache_dir)) from e
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    kind = check_timm_model(model)
    if state_dict is not None:
        if getattr(model, "num_classes", 0) == 0:                 # the checkpoint's classifier is not used
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        _load_checked(model, state_dict, kind, source, f"timm {arch}")
    return model.eval()


def input_grid(model: nn.Module) -> tuple[int, int]:
    """``(image size, patch size)`` of a timm ViT (NaFlexVit: its embedding's default size, else the
    pretrained config's input size)."""
    first = lambda v: int(v[0] if isinstance(v, (tuple, list)) else v)
    pe = getattr(model, "patch_embed", None) or model.embeds
    size = getattr(pe, "img_size", None) or getattr(pe, "default_img_size", None) or \
        (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
    return first(size), first(pe.patch_size)


def _load_checked(model: nn.Module, state_dict: dict, kind, source, what: str) -> None:
    """Load ``state_dict`` into ``model`` (after timm's checkpoint filter: pos-embed resampling,
    foreign formats); a file of another architecture raises :class:`~.weights.BadWeightsFile`
    naming it and what does not fit."""
    from .weights import BadWeightsFile, check_fits, load_error_reason
    key = "model.weights" if Path(str(source)).expanduser().exists() else "model.pretrained"
    try:
        state_dict = _checkpoint_filter(kind)(state_dict, model)
    except Exception as e:          # the filter indexes the checkpoint by this architecture's names
        raise BadWeightsFile(source, load_error_reason(what, e), key) from None
    check_fits(model, state_dict, source, what, key)
    model.load_state_dict(state_dict, strict=True)


def timm_transform(model: nn.Module, image_size: int, overrides: dict | None = None):
    """timm's eval preprocessing for ``model`` at ``image_size`` px.

    ``overrides`` (``model.params.data_config``) replace fields of the model's pretrained data
    config (``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``).
    """
    from timm.data import create_transform, resolve_data_config
    data_cfg = resolve_data_config(dict(overrides or {}), model=model)
    data_cfg["input_size"] = (3, image_size, image_size)   # the pretrained cfg may name another size
    return create_transform(**data_cfg, is_training=False)


@register_backbone("timm", "any timm ViT with a CLS, average or attention-pooled readout: model.arch=… "
                           "model.pretrained=<tag | HF ViT repo | null>",
                   reference=lambda bb, images: timm_reference(bb.model, images))
def build_timm(cfg) -> TimmBackbone:
    if not cfg.arch:
        raise ValueError("model.arch is required for model.family=timm (e.g. model.arch=vit_large_patch16_224)")
    params = dict(cfg.params or {})
    model = create_timm(cfg.arch, cfg.pretrained, cfg.weights, cfg.image_size, cfg.cache_dir, params)
    size, _ = input_grid(model)
    transform = timm_transform(model, size, params.get("data_config"))
    return TimmBackbone(cfg.name, model, transform, size, logit_scale=cfg.logit_scale)
