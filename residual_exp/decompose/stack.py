"""Assemble the per-unit residual contributions of a pre-norm ViT at the CLS token.

Every family's hooks collect the same things per layer — the CLS query's per-head value mix
``z [B, H, Dh]`` before the output projection, the projection (``W_O``, ``b_O``), an optional
LayerScale ``γ`` and the MLP's CLS output — and this module turns them into the residual
stream pieces, in :class:`~residual_exp.decompose.units.UnitLayout` order, whose sum is the
stream entering the final norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LayerPieces:
    z: torch.Tensor                  # [B, H, Dh] CLS per-head attention output, before W_O
    w_o: torch.Tensor                # [W, H·Dh] output projection weight (nn.Linear layout)
    b_o: torch.Tensor | None         # [W] its bias
    gamma: torch.Tensor | None       # [W] LayerScale on the attention branch (None: none)
    mlp: torch.Tensor                # [B, W] the MLP branch's CLS output (LayerScale included)


def layer_scale(ls: nn.Module) -> torch.Tensor | None:
    """A LayerScale module's per-channel gamma, or None (``nn.Identity``: no LayerScale)."""
    g = getattr(ls, "gamma", None)       # open_clip's and timm's LayerScale both call it gamma
    return g if isinstance(g, torch.Tensor) else None


def residual_contributions(embed: torch.Tensor, layers: list[LayerPieces]) -> torch.Tensor:
    """``[B, U - 1, W]``: embed, per layer (heads …, mlp), then Σ attention biases.

    ``U - 1`` because the last unit, ``out_bias``, is added by the LayerNorm lens.
    """
    B, W = embed.shape
    pieces = [embed[:, None]]                                             # [B, 1, W]
    attn_bias = torch.zeros(B, W, dtype=embed.dtype, device=embed.device)
    for p in layers:
        _, H, Dh = p.z.shape
        assert p.z.shape[0] == B and p.w_o.shape == (W, H * Dh), (p.z.shape, p.w_o.shape)
        w_o = p.w_o.view(W, H, Dh).to(p.z.dtype)                          # [W, H, Dh]
        heads = torch.einsum("bhd,whd->bhw", p.z, w_o)                    # [B, H, W]
        b_o = p.b_o.to(embed.dtype) if p.b_o is not None else torch.zeros_like(embed[0])
        if p.gamma is not None:
            g = p.gamma.to(heads.dtype)
            heads, b_o = heads * g, b_o * g
        attn_bias = attn_bias + b_o
        pieces += [heads, p.mlp[:, None]]                                 # [B, H, W], [B, 1, W]
    pieces.append(attn_bias[:, None])
    return torch.cat(pieces, 1)                                           # [B, U - 1, W]


def cls_heads_pre_hook(sink: list, num_heads: int, head_dim: int):
    """A forward pre-hook for an attention output projection called as a module (timm's
    ``attn.proj``, BLIP's ``projection``): its input is the head concatenation
    ``[B, N, H·Dh]``; the CLS row is stored as ``[B, H, Dh]`` (cloned, so the layer's whole
    activation is not kept alive)."""
    def hook(module, args):
        z = args[0][:, 0].clone()                                         # [B, H·Dh]
        sink.append(z.reshape(z.shape[0], num_heads, head_dim))           # [B, H, Dh]
    return hook
