"""Independent references for ``task=check_decomposition``: every unit recomputed without hooks,
lens or readout, from the model's own weights.

:func:`timm_reference`, :func:`open_clip_reference` and :func:`blip_reference` re-run the image
tower block by block: each head's value mix ``z`` from q, k, v of the block's input with an
explicit softmax (RoPE, relative position biases, gates and inner norms applied as the family
does), the MLP branches, and the token stream entering the final norm — for *every* token.  A
backbone family names its reference in the registry (:func:`~residual_exp.backbones.base.register_backbone`).

:func:`reference_units` then builds each unit from its per-token contributions by the
convention's formula written per token — a token-pooled readout as ``Σ_t a_t`` of the per-token
normalised unit (the per-token σ_t, not the effective statistics :mod:`.pooling` uses), an
attention pool through its value rows, out-projection and explicit attention weights — so it
shares no code with :mod:`.readout` / :mod:`.pooling`.

:func:`perturb_1d` moves the parameters random init leaves at 0 / 1 (biases, norm affines,
LayerScale, tokens), so that a readout forgetting one of them cannot pass.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..catalog import Pooling
from .readout import compose_linears

PERTURB_SCALE = 0.1
# parameters that are not 1-D but are "additive constants" of the stream like biases
TOKEN_PARAM = re.compile(r"(^|\.)(cls_token|reg_token|dist_token|pos_embed|class_embedding|"
                         r"positional_embedding|position_embedding)$")


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


@dataclass
class Reference:
    """Every token's pieces and the readout's parameters, recomputed without hooks or the lens."""
    embed: torch.Tensor              # [B, N, W] the stream entering the first unit layer
    z: list                          # per layer [B, N, H, Dh]
    mlps: list                       # per layer [B, N, W]
    x: torch.Tensor                  # [B, N, W] the stream entering the final norm
    w_o: list                        # per layer [W, H, Dh]
    b_o: list                        # per layer [W] or None
    ls1: list                        # per layer [W] or None
    norm: nn.Module | None           # the final norm (LayerNorm / RmsNorm; None: none)
    proj: torch.Tensor | None = None         # [D0, D] after the pool
    proj_bias: torch.Tensor | None = None    # [D]
    pool: Pooling = Pooling.token    # how the feature is read out of the stream
    start: int = 0                   # first pooled token (avg)
    norm_after_pool: bool = False    # avg: the norm acts on the pooled vector (fc_norm)
    attn_pool: nn.Module | None = None        # map: timm's AttentionPoolLatent

    # --- the readout, written out ------------------------------------------------------------
    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(γ, β, µ, σ)`` of the final norm on ``x`` ``[…, W]`` (µ, σ with a trailing 1)."""
        W = x.shape[-1]
        ones, zeros = torch.ones(W, dtype=x.dtype, device=x.device), torch.zeros(W, dtype=x.dtype, device=x.device)
        n = self.norm
        if n is None:
            return ones, zeros, torch.zeros_like(x[..., :1]), torch.ones_like(x[..., :1])
        gamma = n.weight if getattr(n, "weight", None) is not None else ones
        beta = n.bias if getattr(n, "bias", None) is not None else zeros
        eps = n.eps if n.eps is not None else torch.finfo(x.dtype).eps
        if isinstance(n, nn.LayerNorm):
            mu = x.mean(-1, keepdim=True)
            return gamma, beta, mu, torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
        return gamma, beta, torch.zeros_like(x[..., :1]), torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)

    @property
    def centres(self) -> bool:
        return isinstance(self.norm, nn.LayerNorm)

    def pool_weights(self) -> torch.Tensor:
        """``[B, J, N]`` how the readout weights the tokens (J = 1 but for an attention pool)."""
        B, N, _ = self.x.shape
        a = torch.zeros(B, 1, N, dtype=self.x.dtype, device=self.x.device)
        if self.pool == "token":
            a[:, :, 0] = 1
        elif self.pool == "avg":
            a[:, :, self.start:] = 1 / (N - self.start)
        else:
            m = self.attn_pool
            y = self._normed(self.x)[:, self.start:]                           # [B, n, W]
            J, d = m.num_heads, m.head_dim
            k = F.linear(y, m.kv.weight, m.kv.bias)[..., :J * d].reshape(B, -1, J, d).transpose(1, 2)
            q = F.linear(m.latent, m.q.weight, m.q.bias) if isinstance(m.q, nn.Linear) else m.latent
            q = q.reshape(1, 1, J, d).transpose(1, 2)
            q, k = m.q_norm(q), m.k_norm(k)
            logits = (q * d ** -0.5) @ k.transpose(-2, -1)                    # [B, J, 1, n]
            a = torch.zeros(B, J, N, dtype=self.x.dtype, device=self.x.device)
            a[:, :, self.start:] = torch.exp(logits - logits.amax(-1, keepdim=True))[:, :, 0]
            a = a / a.sum(-1, keepdim=True)
        return a

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta, mu, sigma = self.stats(x)
        return gamma * (x - mu) / sigma + beta

    def _pool_out(self, pooled: torch.Tensor, share: float | None) -> torch.Tensor:
        """The pool's output before the projection, from pooled normalised inputs ``[B, J, W]``:
        an attention pool's value rows and out-projection, else the pooled row; ``share``: the
        fraction of the pool's constants (value / out-projection biases) it carries."""
        if self.pool != "map":
            return pooled[:, 0]
        m = self.attn_pool
        J, d = m.num_heads, m.head_dim
        V = m.kv.weight[J * d:].reshape(J, d, -1)
        o = torch.einsum("bjw,jdw->bjd", pooled, V)                          # [B, J, d]
        if share and m.kv.bias is not None:
            o = o + share * m.kv.bias[J * d:].reshape(J, d)
        o = o.flatten(1)
        if isinstance(m.proj, nn.Linear):
            o = F.linear(o, m.proj.weight, m.proj.bias * share if share and m.proj.bias is not None else None)
        return o

    def _push(self, pooled: torch.Tensor, share: float | None) -> torch.Tensor:
        """The readout after the norm (:meth:`_pool_out`, then the projection and its bias × share)."""
        y = self._pool_out(pooled, share)
        y = y @ self.proj if self.proj is not None else y
        return y + share * self.proj_bias if share and self.proj_bias is not None else y

    def feature(self) -> torch.Tensor:
        """The image feature, recomputed from the stream entering the final norm."""
        if self.pool == "avg" and self.norm_after_pool:
            return self._push(self._normed(self.x[:, self.start:].mean(1))[:, None], 1.0)
        y = torch.einsum("bjn,bnw->bjw", self.pool_weights(), self._normed(self.x))
        out = self._push(y, 1.0)
        if self.pool == "map" and self.attn_pool.mlp is not None:
            out = out + self.pool_mlp()
        return out

    def pool_mlp(self) -> torch.Tensor:
        """The pool's MLP branch through the projection (the ``pool.mlp`` unit)."""
        m = self.attn_pool
        p = self._pool_out(torch.einsum("bjn,bnw->bjw", self.pool_weights(), self._normed(self.x)), 1.0)
        r = m.mlp(m.norm(p))
        return r @ self.proj if self.proj is not None else r


def _unit(ref: Reference, c: torch.Tensor, n: int | None, convention: str) -> torch.Tensor:
    """One unit ``[B, D]`` from its per-token contribution ``c`` ``[B, N, W]``: the convention's
    formula per token (``n``: its share count, official), weighted by the readout."""
    if ref.pool == "avg" and ref.norm_after_pool:                             # the norm sees the pooled vector
        x, c, a = ref.x[:, ref.start:].mean(1, keepdim=True), c[:, ref.start:].mean(1, keepdim=True), None
    else:
        x, a = ref.x, ref.pool_weights()                                      # [B, J, N]
    gamma, beta, mu, sigma = ref.stats(x)
    if convention == "official":
        y = gamma * c / sigma - ((gamma * mu / sigma - beta) / n if ref.norm is not None else -beta / n)
        share = 1.0 / n
    else:
        y = gamma * (c - c.mean(-1, keepdim=True) if ref.centres else c) / sigma
        share = None
    pooled = y if a is None else torch.einsum("bjn,bnw->bjw", a, y)        # [B, J, W]
    return ref._push(pooled, share)


def reference_units(ref: Reference, convention: str) -> torch.Tensor:
    """``[B, U, D]`` units in layout order, from the convention's formula (:mod:`.readout`,
    :mod:`.pooling` docstrings) applied to the per-token pieces of ``ref``."""
    L, H = len(ref.w_o), ref.w_o[0].shape[1]
    W = ref.x.shape[-1]
    zeros = torch.zeros(W, dtype=ref.x.dtype, device=ref.x.device)
    scale = lambda l: ref.ls1[l] if ref.ls1[l] is not None else 1
    bias = lambda l: ref.b_o[l] if ref.b_o[l] is not None else zeros
    n_vec = n_head = None
    if convention == "official":
        n_vec, n_head = 2 * L + 1, (2 * L + 1) * H
    units = [_unit(ref, ref.embed, n_vec, convention)]
    for l in range(L):
        for h in range(H):
            c = torch.einsum("bne,we->bnw", ref.z[l][:, :, h], ref.w_o[l][:, h])
            if convention == "official":
                c = c + bias(l) / H
            units.append(_unit(ref, scale(l) * c, n_head, convention))
        units.append(_unit(ref, ref.mlps[l], n_vec, convention))
    if ref.pool == "map" and ref.attn_pool.mlp is not None:
        units.append(ref.pool_mlp())
    if convention == "centred":
        b = sum(scale(l) * bias(l) for l in range(L))
        units.append(_unit(ref, b.expand_as(ref.x), None, convention))           # attn_bias
        const = ref._push(ref.stats(ref.x)[1].expand(ref.x.shape[0], ref.pool_weights().shape[1], W), 1.0)
        units.append(const)                                                     # out_bias: β and every bias after it
    return torch.stack(units, 1)


# --- attention, written out ----------------------------------------------------------------------
def _attend(q, k, v, scale: float, bias=None) -> torch.Tensor:
    """Explicit softmax attention ``[B, H, N, Dh]`` (never the fused kernel the model uses)."""
    logits = (q * scale) @ k.transpose(-2, -1)                               # [B, H, Nq, N]
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, N, _ = t.shape
    return t.reshape(B, N, n_heads, -1).transpose(1, 2)                      # [B, H, N, Dh]


def _linear(t, lin: nn.Linear):
    return F.linear(t, lin.weight, lin.bias)


def _final_norm(norm: nn.Module | None) -> nn.Module | None:
    return None if norm is None or isinstance(norm, nn.Identity) else norm


def _timm_attention(a: nn.Module, y: torch.Tensor, rope=None, bias=None, num_prefix: int = 0) -> torch.Tensor:
    """The head concatenation ``[B, N, H·Dh]`` a timm attention feeds its ``proj`` (timm Attention,
    EvaAttention, AttentionRope, RelPosAttention, BEiT's Attention)."""
    from timm.layers import apply_rot_embed_cat
    B, N, _ = y.shape
    H = a.num_heads
    if getattr(a, "qkv", None) is not None:
        wb = a.qkv.bias
        if getattr(a, "q_bias", None) is not None:                           # EVA / BEiT: q and v biases (k: zeros)
            k_bias = getattr(a, "k_bias", None)
            wb_ = torch.cat([a.q_bias, torch.zeros_like(a.q_bias) if k_bias is None else k_bias, a.v_bias])
            wb = wb_ if wb is None else wb + wb_
        q, k, v = F.linear(y, a.qkv.weight, wb).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    else:
        kv_heads = getattr(a, "num_kv_heads", H)
        q, k, v = _heads(_linear(y, a.q_proj), H), _heads(_linear(y, a.k_proj), kv_heads), \
            _heads(_linear(y, a.v_proj), kv_heads)
    if hasattr(a, "q_norm"):
        q, k = a.q_norm(q), a.k_norm(k)
    if rope is not None:
        npt, half = getattr(a, "num_prefix_tokens", num_prefix), getattr(a, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2).type_as(v)
    if k.shape[1] != H:                                                       # grouped-query attention
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    if getattr(a, "relative_position_bias_table", None) is not None:         # BEiT
        own = a._get_rel_pos_bias()
        bias = own if bias is None else own + bias
    elif getattr(a, "rel_pos", None) is not None:                            # RelPos ViT
        bias = a.rel_pos.get_bias()
    scale = a.scale if getattr(a, "scale", None) is not None else q.shape[-1] ** -0.5
    z = _attend(q, k, v, scale, bias).transpose(1, 2).reshape(B, N, -1)      # [B, N, H·Dh]
    z = a.norm(z) if isinstance(getattr(a, "norm", None), nn.Module) else z  # inner norm (EVA02-CLIP)
    if getattr(a, "gate", None) is not None:
        z = z * torch.sigmoid(_linear(y, a.gate))
    return z


def _gamma(ls) -> torch.Tensor | None:
    return ls if isinstance(ls, torch.Tensor) or ls is None else getattr(ls, "gamma", None)


def _scaled(g, t):
    return t if g is None else g * t


def _timm_block(blk: nn.Module, h: torch.Tensor, rope=None, shared=None):
    """``(h after the block, z [B, N, H, Dh], mlp [B, N, W], W_O [W, H, Dh], b_O, ls1)`` of one timm
    block, every branch written out (parallel branches: heads concatenated, LayerScale folded)."""
    from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock
    B, N, W = h.shape
    if isinstance(blk, ParallelScalingBlock):
        y = _linear(blk.in_norm(h), blk.in_proj)
        x_mlp, q, k, v = torch.split(y, blk.in_split, dim=-1)
        if blk.mlp_bias is not None:
            x_mlp = x_mlp + blk.mlp_bias
        H = blk.num_heads
        q = blk.q_norm(q.reshape(B, N, H, -1)).transpose(1, 2)
        k = blk.k_norm(k.reshape(B, N, H, -1)).transpose(1, 2)
        z = _attend(q, k, v.reshape(B, N, H, -1).transpose(1, 2), blk.scale).transpose(1, 2).reshape(B, N, W)
        x_mlp = blk.mlp_act(x_mlp)
        g = _gamma(blk.ls)
        if blk.out_proj is not None:
            w, b = blk.out_proj.weight, blk.out_proj.bias
            attn_w, mlp_out = w[:, :W], F.linear(x_mlp, w[:, W:])
        else:
            attn_w, b, mlp_out = blk.attn_out_proj.weight, blk.attn_out_proj.bias, _linear(x_mlp, blk.mlp_out_proj)
        out = F.linear(z, attn_w, b)
        mlp = _scaled(g, mlp_out)
        return h + _scaled(g, out) + mlp, z.reshape(B, N, H, -1), mlp, attn_w.reshape(W, H, -1), b, g
    if isinstance(blk, ParallelThingsBlock):
        zs, outs, ws, bs = [], [], [], []
        for branch in blk.attns:
            a, g = branch.attn, _gamma(branch.ls)
            z = _timm_attention(a, branch.norm(h))
            zs.append(z.reshape(B, N, a.num_heads, -1))
            outs.append(_scaled(g, _linear(z, a.proj)))
            ws.append(_scaled(g[:, None] if g is not None else None, a.proj.weight).reshape(W, a.num_heads, -1))
            bs.append(_scaled(g, a.proj.bias))
        h = h + sum(outs)
        mlp = sum(_scaled(_gamma(f.ls), f.mlp(f.norm(h))) for f in blk.ffns)
        return h + mlp, torch.cat(zs, 2), mlp, torch.cat(ws, 1), sum(bs), None
    a = blk.attn
    if hasattr(blk, "gamma_1"):                                               # Eva, BEiT: bare parameters
        g1, g2, mlp_of = blk.gamma_1, blk.gamma_2, lambda t: blk.mlp(blk.norm2(t))
    else:
        g1, g2, mlp_of = _gamma(blk.ls1), _gamma(blk.ls2), lambda t: blk.mlp(blk.norm2(t))
    z = _timm_attention(a, blk.norm1(h), rope, shared)
    H = a.num_heads
    h = h + _scaled(g1, _linear(z, a.proj))
    mlp = _scaled(g2, mlp_of(h))
    return h + mlp, z.reshape(B, N, H, -1), mlp, a.proj.weight.reshape(W, H, -1), a.proj.bias, g1


def _pool_of(m: nn.Module, x: torch.Tensor, norm_pre_pool: nn.Module, fc: nn.Module) -> dict:
    """The readout fields of a timm model (its pool, the one final norm)."""
    gp = getattr(m, "global_pool", "token")
    npt = int(getattr(m, "num_prefix_tokens", 0))
    attn_pool = getattr(m, "attn_pool", None)
    if attn_pool is not None:        # ViT, NaFlexVit: the pool reads the tokens after the prefix; Eva: all
        start = npt if hasattr(m, "pool_include_prefix") and not m.pool_include_prefix else 0
        return dict(pool="map", start=start, attn_pool=attn_pool, norm=_final_norm(norm_pre_pool))
    start = 0 if getattr(m, "pool_include_prefix", False) else npt
    if gp == "avg":
        after = not isinstance(fc, nn.Identity)
        return dict(pool="avg", start=start, norm_after_pool=after, norm=_final_norm(fc if after else norm_pre_pool))
    return dict(pool="token", norm=_final_norm(fc if not isinstance(fc, nn.Identity) else norm_pre_pool))


@torch.no_grad()
def timm_reference(m: nn.Module, images: torch.Tensor, proj=None, proj_bias=None) -> Reference:
    """The :class:`Reference` of a timm ViT (VisionTransformer, Eva, VisionTransformerRelPos, Beit,
    Cait, NaFlexVit); ``proj``/``proj_bias``: linear maps after the pool (open_clip's heads)."""
    from timm.models.beit import Beit
    from timm.models.cait import Cait
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos
    rope, shared, blocks = None, None, m.blocks
    if isinstance(m, Eva):
        h, rope = m._pos_embed(m.patch_embed(images))
        h = m.norm_pre(h)
    elif isinstance(m, NaFlexVit):
        emb = m._forward_embeds(images, patch_coord=None, patch_valid=None, attn_mask=None)
        h, rope = emb["patches"], emb.get("rope_embeds")
    elif isinstance(m, VisionTransformerRelPos):
        h = m.patch_embed(images)
        if m.cls_token is not None:
            h = torch.cat([m.cls_token.expand(h.shape[0], -1, -1), h], 1)
        shared = m.shared_rel_pos.get_bias() if m.shared_rel_pos is not None else None
    elif isinstance(m, Beit):
        h = torch.cat([m.cls_token.expand(images.shape[0], -1, -1), m.patch_embed(images)], 1)
        h = h + m.pos_embed if m.pos_embed is not None else h
        shared = m.rel_pos_bias() if m.rel_pos_bias is not None else None
    elif isinstance(m, Cait):
        return _cait_reference(m, images)
    else:
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
    mixed = rope is not None and (getattr(m, "rope_mixed", False) or getattr(m, "rope_is_mixed", False))
    rope = list(rope) if mixed else rope                                      # per-layer embeddings
    embed, zs, mlps, w_o, b_o, ls1 = h, [], [], [], [], []
    for i, blk in enumerate(blocks):
        h, z, mlp, w, b, g = _timm_block(blk, h, rope[i] if mixed else rope, shared)
        zs.append(z), mlps.append(mlp), w_o.append(w), b_o.append(b), ls1.append(g)
    fields = _pool_of(m, h, m.norm, getattr(m, "fc_norm", None) or nn.Identity())
    return Reference(embed, zs, mlps, h, w_o, b_o, ls1, proj=proj, proj_bias=proj_bias, **fields)


def _cait_reference(m: nn.Module, images: torch.Tensor) -> Reference:
    """CaiT: the patch tokens through their own blocks (not units), then the class token through the
    class-attention layers, whose heads and MLPs are the units of the CLS readout."""
    x = m.blocks(m.pos_drop(m.patch_embed(images) + m.pos_embed))              # [B, P, W] patch tokens
    cls = m.cls_token.expand(x.shape[0], -1, -1)                               # [B, 1, W]
    embed, zs, mlps, w_o, b_o, ls1 = cls, [], [], [], [], []
    for blk in m.blocks_token_only:
        a = blk.attn
        y = blk.norm1(torch.cat([cls, x], 1))
        B, N, W = y.shape
        H = a.num_heads
        q, k, v = _heads(_linear(y[:, :1], a.q), H), _heads(_linear(y, a.k), H), _heads(_linear(y, a.v), H)
        z = _attend(q, k, v, a.scale).transpose(1, 2).reshape(B, 1, W)        # [B, 1, H·Dh]
        cls = cls + blk.gamma_1 * _linear(z, a.proj)
        mlp = blk.gamma_2 * blk.mlp(blk.norm2(cls))
        cls = cls + mlp
        zs.append(z.reshape(B, 1, H, -1)), mlps.append(mlp)
        w_o.append(a.proj.weight.reshape(W, H, -1)), b_o.append(a.proj.bias), ls1.append(blk.gamma_1)
    return Reference(embed, zs, mlps, cls, w_o, b_o, ls1, norm=_final_norm(m.norm))


def _pre_norm(h: torch.Tensor, blocks, parts):
    """``(embed, z, mlps, x, w_o, b_o, ls1)`` of pre-norm blocks ``x + g1·proj(attn(ln1 x))``,
    ``x + mlp(x)``; ``parts(block) -> (ln1, qkv(y) -> q, k, v [B, H, N, Dh], scale, proj, g1, mlp)``."""
    embed, zs, mlps, w_o, b_o, ls1 = h, [], [], [], [], []
    for blk in blocks:
        ln1, qkv, scale, proj, g1, mlp = parts(blk)
        y = ln1(h)
        B, N, W = y.shape
        q, k, v = qkv(y)
        z = _attend(q, k, v, scale).transpose(1, 2)                          # [B, N, H, Dh]
        zs.append(z)
        out = proj(z.reshape(B, N, W))
        h = h + _scaled(g1, out)
        m = mlp(h)
        mlps.append(m)
        h = h + m
        w_o.append(proj.weight.reshape(W, z.shape[2], -1)), b_o.append(proj.bias), ls1.append(g1)
    return embed, zs, mlps, h, w_o, b_o, ls1


@torch.no_grad()
def open_clip_reference(visual: nn.Module, images: torch.Tensor) -> Reference:
    """An open_clip image tower: its own ViT (CLS or average pooling) or a timm trunk with the
    linear heads after it."""
    from open_clip.timm_model import TimmModel
    if isinstance(visual, TimmModel):
        linears = [m for m in [visual.trunk.head] + list(visual.head.children()) if isinstance(m, nn.Linear)]
        return timm_reference(visual.trunk, images, *compose_linears(linears))

    def parts(blk):
        mha = blk.attn
        qkv = lambda y: [_heads(t, mha.num_heads) for t in F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)]
        return (blk.ln_1, qkv, mha.head_dim ** -0.5, mha.out_proj, _gamma(blk.ls_1),
                lambda h: blk.ls_2(blk.mlp(blk.ln_2(h))))
    pieces = _pre_norm(visual._embeds(images), visual.transformer.resblocks, parts)   # (ln_pre applied)
    pool = dict(pool="avg", start=1, norm_after_pool=bool(visual.final_ln_after_pool)) \
        if visual.pool_type == "avg" else {}
    return Reference(*pieces, norm=_final_norm(visual.ln_post), proj=visual.proj, **pool)


@torch.no_grad()
def blip_reference(vm: nn.Module, images: torch.Tensor, interpolate: bool, proj: nn.Linear) -> Reference:
    """BLIP's vision model (transformers), read at its CLS token through ``vision_proj``."""
    def parts(layer):
        sa = layer.self_attn
        qkv = lambda y: sa.qkv(y).reshape(*y.shape[:2], 3, sa.num_heads, -1).permute(2, 0, 3, 1, 4)
        return layer.layer_norm1, qkv, sa.scale, sa.projection, None, lambda h: layer.mlp(layer.layer_norm2(h))
    h = vm.embeddings(images, **({"interpolate_pos_encoding": True} if interpolate else {}))
    return Reference(*_pre_norm(h, vm.encoder.layers, parts), norm=_final_norm(vm.post_layernorm),
                     proj=proj.weight.T, proj_bias=proj.bias)
