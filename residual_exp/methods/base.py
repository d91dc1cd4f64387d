"""The adapter protocol: what every method's adapter says about itself.

A method is a YAML file (``conf/method/NAME.yaml``, whose ``spec`` says what it reads and which
values it takes, :class:`~residual_exp.catalog.MethodSpec`) and an :class:`Adapter` subclass
named there (``spec.adapter``, an import path).  Train, export and results only talk to this
protocol — no code branches on a method's name:

==========================  ===========================================================================
``build(cfg, ctx)``         the adapter for a ``method`` config node (classmethod; ``ctx``: :class:`Context`)
``needs``                   what ``prepare`` reads: the stored ``feature``, the stored ``units``, or ``images``
``prepare(batch)``          a per-sample transform of the encodings that holds no trained parameter
                            (applied once to a cached split, per batch when streamed, or live)
``forward(**prepared)``     the adapted image feature ``[B, D]``
``trainable_params()``      the count the results tables report
``lambda_state(layout)``    ``(tensors, unit names)`` written to ``lambda.safetensors``, or None
``lambda_values()``         the trained λ as a flat tensor (logged as histograms), or None
``kept_components()``       the principal components it reweights (one λ each), or None
``fold(state, readout, …)`` the trained adapter (its state dict) as a linear map of the decomposed
                            forward's quantities (:class:`~residual_exp.export.Folded`; classmethod)
``tuned_backbone(state)``   the backbone weights an export must carry (finetune), or None
==========================  ===========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..catalog import Needs


@dataclass
class Context:
    """What an adapter may be built from, besides its config node."""
    source: Any                     # UnitSource: how the stored encodings are read as units
    output_dim: int
    selected: list = field(default_factory=list)   # the units it reweights (layout indices; units group)
    evr: float | None = None        # rank group: keep each unit's PCs up to this explained-variance ratio
    k: int | None = None            # or its first k (both None: all)
    unit_bases: Any = None          # UnitBases (methods whose spec needs bases, or others=mean)
    output_basis: Any = None        # PCABasis of the output feature
    backbone: Any = None            # the frozen Backbone (finetune trains its tower)
    seed: int = 0
    evr_rule: str = "strict"        # conventions.evr_rule
    compat: str = "none"            # compat=official reproduces the official code's bugs

    @property
    def official(self) -> bool:
        return self.compat == "official"

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class Adapter(nn.Module):
    """Base of every method's adapter (see the module docstring for the protocol)."""
    needs: ClassVar[str] = Needs.feature

    @classmethod
    def build(cls, cfg, ctx: Context) -> "Adapter":
        raise NotImplementedError(f"{cls.__name__}.build")

    def prepare(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"feature": batch["feature"]}

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def lambda_state(self, layout) -> tuple[dict[str, torch.Tensor], list[str]] | None:
        """What ``lambda.safetensors`` holds: the trained tensors (default: the state dict) and the
        names of the units they act on (none for output methods)."""
        return dict(self.state_dict()), []

    def lambda_values(self) -> torch.Tensor | None:
        return None

    def kept_components(self) -> int | None:
        """Principal components it reweights (None: it has none)."""
        return None

    @classmethod
    def fold(cls, state: dict, readout, cfg, layout: str, compat: str):
        raise NotImplementedError(f"{cls.__name__} cannot be exported")

    @classmethod
    def tuned_backbone(cls, state: dict) -> dict | None:
        return None
