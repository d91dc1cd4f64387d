"""timm Vision Transformers: ``vit_l``, ``dinov2_l`` and the generic
``model=timm model.arch=… model.pretrained=<timm tag | HF ViT repo | null>``.

Three timm model classes decompose exactly into residual units at the CLS token when they
are CLS-pooled (``global_pool='token'``, a class token, no attention pool), use pre-norm
blocks and end in one LayerNorm (``norm`` before the pool or ``fc_norm`` after it) or none:

* :class:`~timm.models.vision_transformer.VisionTransformer` (ViT, DINOv2, CLIP-style towers
  with ``pre_norm``, registers, LayerScale) with timm's ``Block`` / ``Attention``;
* :class:`~timm.models.eva.Eva` (EVA-01/02, RoPE ViTs) with ``EvaBlock`` and ``EvaAttention``
  or ``AttentionRope``: RoPE, fused or separate q/k/v, qk-norm, sigmoid-gated attention, GQA,
  SwiGLU / GluMlp / Mlp with or without the inner norm (``scale_mlp``), LayerScale
  (``gamma_1`` / ``gamma_2``, attention-only too) — all of it lives *inside* a branch;
* :class:`~timm.models.vision_transformer_relpos.VisionTransformerRelPos` with a class token
  (``vit_relpos_*_cls_*``): the relative position bias is added to the attention logits.

Units (:class:`TimmTower` installs the hooks):

* ``embed``   the CLS row of the stream entering block 0 (cls/pos embed, register tokens
              and ``norm_pre`` already applied; CLS is index 0 in timm, registers follow it)
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

The feature is timm's pre-logits CLS feature after the final norm,
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
checked on the meta device before any weights are read or downloaded): other model classes
(ResNets, ConvNeXt, Swin, FastViT, …); ``global_pool`` other than ``'token'`` (average/max
pooling, ``map`` attention pooling as in SigLIP / PE, no pooling); no class token; both a
final norm and an ``fc_norm``, or a final norm that is not a LayerNorm (RmsNorm); blocks that
are not the pre-norm ones (``ResPostBlock``, ``EvaBlockPostNorm`` as in EVA02-E,
``ResPostRelPosBlock``, parallel blocks, subclasses overriding ``forward``); attention modules
other than the ones above; models overriding ``forward_features`` / ``forward_head`` / ``pool`` (DeiT's distillation token).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..decompose.readout import Lens, lens_from
from ..decompose.stack import cls_heads_pre_hook, cls_input_pre_hook, layer_scale
from .base import Backbone, UnknownArchitecture, UnsupportedArchitecture, register_backbone
from .weights import HF_WEIGHT_FILES, WeightsUnavailable, check_local_file, offline_hint

log = logging.getLogger(__name__)

HF_VIT_LAYER_NORM_EPS = 1e-12   # transformers ViTConfig default (Google's ViT checkpoints)


# --- architecture checks ----------------------------------------------------------------
_POOL_NAMES = {"avg": "average pooling", "max": "max pooling", "avgmax": "average+max pooling",
               "avgmaxc": "average+max pooling", "": "no pooling (every token is returned)"}


def _check_pool(model: nn.Module) -> None:
    """A CLS-token readout: ``global_pool='token'``, no attention pool, a class token."""
    gp = getattr(model, "global_pool", None)
    if getattr(model, "attn_pool", None) is not None or gp == "map":
        raise UnsupportedArchitecture(
            f"global_pool={gp!r}: map (attention) pooling (SigLIP, PE): the readout is not linear in the "
            "residual units; only CLS-token pooling ('token') decomposes")
    if gp != "token":
        kind = _POOL_NAMES.get(gp, f"{gp!r} pooling")
        raise UnsupportedArchitecture(
            f"global_pool={gp!r}: {kind} mixes the patch tokens into the readout; only CLS-token pooling "
            "('token') is linear in the CLS residual units"
            + ("" if getattr(model, "cls_token", None) is None else
               " (to read this model's CLS token instead: +model.params.create_kwargs.global_pool=token)"))
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedArchitecture("no class token (class_token=False): there is no CLS row to decompose")


def _final_norm(model: nn.Module) -> nn.Module:
    """The one final norm of a CLS-pooled timm model: ``norm`` (before the pool) or ``fc_norm``
    (after it, on the pooled CLS row) — ``nn.Identity`` when there is none."""
    norm, fc = model.norm, getattr(model, "fc_norm", None) or nn.Identity()
    if not isinstance(norm, nn.Identity) and not isinstance(fc, nn.Identity):
        raise UnsupportedArchitecture(
            f"both a final norm ({type(norm).__name__}) and an fc_norm ({type(fc).__name__}) are set: "
            "two norms in a row are not supported by the single-LayerNorm lens")
    final = fc if not isinstance(fc, nn.Identity) else norm
    if not isinstance(final, (nn.LayerNorm, nn.Identity)):
        where = "fc_norm" if final is fc else "final norm"
        raise UnsupportedArchitecture(
            f"{where} {type(final).__name__} is not a LayerNorm: the LayerNorm lens does not apply")
    return final


def _check_overrides(model: nn.Module, base: type, methods=("forward_features", "forward_head", "pool")) -> None:
    for meth in methods:
        if hasattr(base, meth) and getattr(type(model), meth) is not getattr(base, meth):
            raise UnsupportedArchitecture(
                f"{type(model).__name__} overrides {base.__name__}.{meth} (e.g. DeiT's distillation token "
                "averaged into the readout): the readout is not the CLS token alone")


def _check_vit(model: nn.Module) -> None:
    from timm.layers import Attention, LayerScale
    from timm.models.vision_transformer import Block, VisionTransformer
    _check_overrides(model, VisionTransformer)
    _check_pool(model)
    _final_norm(model)
    for i, block in enumerate(model.blocks):
        if not isinstance(block, Block) or type(block).forward is not Block.forward:
            raise UnsupportedArchitecture(
                f"blocks[{i}] is {type(block).__name__}, not timm's pre-norm Block (x + ls(attn(norm(x)))): "
                "ResPostBlock (norm on the branch output), parallel blocks and custom blocks are not supported")
        attn = block.attn
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
            raise UnsupportedArchitecture(
                f"blocks[{i}].attn is {type(attn).__name__}, not timm's Attention: per-head outputs unavailable")
        for ls_name in ("ls1", "ls2"):
            ls = getattr(block, ls_name)
            if not isinstance(ls, (LayerScale, nn.Identity)):
                raise UnsupportedArchitecture(f"blocks[{i}].{ls_name} is {type(ls).__name__}, "
                                              "not LayerScale or Identity")


def _check_blocks(model: nn.Module, root: type, block_cls: type, attn_classes: tuple, post_norm: type,
                  post_norm_why: str) -> None:
    """The shared checks of a CLS-pooled timm model made of pre-norm ``block_cls`` blocks whose
    attention is one of ``attn_classes`` (unmodified ``forward``); ``post_norm`` blocks are refused
    with ``post_norm_why``."""
    _check_overrides(model, root)
    _check_pool(model)
    _final_norm(model)
    for i, block in enumerate(model.blocks):
        if isinstance(block, post_norm):
            raise UnsupportedArchitecture(f"blocks[{i}] is {post_norm.__name__} ({post_norm_why}")
        if not isinstance(block, block_cls) or type(block).forward is not block_cls.forward:
            raise UnsupportedArchitecture(
                f"blocks[{i}] is {type(block).__name__}, not timm's pre-norm {block_cls.__name__}: not supported")
        attn = block.attn
        if not isinstance(attn, attn_classes) or type(attn).forward not in [c.forward for c in attn_classes]:
            raise UnsupportedArchitecture(
                f"blocks[{i}].attn is {type(attn).__name__}, not {' / '.join(c.__name__ for c in attn_classes)}: "
                "per-head outputs unavailable")


def _check_eva(model: nn.Module) -> None:
    from timm.layers import AttentionRope
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    _check_blocks(model, Eva, EvaBlock, (EvaAttention, AttentionRope), EvaBlockPostNorm,
                  "use_post_norm=True, e.g. EVA02-E): a norm over the summed heads after the output projection "
                  "mixes the heads, so per-head units are undefined")


def _check_relpos(model: nn.Module) -> None:
    from timm.models.vision_transformer_relpos import (RelPosAttention, RelPosBlock, ResPostRelPosBlock,
                                                       VisionTransformerRelPos)
    _check_blocks(model, VisionTransformerRelPos, RelPosBlock, (RelPosAttention,), ResPostRelPosBlock,
                  "res-post-norm, vit_relpos_*_rpn): the norm on the attention branch's output mixes the heads, "
                  "so per-head units are undefined")


def check_timm_model(model: nn.Module) -> str:
    """Refuse models whose readout is not linear in the CLS residual units (see the module
    docstring); return the supported kind: ``vit`` | ``eva`` | ``relpos``."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    if isinstance(model, Eva):
        _check_eva(model)
        return "eva"
    if isinstance(model, VisionTransformerRelPos):
        _check_relpos(model)
        return "relpos"
    if isinstance(model, VisionTransformer):
        _check_vit(model)
        return "vit"
    raise UnsupportedArchitecture(
        f"{type(model).__name__} is not a timm VisionTransformer, Eva or VisionTransformerRelPos: only "
        "CLS-pooled ViTs decompose into residual units (ResNets, ConvNeXt, Swin, FastViT, … are not supported)")


check_timm_vit = check_timm_model   # the former name


class TimmTower:
    """Where the residual units of a checked timm ViT live (``VisionTransformer``, ``Eva``,
    ``VisionTransformerRelPos``): the hooks that fill the store and the out-projections of the lens.
    Shared by :class:`TimmBackbone` and open_clip's timm image towers."""

    def __init__(self, model: nn.Module) -> None:
        self.kind = check_timm_model(model)
        self.model = model
        attn = model.blocks[0].attn
        self.num_layers, self.num_heads, self.head_dim = len(model.blocks), attn.num_heads, attn.head_dim
        self.width = model.embed_dim

    def final_norm(self) -> nn.Module:
        return _final_norm(self.model)

    def layer_scales(self) -> tuple[list, list]:
        """Per block ``(ls1 gamma, ls2 gamma)`` (None: no LayerScale)."""
        if self.kind == "eva":
            return [b.gamma_1 for b in self.model.blocks], [b.gamma_2 for b in self.model.blocks]
        return [layer_scale(b.ls1) for b in self.model.blocks], [layer_scale(b.ls2) for b in self.model.blocks]

    def install(self, hs, store: dict) -> None:
        # CLS rows are cloned: a view would keep each layer's whole [B, N, ·] activation alive
        # until the units are built (views cost ×3 peak memory at B/16, batch 8, in open_clip;
        # with the copies the decomposed forward peaks at the plain forward's memory).
        blocks = self.model.blocks
        store["heads"], store["mlps"] = [], []

        def embed_hook(module, args):
            store["embed"] = args[0][:, 0].clone()                        # [B, W] CLS entering block 0

        hs.forward_pre_hook(blocks[0], embed_hook)
        for block in blocks:
            attn = block.attn
            hs.forward_pre_hook(attn.proj, cls_heads_pre_hook(store["heads"], attn.num_heads, attn.head_dim))
            if self.kind == "eva":     # EvaBlock: x + gamma_2 * mlp(norm2(x)); gamma_2 is a bare parameter
                hs.forward_hook(block.mlp, _scaled_cls_hook(store["mlps"], block))
            else:
                hs.forward_hook(block.ls2, lambda m, i, o: store["mlps"].append(o[:, 0].clone()))  # [B, W]
        # the final norm sees [B, N, W] (norm) or the pooled [B, W] (fc_norm); Identity is called too
        hs.forward_pre_hook(self.final_norm(), cls_input_pre_hook(store, "final_in"))

    def out_projections(self) -> tuple[list, list, list]:
        """``(W_O [W, H·Dh], b_O, ls1)`` per layer, for :func:`~residual_exp.decompose.readout.lens_from`."""
        blocks = self.model.blocks
        return [b.attn.proj.weight for b in blocks], [b.attn.proj.bias for b in blocks], self.layer_scales()[0]


def _scaled_cls_hook(sink: list, block: nn.Module):
    def hook(module, args, out):
        g = block.gamma_2
        sink.append(out[:, 0] * g if g is not None else out[:, 0].clone())   # [B, W]  MLP × LayerScale
    return hook


class TimmBackbone(Backbone):
    """A CLS-pooled timm ViT; the feature is the pre-logits CLS token after the final norm."""

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

    def final(self):
        return self._tower.final_norm(), None, None

    def lens(self) -> Lens:
        return lens_from(*self._tower.out_projections(), self.num_heads, *self.final())


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
    if kind == "eva":
        from timm.models.eva import checkpoint_filter_fn
    elif kind == "relpos":
        from timm.models.vision_transformer_relpos import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn


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


@register_backbone("timm", "any CLS-pooled timm ViT: model.arch=… model.pretrained=<tag | HF ViT repo | null>")
def build_timm(cfg) -> TimmBackbone:
    if not cfg.arch:
        raise ValueError("model.arch is required for model.family=timm (e.g. model.arch=vit_large_patch16_224)")
    params = dict(cfg.params or {})
    model = create_timm(cfg.arch, cfg.pretrained, cfg.weights, cfg.image_size, cfg.cache_dir, params)
    size = model.patch_embed.img_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    transform = timm_transform(model, size, params.get("data_config"))
    return TimmBackbone(cfg.name, model, transform, size, logit_scale=cfg.logit_scale)
