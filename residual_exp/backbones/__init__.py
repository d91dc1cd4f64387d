"""Backbones by family (``model.family``): open_clip, tiny_clip, timm, blip.

Importing this package registers every family; :func:`build_backbone` builds the backbone a
``model`` config node describes.  The interface is :class:`~.base.Backbone`.
"""
from __future__ import annotations

from . import blip_backbone, open_clip_backbone, timm_backbone, tiny_clip  # noqa: F401  (register families)
from .base import REGISTRY, Backbone, UnsupportedArchitecture, register_backbone

__all__ = ["Backbone", "UnsupportedArchitecture", "build_backbone", "list_families", "reference_of", "register_backbone"]


def list_families() -> list[str]:
    return sorted(REGISTRY)


def build_backbone(cfg) -> Backbone:
    """Build the backbone described by the ``model`` config node ``cfg`` (``cfg.family``)."""
    family = cfg.get("family")
    if family not in REGISTRY:
        raise KeyError(f"model.family={family!r} (model={cfg.get('name')!r}); valid families: "
                       f"{', '.join(list_families())}")
    return REGISTRY[family].builder(cfg)


def reference_of(backbone: Backbone, images):
    """The independent recomputation (:class:`~residual_exp.decompose.references.Reference`) of
    ``backbone`` on ``images`` that its family registered, or None when it has none."""
    entry = REGISTRY.get(backbone.family)
    return entry.reference(backbone, images) if entry is not None and entry.reference is not None else None
