"""Hook helpers shared by the backbone families (what each family's ``_install`` stores).

Every family collects the same things at the CLS token — the embedding entering block 0, per
layer the heads' value mix ``z [B, H, Dh]`` before the output projection and the MLP branch's
output, and the CLS row entering the final norm — and :func:`~.readout.raw_units` turns them
into what the cache keeps.  CLS rows are cloned: a view would keep each layer's whole
``[B, N, W]`` activation alive until the units are built.
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


def cls_heads_pre_hook(sink: list, num_heads: int, head_dim: int):
    """A forward pre-hook for an attention output projection called as a module (timm's
    ``attn.proj``, BLIP's ``projection``): its input is the head concatenation
    ``[B, N, H·Dh]``; the CLS row is stored as ``[B, H, Dh]``."""
    def hook(module, args):
        z = args[0][:, 0].clone()                                         # [B, H·Dh]
        sink.append(z.reshape(z.shape[0], num_heads, head_dim))           # [B, H, Dh]
    return hook


def cls_input_pre_hook(store: dict, key: str):
    """A forward pre-hook storing the CLS row of a module's input as ``store[key]`` (the final
    norm's input: its statistics are the ones the readout needs).  Only the first call of a
    forward counts: BLIP's vision model applies ``post_layernorm`` a second time to its pooled
    (already normalised) output."""
    def hook(module, args):
        if key not in store:
            store[key] = cls_row(args[0])
    return hook
