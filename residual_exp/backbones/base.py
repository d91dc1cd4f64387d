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

Builders are registered with :func:`register_backbone` and receive the ``model`` config node
(``name, arch, pretrained, weights, image_size, logit_scale, cache_dir``).
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    name: str
    builder: Callable[..., Backbone]
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, description: str = "", **defaults):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = BackboneEntry(name, fn, description, defaults)
        return fn
    return deco


def _ensure_loaded() -> None:
    import importlib
    for mod in ("open_clip_backbone", "tiny_clip", "timm_backbone", "blip_backbone"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:  # a family file not written yet
            if mod not in str(e):
                raise


def list_backbones() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def build_backbone(cfg) -> Backbone:
    """Build the backbone named ``cfg.name`` (the ``model`` config node)."""
    _ensure_loaded()
    if cfg.name not in _REGISTRY:
        raise KeyError(f"unknown model {cfg.name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.name].builder(cfg)
