"""Methods: ``method=NAME`` → an adapter (the protocol: :mod:`.base`; the seven of the paper:
:mod:`.adapters`, :mod:`.finetune`).

Which class a method uses is its YAML's ``spec.adapter`` (an import path), so a new method is one
adapter class and one YAML file: nothing here lists the methods.
"""
from __future__ import annotations

from ..catalog import load, needs_bases, spec_of
from .adapters import (HeadScaling, LinearAdapter, OutputSpectral, SpectralReweighting, ZeroShot, init_lambda,
                       prune_rule, warn_k_clamped)
from .base import Adapter, Context

__all__ = ["Adapter", "Context", "ZeroShot", "LinearAdapter", "OutputSpectral", "SpectralReweighting", "HeadScaling",
           "adapter_class", "build_adapter", "init_lambda", "needs_bases", "prune_rule", "warn_k_clamped"]


def adapter_class(method_cfg) -> type[Adapter]:
    """The :class:`Adapter` subclass a ``method`` node's spec names."""
    cls = load(spec_of("method", method_cfg).adapter)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"method={method_cfg.name}: spec.adapter={spec_of('method', method_cfg).adapter!r} is not "
                        f"an Adapter subclass (residual_exp.methods.base.Adapter)")
    return cls


def build_adapter(method_cfg, source, output_dim: int, unit_bases=None, output_basis=None,
                  backbone=None, seed: int = 0, evr_rule: str = "strict", compat: str = "none",
                  units=(), rank=None) -> Adapter:
    """The adapter of ``method_cfg`` reading units through ``source`` (a
    :class:`~residual_exp.decompose.readout.UnitSource`) and reweighting ``units`` (layout indices, or
    kinds such as ``"heads"`` / ``"head+mlp"``; :func:`~residual_exp.decompose.selection.select`
    resolves a ``units`` config node) with the components ``rank`` keeps (a node with ``evr`` / ``k``;
    None: all); bases are required when :func:`~residual_exp.catalog.needs_bases`.
    ``compat="official"`` reproduces the official code's bugs (a)-(d)."""
    if needs_bases(method_cfg) and (unit_bases is None or output_basis is None):
        raise ValueError(f"method {method_cfg.name} needs PCA bases")
    selected = source.layout.indices(units) if isinstance(units, str) else [int(u) for u in units]
    ctx = Context(source, output_dim, selected, rank.evr if rank is not None else None,
                  rank.k if rank is not None else None, unit_bases, output_basis, backbone, seed, evr_rule, compat)
    return adapter_class(method_cfg).build(method_cfg, ctx)
