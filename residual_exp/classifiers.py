"""Frozen classifiers: zero-shot text heads and class-mean image prototypes.

* :func:`zero_shot_weights` — the standard CLIP recipe: encode every template for every
  class, L2-normalise each text feature, average per class, renormalise.
* prototypes — for models without a text tower (ViT-L, DINOv2), two conventions
  (``conventions.prototype``): ``mean`` (the official code's, the default) — the raw per-class
  means µ_c of the train-split image features, ``logits = normalize(f) · µ_c`` (no scale, µ_c
  not normalised): :func:`class_means`; ``cosine`` — the per-class mean of the L2-normalised
  features, renormalised, times the model's logit scale: :func:`prototype_weights`.

The head is :class:`ClassifierHead`: ``logits = scale · normalize(f) @ Wᵀ + bias`` with ``W``
row-normalised (text heads, cosine prototypes) or as given (mean prototypes).  Nothing in it
is trained.  A text head uses the model's own logit scale and, for SigLIP-style models trained
with a sigmoid loss, its logit bias: the zero-shot logits are the model's (argmax as the model's).
Training runs cross-entropy over these logits; a bias shared by every class cancels in the
softmax, so it changes probabilities under a sigmoid only, never the loss or the argmax.

Which head (top-level ``classifier``): ``auto`` (the text head when the model has a text tower,
else prototypes), ``text`` or ``prototype`` (class-mean image prototypes for any model: no text
tower, tokenizer or hub file is touched).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .catalog import Classifier, Prototype, names


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


def head_kind(choice: str, has_text: bool) -> str:
    """``text`` or ``prototype``: what ``classifier=choice`` means for a model (``auto``: the text
    head when there is a text tower)."""
    if choice not in set(Classifier):
        raise ValueError(f"classifier={choice!r}; valid: {' | '.join(Classifier)}")
    if choice == "auto":
        return "text" if has_text else "prototype"
    if choice == "text" and not has_text:
        raise ValueError("classifier=text: the model has no text tower; use classifier=prototype (or auto)")
    return choice


def record_kind(choice: str, has_text: bool, prototype: str) -> str:
    """The ``classifier`` field of a result: ``text`` or ``prototype-<conventions.prototype>``."""
    return "text" if head_kind(choice, has_text) == "text" else f"prototype-{prototype}"


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
                      progress: bool = True, prototype: str = "mean", choice: str = "auto") -> "ClassifierHead":
    """The frozen head every method trains against: zero-shot text centroids (cached per
    model identity × class names × templates) with the model's logit scale and bias, or — for
    models without a text tower, or any model with ``choice='prototype'`` — the prototypes of
    the train split (``prototype``: ``mean`` | ``cosine``, see the module docstring);
    ``train_encoding()`` returns its cached :class:`~residual_exp.encode.Encoded` and is only
    called then."""
    if head_kind(choice, backbone.has_text) == "text":
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
    return ClassifierHead(weights.float(), backbone.logit_scale, bias=getattr(backbone, "logit_bias", 0.0))


def _save_weights(path: Path, t: torch.Tensor) -> None:
    from safetensors.torch import save_file
    save_file({"weight": t.contiguous()}, str(path))


def _load_weights(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(str(path))["weight"]


class ClassifierHead(nn.Module):
    """Frozen classifier ``scale · normalize(f) @ Wᵀ + bias``; ``W`` row-normalised unless
    ``normalize_weights=False`` (the official mean prototypes); ``bias``: a SigLIP model's logit
    bias (0 otherwise)."""

    def __init__(self, weights: torch.Tensor, scale: float, normalize_weights: bool = True, bias: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(weights, dim=-1) if normalize_weights else weights.clone())  # [C, D]
        self.scale = float(scale)
        self.normalize_weights = bool(normalize_weights)
        self.bias = float(bias)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features, dim=-1)                                  # [B, D]
        logits = self.scale * f @ self.weight.to(f.dtype).T                # [B, C]
        return logits + self.bias if self.bias else logits


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
