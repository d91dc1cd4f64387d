"""Backbones by family (``model.family``): the families of the catalog (open_clip, tiny_clip, timm,
blip: :data:`residual_exp.catalog.FAMILIES`) and any a model config names a module for
(``model.spec.module``).  A family's module registers it (:func:`register_backbone`) when it is
imported, which happens the first time a model of that family is built; :func:`build_backbone`
builds the backbone a ``model`` config node describes.  The interface is :class:`~.base.Backbone`.
"""
from __future__ import annotations

import importlib

from ..catalog import FAMILIES, spec_of
from .base import REGISTRY, Backbone, UnsupportedArchitecture, register_backbone

__all__ = ["Backbone", "UnsupportedArchitecture", "build_backbone", "list_families", "reference_of", "register_backbone"]


def list_families() -> list[str]:
    """Every registered family (the catalog's are imported first)."""
    for fam in FAMILIES.values():
        importlib.import_module(fam.module)
    return sorted(REGISTRY)


def _register(family: str, cfg) -> None:
    """Import the module that registers ``family``: the catalog's, or the one the model config names
    (``model.spec.module``)."""
    if family in REGISTRY:
        return
    module = FAMILIES[family].module if family in FAMILIES else spec_of("model", cfg).module
    if module:
        importlib.import_module(module)


def build_backbone(cfg) -> Backbone:
    """Build the backbone described by the ``model`` config node ``cfg`` (``cfg.family``)."""
    family = cfg.get("family")
    _register(family, cfg)
    if family not in REGISTRY:
        raise KeyError(f"model.family={family!r} (model={cfg.get('name')!r}); valid families: "
                       f"{', '.join(list_families())}")
    return REGISTRY[family].builder(cfg)


def reference_of(backbone: Backbone, images):
    """The independent recomputation (:class:`~residual_exp.decompose.references.Reference`) of
    ``backbone`` on ``images`` that its family registered, or None when it has none."""
    entry = REGISTRY.get(backbone.family)
    return entry.reference(backbone, images) if entry is not None and entry.reference is not None else None
