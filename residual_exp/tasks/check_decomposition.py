"""``task=check_decomposition``: does Σ units reproduce the model's image feature, and is every
unit the one the formula defines?

Builds ``model=…``, runs a batch of random images at the backbone's input size and checks:

1. **sum**: ``‖Σ_u units − feature‖∞ / ‖feature‖∞`` (per sample, max over the batch) under the
   convention chosen with ``conventions.units=official|centred``;
2. **per unit**: every unit against an *independent recomputation* (no hooks, no lens): the
   forward is re-run block by block from the model's own weights, each head's value mix ``z``
   recomputed from q, k, v of the block's input with an explicit softmax (RoPE, relative
   position bias and gates applied as the family does), and the units rebuilt from the
   convention's formula (:mod:`residual_exp.decompose.readout`).  Prints the max per-unit error
   ``max_u ‖unit_u − ref_u‖∞ / ‖feature‖∞`` and the worst unit.  Available for timm
   (VisionTransformer, Eva, VisionTransformerRelPos), open_clip (its ViT and timm towers) and BLIP;
   other families print that it was skipped;
3. the decomposed forward does not change the feature and leaves no hook behind.

**Random weights are perturbed.**  With ``model.pretrained=null`` (and no ``model.weights``),
freshly initialised biases are 0, norm affines 1/0 and LayerScales a constant: a readout that
forgets a bias or the final norm's affine still passes at random init.  So every 1-D parameter
of the image tower (biases, norm affines, LayerScale) and the cls/pos/register tokens are first
perturbed, ``p ← p + ε``, ``ε ~ N(0, (0.1·max(1, |p|))²)`` elementwise, drawn from a CPU
generator seeded with ``task.seed`` — and the output says so.  Pretrained weights are never
perturbed.

Returns 0 when both errors are within ``task.tolerance`` and no hook remains, else 1 (with a
``FAIL`` line).  An unsupported architecture raises
:class:`~residual_exp.backbones.UnsupportedArchitecture` before anything is loaded.

Example::

    python -m residual_exp task=check_decomposition model=clip_b model.pretrained=null
    python -m residual_exp task=check_decomposition model=timm model.arch=vit_base_patch16_rope_224 \\
        model.pretrained=null conventions.units=centred
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import build_backbone
from ..decompose.hooks import count_hooks
from ..runtime import resolve_device

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PERTURB_SCALE = 0.1
# parameters that are not 1-D but are "additive constants" of the stream like biases
TOKEN_PARAM = re.compile(r"(^|\.)(cls_token|reg_token|dist_token|pos_embed|class_embedding|"
                         r"positional_embedding|position_embedding)$")


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


# --- perturbation ------------------------------------------------------------------------------
@torch.no_grad()
def perturb_1d(module: nn.Module, seed: int, scale: float = PERTURB_SCALE) -> int:
    """``p ← p + N(0, (scale·max(1, |p|))²)`` for every 1-D parameter and every cls/pos/register
    token of ``module`` (a CPU generator seeded with ``seed``: the same draw on any device);
    returns the number of tensors perturbed."""
    g = torch.Generator().manual_seed(int(seed))
    n = 0
    for name, p in module.named_parameters():
        if p.ndim == 1 or TOKEN_PARAM.search(name):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            sd = scale * p.detach().double().abs().cpu().clamp_min(1.0)
            p.add_((noise * sd).to(device=p.device, dtype=p.dtype))
            n += 1
    return n


# --- independent recomputation ---------------------------------------------------------------------
@dataclass
class Reference:
    """The CLS pieces and readout parameters, recomputed without hooks or the lens."""
    embed: torch.Tensor              # [B, W]
    z: list                          # per layer [B, H, Dh]
    mlps: list                       # per layer [B, W]
    x: torch.Tensor                  # [B, W] CLS row entering the final norm
    w_o: list                        # per layer [W, H, Dh]
    b_o: list                        # per layer [W] or None
    ls1: list                        # per layer [W] or None
    norm: nn.Module | None           # the final LayerNorm (None: none)
    proj: torch.Tensor | None        # [W, D]
    proj_bias: torch.Tensor | None   # [D]

    def feature(self) -> torch.Tensor:
        y = self.norm(self.x) if self.norm is not None else self.x
        y = y @ self.proj if self.proj is not None else y
        return y + self.proj_bias if self.proj_bias is not None else y


def _attend(q, k, v, scale: float, bias=None) -> torch.Tensor:
    """Explicit softmax attention ``[B, H, N, Dh]`` (never the fused kernel the model uses)."""
    logits = (q * scale) @ k.transpose(-2, -1)                            # [B, H, N, N]
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, N, _ = t.shape
    return t.reshape(B, N, n_heads, -1).transpose(1, 2)                  # [B, H, N, Dh]


def _layer_norm_or_none(norm: nn.Module) -> nn.Module | None:
    return norm if isinstance(norm, nn.LayerNorm) else None


def _linear(t, lin: nn.Linear):
    return F.linear(t, lin.weight, lin.bias)


def _ref_timm_trunk(m: nn.Module, images: torch.Tensor):
    """``(embed, z, mlps, x, w_o, b_o, ls1, final norm)`` of a timm ViT / Eva / RelPos ViT."""
    from timm.layers import apply_rot_embed_cat
    from timm.models.eva import Eva, EvaAttention
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    rope, shared = None, None
    if isinstance(m, Eva):
        h, rope = m._pos_embed(m.patch_embed(images))
        h = m.norm_pre(h)
    elif isinstance(m, VisionTransformerRelPos):
        h = m.patch_embed(images)
        h = torch.cat([m.cls_token.expand(h.shape[0], -1, -1), h], 1)
        shared = m.shared_rel_pos.get_bias() if m.shared_rel_pos is not None else None
    else:
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
    embed, zs, mlps, w_o, b_o, ls1 = h[:, 0], [], [], [], [], []
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        H = a.num_heads
        y = blk.norm1(h)                                                  # [B, N, W]
        B, N, _ = y.shape
        bias = None
        if getattr(a, "qkv", None) is not None:
            wb = a.qkv.bias
            if isinstance(a, EvaAttention) and a.q_bias is not None:      # EVA: q and v biases (k: zeros)
                k_bias = getattr(a, "k_bias", None)
                wb = torch.cat([a.q_bias, torch.zeros_like(a.q_bias) if k_bias is None else k_bias, a.v_bias])
                wb = wb if a.qkv.bias is None else wb + a.qkv.bias
            q, k, v = F.linear(y, a.qkv.weight, wb).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        else:
            kv_heads = getattr(a, "num_kv_heads", H)
            q, k, v = _heads(_linear(y, a.q_proj), H), _heads(_linear(y, a.k_proj), kv_heads), \
                _heads(_linear(y, a.v_proj), kv_heads)
        q, k = a.q_norm(q), a.k_norm(k)
        if rope is not None:
            r = rope[i] if getattr(m, "rope_mixed", False) else rope
            npt, half = a.num_prefix_tokens, getattr(a, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], r, half=half)], 2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], r, half=half)], 2).type_as(v)
        if k.shape[1] != H:                                               # grouped-query attention
            k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
        if isinstance(m, VisionTransformerRelPos):
            if a.rel_pos is not None:
                bias = a.rel_pos.get_bias()
            elif shared is not None:
                bias = shared
        z = _attend(q, k, v, a.scale, bias).transpose(1, 2).reshape(B, N, -1)   # [B, N, H·Dh]
        z = a.norm(z) if getattr(a, "norm", None) is not None else z     # inner norm (EVA02-CLIP)
        if getattr(a, "gate", None) is not None:
            z = z * torch.sigmoid(_linear(y, a.gate))
        zs.append(z[:, 0].reshape(B, H, -1))                              # [B, H, Dh]
        out = _linear(z, a.proj)
        if isinstance(m, Eva):
            g1, g2 = blk.gamma_1, blk.gamma_2
            h = h + (g1 * out if g1 is not None else out)
            mlp = blk.mlp(blk.norm2(h))
            mlp = g2 * mlp if g2 is not None else mlp
        else:
            g1 = getattr(blk.ls1, "gamma", None)
            h = h + (g1 * out if g1 is not None else out)
            g2 = getattr(blk.ls2, "gamma", None)
            mlp = blk.mlp(blk.norm2(h))
            mlp = g2 * mlp if g2 is not None else mlp
        mlps.append(mlp[:, 0])
        h = h + mlp
        W = out.shape[-1]
        w_o.append(a.proj.weight.reshape(W, H, -1))
        b_o.append(a.proj.bias)
        ls1.append(g1)
    fc = getattr(m, "fc_norm", None)
    final = fc if isinstance(fc, nn.LayerNorm) else m.norm               # norm before the pool, or fc_norm after
    return embed, zs, mlps, h[:, 0], w_o, b_o, ls1, _layer_norm_or_none(final)


def _ref_pre_norm(h: torch.Tensor, blocks, parts):
    """``(embed, z, mlps, x, w_o, b_o, ls1)`` of pre-norm blocks ``x + g1·proj(attn(ln1 x))``,
    ``x + mlp(x)``; ``parts(block) -> (ln1, qkv(y) -> q, k, v [B, H, N, Dh], scale, proj, g1, mlp)``."""
    embed, zs, mlps, w_o, b_o, ls1 = h[:, 0], [], [], [], [], []
    for blk in blocks:
        ln1, qkv, scale, proj, g1, mlp = parts(blk)
        y = ln1(h)
        B, N, W = y.shape
        q, k, v = qkv(y)
        z = _attend(q, k, v, scale)                                       # [B, H, N, Dh]
        zs.append(z[:, :, 0])
        out = proj(z.transpose(1, 2).reshape(B, N, W))
        h = h + (g1 * out if g1 is not None else out)
        m = mlp(h)
        mlps.append(m[:, 0])
        h = h + m
        w_o.append(proj.weight.reshape(W, z.shape[1], -1))
        b_o.append(proj.bias)
        ls1.append(g1)
    return embed, zs, mlps, h[:, 0], w_o, b_o, ls1


def _ref_open_clip_vit(v: nn.Module, images: torch.Tensor):
    def parts(blk):
        mha = blk.attn
        qkv = lambda y: [_heads(t, mha.num_heads) for t in F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)]
        return (blk.ln_1, qkv, mha.head_dim ** -0.5, mha.out_proj, getattr(blk.ls_1, "gamma", None),
                lambda h: blk.ls_2(blk.mlp(blk.ln_2(h))))
    pieces = _ref_pre_norm(v._embeds(images), v.transformer.resblocks, parts)   # (ln_pre applied)
    return (*pieces, _layer_norm_or_none(v.ln_post))


def _ref_blip(vm: nn.Module, images: torch.Tensor, interpolate: bool):
    def parts(layer):
        sa = layer.self_attn
        qkv = lambda y: sa.qkv(y).reshape(*y.shape[:2], 3, sa.num_heads, -1).permute(2, 0, 3, 1, 4)
        return layer.layer_norm1, qkv, sa.scale, sa.projection, None, lambda h: layer.mlp(layer.layer_norm2(h))
    h = vm.embeddings(images, **({"interpolate_pos_encoding": True} if interpolate else {}))
    return (*_ref_pre_norm(h, vm.encoder.layers, parts), _layer_norm_or_none(vm.post_layernorm))


@torch.no_grad()
def independent_reference(backbone, images: torch.Tensor) -> Reference | None:
    """The :class:`Reference` of ``backbone`` on ``images``, or None when its family has none."""
    from ..backbones.blip_backbone import BlipBackbone
    from ..backbones.open_clip_backbone import OpenClipBackbone
    from ..backbones.timm_backbone import TimmBackbone
    if isinstance(backbone, TimmBackbone):
        return Reference(*_ref_timm_trunk(backbone.model, images), None, None)
    if isinstance(backbone, OpenClipBackbone):
        from open_clip.timm_model import TimmModel

        from ..backbones.open_clip_backbone import compose_linears
        visual = backbone.model.visual
        if isinstance(visual, TimmModel):
            pieces = _ref_timm_trunk(visual.trunk, images)
            heads = [visual.trunk.head] + list(visual.head.children())
            return Reference(*pieces, *compose_linears([m for m in heads if isinstance(m, nn.Linear)]))
        return Reference(*_ref_open_clip_vit(visual, images), visual.proj, None)
    if isinstance(backbone, BlipBackbone):
        tower = backbone.vision
        vp = tower.vision_proj
        return Reference(*_ref_blip(tower.vision_model, images, tower.interpolate_pos_encoding), vp.weight.T, vp.bias)
    return None


def reference_units(ref: Reference, convention: str) -> torch.Tensor:
    """``[B, U, D]`` units in layout order, from the convention's formula (readout.py docstring)."""
    x = ref.x
    W = x.shape[-1]
    ones, zeros = torch.ones(W, dtype=x.dtype, device=x.device), torch.zeros(W, dtype=x.dtype, device=x.device)
    if ref.norm is not None:
        gamma = ref.norm.weight if ref.norm.weight is not None else ones
        beta = ref.norm.bias if ref.norm.bias is not None else zeros
        mu = x.mean(-1, keepdim=True)
        sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ref.norm.eps)
    else:
        gamma, beta, mu, sigma = ones, zeros, torch.zeros_like(x[:, :1]), torch.ones_like(x[:, :1])
    push = (lambda t: t @ ref.proj) if ref.proj is not None else (lambda t: t)
    b_p = ref.proj_bias
    L, H = len(ref.w_o), ref.w_o[0].shape[1]
    scale = lambda l: ref.ls1[l] if ref.ls1[l] is not None else ones
    bias = lambda l: ref.b_o[l] if ref.b_o[l] is not None else zeros

    if convention == "official":
        n_vec, n_head = 2 * L + 1, (2 * L + 1) * H

        def unit(c, n):
            y = gamma * c / sigma - (gamma * mu / sigma - beta) / n if ref.norm is not None else c + beta / n
            return push(y) + (b_p / n if b_p is not None else 0)

        units = [unit(ref.embed, n_vec)]
        for l in range(L):
            for h in range(H):
                c = scale(l) * (ref.z[l][:, h] @ ref.w_o[l][:, h].T + bias(l) / H)
                units.append(unit(c, n_head))
            units.append(unit(ref.mlps[l], n_vec))
        return torch.stack(units, 1)

    def unit(c):
        c = c - c.mean(-1, keepdim=True) if ref.norm is not None else c
        return push(gamma * c / sigma)

    units = [unit(ref.embed)]
    for l in range(L):
        for h in range(H):
            units.append(unit(scale(l) * (ref.z[l][:, h] @ ref.w_o[l][:, h].T)))
        units.append(unit(ref.mlps[l]))
    b = sum(scale(l) * bias(l) for l in range(L))
    units.append(unit(b.expand_as(x)))                                    # attn_bias
    out = push(beta) + (b_p if b_p is not None else 0)                    # out_bias (no 1/σ)
    units.append(out.expand(x.shape[0], -1))
    return torch.stack(units, 1)


# --- the task ----------------------------------------------------------------------------------------
def check_decomposition(cfg) -> int:
    """``cfg`` is the full Hydra config; ``cfg.model``, ``cfg.task`` and ``cfg.conventions`` are used."""
    task = cfg.task
    if task.dtype not in DTYPES:
        raise ValueError(f"task.dtype={task.dtype!r}; valid: {sorted(DTYPES)}")
    dtype, device = DTYPES[task.dtype], torch.device(resolve_device(cfg.get("device", "auto")))
    torch.manual_seed(int(task.seed))
    tol = float(task.tolerance)

    backbone = build_backbone(cfg.model)
    random_weights = cfg.model.get("pretrained") is None and not cfg.model.get("weights")
    n_perturbed = perturb_1d(backbone.vision, int(task.seed)) if random_weights else 0
    backbone = backbone.to(device=device, dtype=dtype).eval()
    convention = (cfg.get("conventions") or {}).get("units", "official")
    backbone.use_convention(convention)
    hooks_before = count_hooks(backbone)
    layout = backbone.layout
    counts = layout.counts()
    print(f"model: {backbone.name} ({backbone.family}), {backbone.image_size} px, output {backbone.output_dim}-d, "
          f"{task.dtype} on {device}")
    if random_weights:
        print(f"perturbed 1-D parameters: {n_perturbed} tensors, N(0, {PERTURB_SCALE:g}·max(1,|p|)) seeded "
              f"{int(task.seed)} (biases, norm affines, LayerScale, cls/pos/reg tokens of the image tower)")
    else:
        print("pretrained weights: not perturbed")
    print(f"units ({convention} convention): {len(layout)} = "
          + " + ".join(f"{n} {k}" for k, n in counts.items()))

    images = torch.randn(int(task.batch_size), 3, backbone.image_size, backbone.image_size,
                         generator=torch.Generator().manual_seed(int(task.seed)), dtype=dtype).to(device)
    with torch.no_grad():
        plain, t_plain = _timed(lambda: backbone.encode_image(images), device)
        (units, feature), t_dec = _timed(lambda: backbone.decompose(images), device)
    hooks_after = count_hooks(backbone)

    assert units.shape == (images.shape[0], len(layout), backbone.output_dim), units.shape
    norm = feature.abs().amax(-1).clamp_min(1e-30)                        # [B] per-sample ∞-norms
    diff = units.sum(1) - feature                                         # [B, D]
    abs_err = diff.abs().max().item()
    rel_err = (diff.abs().amax(-1) / norm).max().item()
    drift = (feature - plain).abs().max().item()                          # hooks must not change the output
    print(f"max |Σ units − feature|        = {abs_err:.3e}")
    print(f"max relative error (∞-norm)    = {rel_err:.3e}   (tolerance {tol:.1e})")

    unit_err, ref_err = None, None
    ref = independent_reference(backbone, images)
    if ref is None:
        print(f"per-unit check: no independent recomputation for {type(backbone).__name__}; skipped")
    else:
        with torch.no_grad():
            want = reference_units(ref, convention)                       # [B, U, D]
            ref_err = ((ref.feature() - feature).abs().amax(-1) / norm).max().item()
            per_unit = ((units - want).abs().amax(-1) / norm[:, None]).amax(0)   # [U]
        worst = int(per_unit.argmax())
        unit_err = per_unit[worst].item()
        print(f"max per-unit error (all {len(layout)} units vs an independent recomputation, ∞-norm / ‖feature‖∞) "
              f"= {unit_err:.3e}   (worst: {layout.names[worst]})")
        picks = [n for n in ("embed", "L0H0", f"L{layout.num_layers - 1}H{layout.num_heads - 1}",
                             f"L{layout.num_layers // 2}.mlp") if n in layout.names]
        print("  " + ", ".join(f"{n} {per_unit[layout.index(n)].item():.1e}" for n in picks)
              + f"; reference forward vs feature {ref_err:.1e}")
    print(f"decomposed vs plain feature    = {drift:.3e}")
    print(f"time: plain {t_plain * 1e3:.1f} ms, decomposed {t_dec * 1e3:.1f} ms "
          f"(×{t_dec / max(t_plain, 1e-12):.2f}, first calls: includes warm-up)")
    print(f"hooks: {hooks_before} before, {hooks_after} after")

    ok = True
    if not rel_err <= tol:                                                # also catches NaN
        print(f"FAIL: relative error {rel_err:.3e} exceeds tolerance {tol:.1e}")
        ok = False
    if ref_err is not None and not ref_err <= tol:
        print(f"FAIL: the independent recomputation does not reproduce the feature ({ref_err:.3e}): "
              "the per-unit check cannot be trusted")
        ok = False
    if unit_err is not None and not unit_err <= tol:
        print(f"FAIL: per-unit error {unit_err:.3e} exceeds tolerance {tol:.1e} (worst unit {layout.names[worst]})")
        ok = False
    if drift > tol * max(feature.abs().max().item(), 1e-30):
        print(f"FAIL: the decomposed forward changed the feature by {drift:.3e}")
        ok = False
    if hooks_after != hooks_before:
        print(f"FAIL: {hooks_after - hooks_before} hook(s) left behind after decompose()")
        ok = False
    if ok:
        print("OK")
    return 0 if ok else 1
