"""The backbone interface and registry (``model=NAME``).

A :class:`Backbone` wraps one pretrained model and gives the rest of the code everything
it needs, whatever the family (open_clip, timm, BLIP, …):

* ``transform``            PIL image → tensor (the model's own preprocessing)
* ``encode_image(x)``      the model's image feature ``[B, D]`` (unnormalised)
* ``encode_text(tokens)``  text feature ``[B, D]`` (``has_text`` models only)
* ``tokenize(texts)``      tokens for ``encode_text``
* ``decompose(x)``         ``(units [B, U, D], feature [B, D])`` with ``units.sum(1) == feature``
* ``layout``               the :class:`~residual_exp.decompose.units.UnitLayout` of those units
* ``vision``               the ``nn.Module`` holding the image tower (what ``finetune`` trains)
* ``logit_scale``          the temperature of the zero-shot classifier (float)

Builders are registered per *family* with :func:`register_backbone` and receive the ``model``
config node (``name, family, arch, pretrained, weights, image_size, logit_scale, cache_dir,
params``).  A model preset (``conf/model/NAME.yaml``) is the one source of truth for a
model: its family, architecture, weights tag and family options (e.g. ``params.quick_gelu``).
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..decompose.units import UnitLayout


class UnsupportedArchitecture(ValueError):
    """The readout is not linear in the residual units (attention pooling, ResNets, …)."""


class Backbone(nn.Module, abc.ABC):
    family: str = "?"

    def __init__(self, name: str, output_dim: int, layout: UnitLayout, transform: Callable,
                 image_size: int, has_text: bool, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.name = name
        self.output_dim = int(output_dim)
        self.layout = layout
        self.transform = transform
        self.image_size = int(image_size)
        self.has_text = bool(has_text)
        self._logit_scale = float(logit_scale)

    # --- towers -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vision(self) -> nn.Module: ...

    @abc.abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no text tower; use the prototype classifier")

    def tokenize(self, texts: list[str]) -> Any:
        raise NotImplementedError(f"{self.name} has no text tower")

    @property
    def logit_scale(self) -> float:
        return self._logit_scale

    # --- decomposition ------------------------------------------------------------------
    @abc.abstractmethod
    def _install(self, hs, store: dict) -> None:
        """Install hooks/instance forwards on ``hs`` that fill ``store`` during a forward."""

    @abc.abstractmethod
    def _units(self, store: dict) -> torch.Tensor:
        """Turn what the hooks stored into ``[B, U, D]`` units in the output space."""

    @contextmanager
    def decomposing(self) -> Iterator[dict]:
        """Hooks are live inside the block and always removed after it."""
        from ..decompose.hooks import hooks
        store: dict = {}
        with hooks() as hs:
            self._install(hs, store)
            yield store

    def decompose(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(units [B, U, D], feature [B, D])``; ``units.sum(1)`` equals ``feature``."""
        with self.decomposing() as store:
            feature = self.encode_image(images)
            units = self._units(store)
        assert units.shape == (images.shape[0], len(self.layout), self.output_dim), units.shape
        return units, feature


# --- registry ---------------------------------------------------------------------------
@dataclass
class BackboneEntry:
    family: str
    builder: Callable[..., Backbone]
    description: str = ""


REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(family: str, description: str = ""):
    """Register ``builder(model_cfg) -> Backbone`` for ``model.family=FAMILY``.  The family
    modules register themselves when :mod:`residual_exp.backbones` is imported."""
    def deco(fn):
        if family in REGISTRY:
            raise ValueError(f"backbone family {family!r} registered twice")
        REGISTRY[family] = BackboneEntry(family, fn, description)
        return fn
    return deco
