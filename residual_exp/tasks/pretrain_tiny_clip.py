"""``task=pretrain_tiny_clip``: regenerate the embedded tiny CLIP checkpoint (contrastive
pretraining on synthetic captions, see :func:`residual_exp.backbones.tiny_clip.pretrain_tiny_clip`)."""
from __future__ import annotations

from ..backbones.tiny_clip import CHECKPOINT, pretrain_tiny_clip as _pretrain


def pretrain_tiny_clip(cfg) -> int:
    t = cfg.task
    out = t.out or CHECKPOINT
    meta = _pretrain(out=out, n_images=t.n_images, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                     seed=t.seed, progress=bool(cfg.trainer.progress_bar))
    print(f"tiny CLIP written to {out}: {meta}")
    return 0
