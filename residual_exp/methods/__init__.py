"""Method registry: ``method=NAME`` → an adapter (see :mod:`.adapters`)."""
from __future__ import annotations

import torch

from ..spectral import PCABasis
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


def warn_k_clamped(k: int | None, components: dict) -> bool:
    """``method.k`` above a unit's number of components keeps all of them (clamped per unit, README): say so."""
    over = {g: int(n) for g, n in components.items() if k is not None and k > int(n)}
    if over:
        import logging
        logging.getLogger(__name__).warning(
            "method.k=%d is more than the components of %s: those units keep all their components (k is clamped "
            "per unit)", k, ", ".join(f"{g} ({n})" for g, n in over.items()))
    return bool(over)


def prune_rule(evr_rule: str = "strict", compat: str = "none") -> dict:
    """Keyword arguments of :meth:`PCABasis.prune` for ``conventions.evr_rule`` and ``compat``
    (compat=official also keeps k=1 when a unit never reaches the EVR target, bug (c))."""
    return {"rule": evr_rule, "unreachable": "one" if compat == "official" else "all"}


def coordinate_basis(basis: PCABasis) -> PCABasis:
    """compat=official (a): the official spectral_adapter scales output *coordinates*,
    ``(f − µ) ⊙ λ``: the same reweighting with the identity as its "basis"."""
    D = basis.dim
    eye = torch.eye(D, dtype=basis.components.dtype)[None]
    ones = torch.ones(1, D, dtype=basis.eigenvalues.dtype)
    return PCABasis(mean=basis.mean, components=eye, eigenvalues=ones, explained_variance_ratio=ones / D,
                    mask=torch.ones(1, D, dtype=torch.bool), n_samples=basis.n_samples, meta=dict(basis.meta))


def build_adapter(method_cfg, source, output_dim: int, unit_bases=None, output_basis=None,
                  backbone=None, seed: int = 0, evr_rule: str = "strict", compat: str = "none") -> Adapter:
    """The adapter for ``method_cfg.name`` reading units through ``source`` (a
    :class:`~residual_exp.decompose.readout.UnitSource`); bases are required when
    :func:`needs_bases`.  ``compat="official"`` reproduces the official code's bugs (a)-(d)."""
    name = method_cfg.name
    if name not in METHODS:
        raise ValueError(f"method.name={name!r}; valid: {', '.join(METHODS)}")
    if needs_bases(method_cfg) and (unit_bases is None or output_basis is None):
        raise ValueError(f"method {name} needs PCA bases")
    official = compat == "official"
    g = torch.Generator().manual_seed(seed)
    if name == "base":
        return ZeroShot()
    if name == "finetune":
        if backbone is None:
            raise ValueError("method=finetune needs the backbone")
        return Finetune(backbone)
    if name == "linear_adapter":
        return LinearAdapter(output_dim, method_cfg.init)
    rule = prune_rule(evr_rule, compat)
    if name == "spectral_adapter":
        warn_k_clamped(method_cfg.k, {"output": output_basis.num_components})
        basis = output_basis.prune(evr=method_cfg.evr, k=method_cfg.k, **rule)
        basis = coordinate_basis(basis) if official else basis.compact()
        return SpectralReweighting([("output", [0], basis)], None, 1, dropped_value=method_cfg.dropped_value,
                                   init=method_cfg.init, generator=g, from_feature=True)
    layout = source.layout
    selected = layout.indices(method_cfg.units)
    if not selected:
        raise ValueError(f"method.units={method_cfg.units!r} selects no unit")
    others = [i for i in range(len(layout)) if i not in set(selected)]
    other_mean = unit_bases.mean[others].sum(0) if unit_bases is not None and others else None    # [D]
    if name == "residual_coarse":
        return HeadScaling(selected, source, len(layout), others=method_cfg.others, other_mean=other_mean,
                           init=method_cfg.init, generator=g, batch_mean=official)
    blocks = unit_bases.blocks(selected)
    # the official code zero-pads every unit's basis to the largest K; square (K = D) bases are
    # then reconstructed with their transpose (bug b)
    square = official and max(b.num_components for _, _, b in blocks) == unit_bases.dim
    warn_k_clamped(method_cfg.k, {grp: b.num_components for grp, _, b in blocks})
    blocks = [(grp, idx, b.prune(evr=method_cfg.evr, k=method_cfg.k, **rule).compact()) for grp, idx, b in blocks]
    return SpectralReweighting(blocks, source, len(layout), others=method_cfg.others, other_mean=other_mean,
                               dropped_value=method_cfg.dropped_value, init=method_cfg.init, generator=g,
                               square_transpose=square, batch_mean=official)
