"""Frozen classifiers: zero-shot text heads and class-mean image prototypes.

* :func:`zero_shot_weights` — the standard CLIP recipe: encode every template for every
  class, L2-normalise each text feature, average per class, renormalise.
* prototypes — for models without a text tower (ViT-L, DINOv2), two conventions
  (``conventions.prototype``): ``mean`` (the official code's, the default) — the raw per-class
  means µ_c of the train-split image features, ``logits = normalize(f) · µ_c`` (no scale, µ_c
  not normalised): :func:`class_means`; ``cosine`` — the per-class mean of the L2-normalised
  features, renormalised, times the model's logit scale: :func:`prototype_weights`.

The head is :class:`ClassifierHead`: ``logits = scale · normalize(f) @ Wᵀ`` with ``W``
row-normalised (text heads, cosine prototypes) or as given (mean prototypes).  Nothing in it
is trained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .catalog import Prototype, names


@torch.no_grad()
def zero_shot_weights(backbone, classnames: Sequence[str], templates: Sequence[str],
                      device: str | torch.device = "cpu", batch_size: int = 256,
                      progress: bool = True) -> torch.Tensor:
    """``[C, D]`` unit-norm class embeddings (template average done per class)."""
    if not backbone.has_text:
        raise ValueError(f"{backbone.name} has no text tower: use prototype_weights")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"templates must each contain exactly one '{{}}': {list(templates)[:3]}")
    texts = [t.format(c) for c in classnames for t in templates]        # class-major
    feats = []
    for i in tqdm(range(0, len(texts), batch_size), desc="zero-shot classifier", disable=not progress,
                  leave=False):
        tokens = backbone.tokenize(texts[i:i + batch_size])
        tokens = tokens.to(device) if torch.is_tensor(tokens) else {k: v.to(device) for k, v in tokens.items()}
        feats.append(F.normalize(backbone.encode_text(tokens).float(), dim=-1))
    feats = torch.cat(feats).view(len(classnames), len(templates), -1)   # [C, T, D]
    return F.normalize(feats.mean(1), dim=-1)                             # [C, D]


def prototype_weights(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, D]`` per-class mean of the L2-normalised features (rows renormalised by the head)."""
    return class_means(F.normalize(features.double(), dim=-1), labels, num_classes).to(features.dtype)


PROTOTYPES = names(Prototype)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, D]`` raw per-class means of the features (float64 sums), the official prototypes."""
    f = features.double()
    counts = torch.bincount(labels, minlength=num_classes)                 # [C]
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"prototype classifier: no training example for classes {missing[:10]}")
    sums = torch.zeros(num_classes, f.shape[1], dtype=f.dtype).index_add_(0, labels, f)
    return (sums / counts[:, None]).to(features.dtype)                    # [C, D]


def frozen_classifier(backbone, classnames: Sequence[str], templates: Sequence[str], cache, model_id: dict,
                      train_encoding: Callable, device: str | torch.device = "cpu",
                      progress: bool = True, prototype: str = "mean") -> "ClassifierHead":
    """The frozen head every method trains against: zero-shot text centroids (cached per
    model identity × class names × templates), or — for models without a text tower — the
    prototypes of the train split (``prototype``: ``mean`` | ``cosine``, see the module
    docstring); ``train_encoding()`` returns its cached :class:`~residual_exp.encode.Encoded`
    and is only called then."""
    if backbone.has_text:
        spec = {"model": model_id, "classnames": list(classnames), "templates": list(templates)}
        build = lambda tmp: _save_weights(tmp, zero_shot_weights(backbone, classnames, templates, device,
                                                                 progress=progress).cpu())
        weights = cache.get_or_build("classifiers", spec, build, _load_weights, suffix=".safetensors")
    else:
        import numpy as np
        if prototype not in PROTOTYPES:
            raise ValueError(f"conventions.prototype={prototype!r}; valid: {', '.join(PROTOTYPES)}")
        enc = train_encoding()
        feats = torch.from_numpy(np.asarray(enc.features, dtype=np.float64))
        labels = torch.from_numpy(np.asarray(enc.labels))
        if prototype == "mean":
            return ClassifierHead(class_means(feats, labels, len(classnames)).float(), 1.0, normalize_weights=False)
        weights = prototype_weights(feats.float(), labels, len(classnames))
    return ClassifierHead(weights.float(), backbone.logit_scale)


def _save_weights(path: Path, t: torch.Tensor) -> None:
    from safetensors.torch import save_file
    save_file({"weight": t.contiguous()}, str(path))


def _load_weights(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(str(path))["weight"]


class ClassifierHead(nn.Module):
    """Frozen classifier ``scale · normalize(f) @ Wᵀ``; ``W`` row-normalised unless
    ``normalize_weights=False`` (the official mean prototypes)."""

    def __init__(self, weights: torch.Tensor, scale: float, normalize_weights: bool = True) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(weights, dim=-1) if normalize_weights else weights.clone())  # [C, D]
        self.scale = float(scale)
        self.normalize_weights = bool(normalize_weights)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features, dim=-1)                                  # [B, D]
        return self.scale * f @ self.weight.to(f.dtype).T                  # [B, C]


@torch.no_grad()
def top1_accuracy(head, features, labels, batch: int = 4096) -> float:
    """Micro top-1 accuracy of ``head`` on ``features`` ``[N, D]`` (tensor, array or memmap,
    cast to float32) against ``labels`` ``[N]`` — the one accuracy of the package outside the
    Lightning loop (which uses torchmetrics' micro average)."""
    import numpy as np
    f = features if torch.is_tensor(features) else torch.from_numpy(np.ascontiguousarray(features))
    f = f.float()
    y = labels if torch.is_tensor(labels) else torch.from_numpy(np.asarray(labels))
    if len(f) != len(y):
        raise ValueError(f"{len(f)} features but {len(y)} labels")
    if len(f) == 0:
        raise ValueError("accuracy of an empty set")
    pred = torch.cat([head(f[i:i + batch]).argmax(-1).cpu() for i in range(0, len(f), batch)])
    return float((pred == y.cpu()).double().mean())
