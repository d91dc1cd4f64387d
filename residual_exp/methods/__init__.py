"""Method registry: ``method=NAME`` → an adapter (see :mod:`.adapters`)."""
from __future__ import annotations

import torch

from .adapters import (Adapter, HeadScaling, LinearAdapter, SpectralReweighting, ZeroShot,
                       init_lambda)
from .finetune import Finetune

METHODS = ("base", "finetune", "linear_adapter", "spectral_adapter",
           "residual_coarse", "residual_fine", "residual_full")
NEEDS_BASES = ("spectral_adapter", "residual_fine", "residual_full")

__all__ = ["METHODS", "NEEDS_BASES", "needs_bases", "Adapter", "ZeroShot", "LinearAdapter", "SpectralReweighting",
           "HeadScaling", "Finetune", "build_adapter", "init_lambda"]


def needs_bases(method_cfg) -> bool:
    """Whether the adapter of ``method_cfg`` reads PCA bases (its components, or the reference
    means of the units it replaces with ``others=mean``)."""
    return method_cfg.name in NEEDS_BASES or (method_cfg.name == "residual_coarse" and method_cfg.others == "mean")


def build_adapter(method_cfg, layout, output_dim: int, unit_basis=None, output_basis=None,
                  backbone=None, seed: int = 0) -> Adapter:
    """The adapter for ``method_cfg.name`` (bases are required when :func:`needs_bases`)."""
    name = method_cfg.name
    if name not in METHODS:
        raise ValueError(f"method.name={name!r}; valid: {', '.join(METHODS)}")
    if needs_bases(method_cfg) and (unit_basis is None or output_basis is None):
        raise ValueError(f"method {name} needs PCA bases")
    g = torch.Generator().manual_seed(seed)
    if name == "base":
        return ZeroShot()
    if name == "finetune":
        if backbone is None:
            raise ValueError("method=finetune needs the backbone")
        return Finetune(backbone)
    if name == "linear_adapter":
        return LinearAdapter(output_dim)
    if name == "spectral_adapter":
        return SpectralReweighting(output_basis.prune(), [0], 1, others="drop",
                                   dropped_value=method_cfg.dropped_value, init=method_cfg.init,
                                   generator=g, from_feature=True)
    selected = layout.indices(method_cfg.units)
    if not selected:
        raise ValueError(f"method.units={method_cfg.units!r} selects no unit")
    others = [i for i in range(len(layout)) if i not in set(selected)]
    other_mean = None
    if unit_basis is not None and others:
        other_mean = unit_basis.mean[others].sum(0)                        # [D]
    if name == "residual_coarse":
        return HeadScaling(selected, len(layout), others=method_cfg.others, other_mean=other_mean,
                           init=method_cfg.init, generator=g)
    basis = unit_basis.select(selected).prune(evr=method_cfg.evr, k=method_cfg.k).compact()
    return SpectralReweighting(basis, selected, len(layout), others=method_cfg.others,
                               other_mean=other_mean, dropped_value=method_cfg.dropped_value,
                               init=method_cfg.init, generator=g)
