"""Hook helpers shared by the backbone families (what each family's ``_install`` stores).

Every family collects the same things — the embedding entering block 0, per layer the heads'
value mix ``z [B, H, Dh]`` before the output projection and the MLP branch's output, and the row
entering the final norm — read off each token tensor by the readout's
:meth:`~.pooling.Pool.rows`: the CLS row (cloned: a view would keep each layer's whole
``[B, N, W]`` activation alive until the units are built), the token mean (average pooling), or
the whole token tensor (deferred pools, ``[B, N, H, Dh]`` / ``[B, N, W]``).
:func:`~.readout.raw_units` (or :mod:`.pooling`) turns them into what the cache keeps.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def layer_scale(ls: nn.Module) -> torch.Tensor | None:
    """A LayerScale module's per-channel gamma, or None (``nn.Identity``: no LayerScale)."""
    g = getattr(ls, "gamma", None)       # open_clip's and timm's LayerScale both call it gamma
    return g if isinstance(g, torch.Tensor) else None


def cls_row(t: torch.Tensor) -> torch.Tensor:
    """The CLS row of a batch-first token tensor ``[B, N, W]`` (a pooled ``[B, W]`` is returned as is)."""
    return (t[:, 0] if t.ndim == 3 else t).clone()


def cls_heads_pre_hook(sink: list, num_heads: int, head_dim: int, rows=None, width: int | None = None):
    """A forward pre-hook for an attention output projection called as a module (timm's
    ``attn.proj``, BLIP's ``projection``): its input is the head concatenation
    ``[B, N, H·Dh]`` (its first ``width`` channels when the projection is fused with the MLP's);
    the CLS row (or ``rows`` of it) is stored as ``[B, H, Dh]`` (``[B, N, H, Dh]``)."""
    def hook(module, args):
        t = args[0] if width is None else args[0][..., :width]
        z = t[:, 0].clone() if rows is None else rows(t)                  # [B, H·Dh] (or [B, N, H·Dh])
        sink.append(z.reshape(*z.shape[:-1], num_heads, head_dim))        # [B, H, Dh] (or [B, N, H, Dh])
    return hook


def cls_input_pre_hook(store: dict, key: str, rows=None):
    """A forward pre-hook storing the CLS row (or ``rows``) of a module's input as ``store[key]``
    (the final norm's input: its statistics are the ones the readout needs; a norm after the pool
    sees the pooled ``[B, W]``, stored as is).  Only the first call of a forward counts: BLIP's
    vision model applies ``post_layernorm`` a second time to its pooled (already normalised) output."""
    def hook(module, args):
        if key not in store:
            t = args[0]
            store[key] = cls_row(t) if rows is None or t.ndim == 2 else rows(t)
    return hook
