"""``finetune``: train the whole image tower against the frozen classifier (lr 1e-5, clip 1)."""
from __future__ import annotations

import torch

from .adapters import Adapter


class Finetune(Adapter):
    needs = "images"

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for p in self.backbone.vision.parameters():
            p.requires_grad_(True)

    def prepare(self, units, feature):  # pragma: no cover - images never go through the cache
        raise RuntimeError("finetune runs the backbone on images; it has no cached path")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images)
