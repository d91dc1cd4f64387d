"""``model=tiny_clip``: a small open_clip ``CLIP`` pretrained by this project on synthetic captions.

The architecture is registered through open_clip's own config mechanism
(``assets/tiny-clip.json`` → ``open_clip.add_model_config``), so it is built by
``open_clip.create_model`` and decomposed by exactly the code that serves ViT-B/16 and L/14.
The one difference is the tokenizer: a word-level vocabulary of the synthetic captions
(≤ 512 words) instead of the 49k BPE vocabulary, so that the checkpoint stays small.  The end
token has the largest id, so open_clip's ``argmax`` text pooling reads it as usual.

Weights: ``model.pretrained=embedded`` loads ``assets/tiny_clip.safetensors`` (shipped,
fp16, produced by ``python -m residual_exp task=pretrain_tiny_clip``); if that file is
missing the first run pretrains and writes it.  ``model.pretrained=null`` is random init.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..decompose.references import open_clip_reference
from .base import register_backbone
from .open_clip_backbone import OpenClipBackbone
from .weights import check_local_file

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ARCH = "tiny-clip"
CONFIG_FILE = ASSETS / "tiny-clip.json"
CHECKPOINT = ASSETS / "tiny_clip.safetensors"
PAD, UNK, SOT = "<pad>", "<unk>", "<sot>"
EOT = "<eot>"


# --- tokenizer --------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class WordTokenizer:
    """Word-level tokenizer: ``[sot, w1 … wn, eot, pad …]`` with eot = the largest id."""

    def __init__(self, vocab: list[str], vocab_size: int, context_length: int) -> None:
        if len(vocab) + 4 > vocab_size:
            raise ValueError(f"vocabulary of {len(vocab)} words does not fit vocab_size={vocab_size}")
        self.vocab = list(vocab)
        self.context_length = context_length
        self.ids = {PAD: 0, UNK: 1, SOT: 2}
        self.ids.update({w: i + 3 for i, w in enumerate(self.vocab)})
        self.eot = vocab_size - 1

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)            # [N, ctx]
        for i, t in enumerate(texts):
            ids = [self.ids[SOT]] + [self.ids.get(w, self.ids[UNK]) for w in _words(t)][: ctx - 2]
            ids.append(self.eot)
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def unknown_words(self, texts: list[str]) -> set[str]:
        return {w for t in texts for w in _words(t) if w not in self.ids}


def default_vocab() -> list[str]:
    """Every word of the synthetic captions, class names and templates (sorted, stable)."""
    from ..data import shapes
    words: set[str] = set()
    for names in shapes.ATTRIBUTES.values():
        for n in names:
            words.update(_words(n))
    for temps in shapes.TEMPLATES.values():
        for t in temps:
            words.update(_words(t))
    _, attrs = shapes.generate(4096, seed=12345, split="pretrain", image_size=16)
    for c in shapes.make_captions(attrs, np.random.default_rng(0)):
        words.update(_words(c))
    return sorted(words)


# --- model --------------------------------------------------------------------------------
def _register_arch() -> dict:
    import open_clip
    if ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_FILE)
    return json.loads(CONFIG_FILE.read_text())


def create_tiny_clip(state_path: str | os.PathLike | None = None):
    """``(model, transform, tokenizer)``; random weights when ``state_path`` is None."""
    import open_clip
    cfg = _register_arch()
    root = logging.getLogger()
    level = root.level
    if state_path is not None:   # open_clip would warn "initialized randomly" before we load the weights
        root.setLevel(logging.ERROR)
    try:
        model, _, transform = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    finally:
        root.setLevel(level)
    vocab = default_vocab()
    if state_path is not None:
        from .weights import check_fits, load_weights_file
        state = {k: v.float() for k, v in load_weights_file(state_path).items()}
        check_fits(model, state, state_path, "the tiny CLIP (model.family=tiny_clip)")
        vocab = _vocab_of(state_path) or vocab
        model.load_state_dict(state, strict=True)
    model.eval()
    tcfg = cfg["text_cfg"]
    tokenizer = WordTokenizer(vocab, tcfg["vocab_size"], tcfg["context_length"])
    return model, transform, tokenizer


def _vocab_of(path) -> list[str] | None:
    """The word list a safetensors checkpoint carries in its metadata (None: the default vocabulary)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:            # a torch checkpoint: no metadata
        return None
    return json.loads(meta["vocab"]) if "vocab" in meta else None


def save_tiny_clip(model, tokenizer: WordTokenizer, path: str | os.PathLike, meta: dict) -> None:
    """fp16 safetensors with the vocabulary in the metadata; atomic (temp file + rename)."""
    from safetensors.torch import save_file
    from ..atomic import atomic_path
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"vocab": json.dumps(tokenizer.vocab),
                                             **{k: str(v) for k, v in meta.items()}})
        os.chmod(tmp, 0o644)


@register_backbone("tiny_clip", "the embedded 4-layer width-128 CLIP at 32 px, pretrained on the synthetic shapes captions",
                   reference=lambda bb, images: open_clip_reference(bb.model.visual, images))
def build_tiny_clip(cfg) -> OpenClipBackbone:
    if cfg.weights:
        path = check_local_file(cfg.weights, "model.weights")
    elif cfg.pretrained is None:
        path = None
    elif cfg.pretrained == "embedded":
        if not CHECKPOINT.exists():
            log.warning("embedded tiny CLIP checkpoint %s is missing: pretraining it now", CHECKPOINT)
            pretrain_tiny_clip(out=CHECKPOINT)
        path = CHECKPOINT
    else:
        raise ValueError(f"model.pretrained={cfg.pretrained!r} for tiny_clip: use 'embedded' or null")
    model, transform, tokenizer = create_tiny_clip(path)
    return OpenClipBackbone(cfg.name, model, transform, tokenizer, int(model.visual.image_size[0]))


# --- contrastive pretraining ------------------------------------------------------------
def pretrain_tiny_clip(out: str | os.PathLike = CHECKPOINT, n_images: int = 20000, epochs: int = 8,
                       batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
                       progress: bool = True) -> dict:
    """CLIP's symmetric InfoNCE on ``ShapesCaptions``; AdamW, warm-up + cosine; writes ``out``.

    Returns a summary dict (final loss, seconds).  Deterministic for a given seed on CPU.
    """
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from ..data.shapes import ShapesCaptions

    torch.manual_seed(seed)
    model, transform, tokenizer = create_tiny_clip(None)
    size = int(model.visual.image_size[0])
    data = ShapesCaptions(n_images, seed=seed, image_size=size)
    unknown = tokenizer.unknown_words(data.captions[:2000])
    if unknown:
        log.warning("caption words outside the tiny CLIP vocabulary: %s", sorted(unknown)[:20])
    # normalise exactly as the eval transform does (ToTensor + Normalize), batched
    norm = transform.transforms[-1]
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div_(255)   # [N, 3, H, W]
    images = (images - torch.tensor(norm.mean)[:, None, None]) / torch.tensor(norm.std)[:, None, None]
    tokens = tokenizer(data.captions)                                               # [N, ctx]

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    steps_per_epoch = len(data) // batch_size
    total, warmup = epochs * steps_per_epoch, max(1, steps_per_epoch // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(seed)
    t0, loss = time.time(), float("nan")
    bar = tqdm(total=total, desc="pretrain tiny_clip", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            img_f, txt_f, scale = model(images[idx], tokens[idx])
            l = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss = float(l)
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()
    bar.close()
    model.eval()
    meta = dict(n_images=n_images, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                final_loss=round(loss, 4), seconds=round(time.time() - t0, 1))
    save_tiny_clip(model, tokenizer, out, meta)
    log.info("tiny CLIP pretrained: %s → %s", meta, out)
    return meta
