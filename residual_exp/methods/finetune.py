"""``finetune``: train the whole image tower against the frozen classifier (lr 1e-5, clip 1)."""
from __future__ import annotations

import torch

from ..catalog import Needs
from ..export import Folded
from .base import Adapter, Context

PREFIX = "backbone."


class Finetune(Adapter):
    needs = Needs.images

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for p in self.backbone.vision.parameters():
            p.requires_grad_(True)

    @classmethod
    def build(cls, cfg, ctx: Context) -> "Finetune":
        if ctx.backbone is None:
            raise ValueError("method=finetune needs the backbone")
        return cls(ctx.backbone)

    def prepare(self, batch):  # pragma: no cover - images never go through the cache
        raise RuntimeError("finetune runs the backbone on images; it has no cached path")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images)

    def lambda_state(self, layout):
        return None                      # the tuned tower is in checkpoints/best.ckpt

    @classmethod
    def fold(cls, state, readout, cfg, layout, compat) -> Folded:
        return Folded(readout.layout_dim, feature=torch.eye(readout.layout_dim, dtype=torch.float64))

    @classmethod
    def tuned_backbone(cls, state: dict) -> dict:
        """The tuned tower's weights (the adapter's ``backbone.*`` entries)."""
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
