"""Exact LayerNorm linearisation ("lens") of the final norm (DESIGN.md §2).

With x = Σ_u c_u the CLS residual entering the final LayerNorm and s = sqrt(Var(x) + eps)
(biased variance, as LayerNorm), for the affine LN:

    LN(x) = Σ_u γ ⊙ (c_u − mean(c_u)) / s + β

and the output feature is ``LN(x) @ P + b``.  Each unit becomes
``(γ ⊙ (c_u − mean c_u) / s) @ P``; ``β @ P + b`` is the constant unit ``out_bias``.
"""
from __future__ import annotations

import torch


def layer_norm_lens(contribs: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, proj: torch.Tensor | None = None,
                    proj_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Push per-unit residual contributions through a frozen LayerNorm and a projection.

    contribs: ``[B, U, W]`` residual-stream pieces whose sum over U is the stream x.
    weight, bias: LN affine parameters ``[W]`` (None: no affine).
    proj: ``[W, D]`` (applied as ``y @ proj``; pass ``linear.weight.T`` for nn.Linear) or None.
    Returns ``[B, U + 1, D]``: the U linearised units and, last, the constant ``out_bias``.
    """
    B, U, W = contribs.shape
    x = contribs.sum(1)                                              # [B, W] the real stream
    s = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)    # [B, 1] frozen LN scale
    y = (contribs - contribs.mean(-1, keepdim=True)) / s[:, None]    # [B, U, W] centred, scaled
    if weight is not None:
        y = y * weight
    const = bias if bias is not None else torch.zeros(W, dtype=y.dtype, device=y.device)
    const = const.to(y.dtype).expand(B, 1, W)                        # [B, 1, W]
    if proj is not None:
        y = y @ proj.to(y.dtype)                                     # [B, U, D]
        const = const @ proj.to(y.dtype)                             # [B, 1, D]
    if proj_bias is not None:
        const = const + proj_bias.to(y.dtype)
    return torch.cat([y, const], 1)                                  # [B, U + 1, D]
