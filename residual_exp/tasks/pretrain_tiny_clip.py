"""``task=pretrain_tiny_clip``: regenerate the embedded tiny CLIP checkpoint (contrastive
pretraining on synthetic captions, see :func:`residual_exp.backbones.tiny_clip.pretrain_tiny_clip`)."""
from __future__ import annotations

from ..backbones.tiny_clip import CHECKPOINT, pretrain_tiny_clip as _pretrain


def pretrain_tiny_clip(cfg) -> int:
    from pathlib import Path

    from ..errors import UserError, writable_dir
    t = cfg.task
    out = Path(str(t.out or CHECKPOINT)).expanduser()
    if out.is_dir():                      # checked before ~10 minutes of training, not after
        raise UserError(f"task.out={out}: is a folder; give the checkpoint's file name (e.g. {out / 'tiny_clip.safetensors'})")
    writable_dir(out.parent, "task.out")
    meta = _pretrain(out=out, n_images=t.n_images, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                     seed=t.seed, progress=bool(cfg.trainer.progress_bar))
    print(f"tiny CLIP written to {out}: {meta}")
    return 0
