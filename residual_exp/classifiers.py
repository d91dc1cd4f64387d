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

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .catalog import Classifier, Prototype, names
from .data.errors import DatasetError

log = logging.getLogger(__name__)


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
    called then.  Classes the head cannot tell apart are refused first (:func:`check_class_vectors`)."""
    if head_kind(choice, backbone.has_text) == "text":
        check_distinct_prompts(backbone, classnames, templates)        # before any text is encoded
        spec = {"model": model_id, "classnames": list(classnames), "templates": list(templates)}
        build = lambda tmp: _save_weights(tmp, zero_shot_weights(backbone, classnames, templates, device,
                                                                 progress=progress).cpu())
        weights = cache.get_or_build("classifiers", spec, build, _load_weights, suffix=".safetensors")
        check_class_vectors(weights, classnames, prompt_reason(backbone, classnames, templates))   # built or cached
    else:
        import numpy as np
        if prototype not in PROTOTYPES:
            raise ValueError(f"conventions.prototype={prototype!r}; valid: {', '.join(PROTOTYPES)}")
        enc = train_encoding()
        feats = torch.from_numpy(np.asarray(enc.features, dtype=np.float64))
        labels = torch.from_numpy(np.asarray(enc.labels))
        if prototype == "mean":
            means = check_class_vectors(class_means(feats, labels, len(classnames)), classnames, _PROTOTYPE_REASON)
            return ClassifierHead(means.float(), 1.0, normalize_weights=False)
        weights = check_class_vectors(prototype_weights(feats.float(), labels, len(classnames)), classnames,
                                      _PROTOTYPE_REASON)
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


# --- classes the frozen head cannot tell apart ------------------------------------------------------------
# A head whose class vectors coincide gives the same logit to those classes for every image: every method
# then reports the first class's share and λ cannot learn (the loss stays at ln C).  Refused before training
# at DEGENERATE_COSINE, warned about at NEAR_DUPLICATE_COSINE (README: "Classes the model cannot tell apart").
DEGENERATE_COSINE = 0.9999
NEAR_DUPLICATE_COSINE = 0.999
CLASSNAMES_HINT = ("give the classes names the model can read: rename the class folders, or pass "
                   "dataset.params.classnames=[…] (one name per class, in the order of the sorted folder names)")
_PROTOTYPE_REASON = ("their train images have the same mean feature (are the class folders copies of each "
                     "other?); check that each class holds its own images")


class IndistinguishableClassesError(DatasetError):
    """Two or more classes have identical (or nearly identical) class vectors in the frozen head."""

    def __init__(self, message: str, groups: Sequence[Sequence[str]] = ()):
        super().__init__(message)
        self.groups = [list(g) for g in groups]

    def __reduce__(self):
        return (type(self), (str(self), self.groups))


def _groups(sim: torch.Tensor, threshold: float) -> list[list[int]]:
    """Classes joined by ``sim ≥ threshold`` (connected components, each sorted; singletons dropped)."""
    n = sim.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in torch.nonzero(torch.triu(sim >= threshold, diagonal=1)).tolist():
        parent[find(i)] = find(j)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted((c for c in comps.values() if len(c) > 1), key=lambda c: c[0])


def _describe_groups(groups: list[list[int]], classnames: Sequence[str], limit: int = 3) -> str:
    def one(g):
        names = ", ".join(repr(classnames[i]) for i in g[:6]) + (f", … ({len(g)} in all)" if len(g) > 6 else "")
        return f"[{names}]"
    more = f" and {len(groups) - limit} more group(s)" if len(groups) > limit else ""
    return "; ".join(one(g) for g in groups[:limit]) + more


def check_class_vectors(weight: torch.Tensor, classnames: Sequence[str],
                        reason: Callable[[list[list[int]]], str] | str = "") -> torch.Tensor:
    """Refuse (:class:`IndistinguishableClassesError`) a head ``[C, D]`` in which classes have class
    vectors with cosine ≥ :data:`DEGENERATE_COSINE`; warn about pairs ≥ :data:`NEAR_DUPLICATE_COSINE`.
    ``reason(groups)`` (or a string) says why they coincide.  Returns ``weight`` unchanged."""
    w = F.normalize(weight.detach().double(), dim=-1)
    sim = w @ w.T                                                          # [C, C]
    groups = _groups(sim, DEGENERATE_COSINE)
    if groups:
        why = reason(groups) if callable(reason) else reason
        raise _indistinguishable(groups, classnames, f"have identical class vectors (cosine ≥ {DEGENERATE_COSINE}), "
                                                     f"so every method would score them alike{': ' + why if why else ''}")
    near = torch.nonzero(torch.triu(sim >= NEAR_DUPLICATE_COSINE, diagonal=1)).tolist()
    if near:
        pairs = ", ".join(f"{classnames[i]!r}~{classnames[j]!r} ({float(sim[i, j]):.5f})" for i, j in near[:5])
        log.warning("the frozen classifier barely separates %d class pair(s) (cosine ≥ %s): %s%s; accuracy on them "
                    "will be near chance (%s)", len(near), NEAR_DUPLICATE_COSINE, pairs,
                    f", … ({len(near)} in all)" if len(near) > 5 else "", CLASSNAMES_HINT)
    return weight


def _token_rows(tokens) -> list[tuple[int, ...]]:
    """Each prompt's token ids (padding dropped), from a tensor or a ``{input_ids, attention_mask}`` batch."""
    if torch.is_tensor(tokens):
        return [tuple(int(t) for t in row if int(t) != 0) for row in tokens]
    ids, mask = tokens["input_ids"], tokens.get("attention_mask")
    return [tuple(int(t) for t, m in zip(row, mrow if mask is not None else [1] * len(row)) if m)
            for row, mrow in zip(ids, mask if mask is not None else ids)]


def check_distinct_prompts(backbone, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Before any text is encoded: refuse classes whose prompts are the same text, or tokenize to the same
    ids under every template (the tiny CLIP's word-level tokenizer reads unknown words as one token)."""
    texts = {c: tuple(t.format(c) for t in templates) for c in classnames}
    groups = _equal_groups([texts[c] for c in classnames])
    if not groups:
        try:                     # the first template for every class; all templates for classes that collide
            first = _token_rows(backbone.tokenize([templates[0].format(c) for c in classnames]))
            suspects = sorted(i for g in _equal_groups(first) for i in g)
            rows = {}
            if suspects and len(templates) > 1:
                T = len(templates)
                flat = _token_rows(backbone.tokenize([t.format(classnames[i]) for i in suspects for t in templates]))
                rows = {i: tuple(flat[k * T:(k + 1) * T]) for k, i in enumerate(suspects)}
        except Exception as e:   # a tokenizer that cannot load here: the class vectors are checked after
            log.debug("prompt check skipped: %s", e)
            return
        keyed = [rows.get(i, (first[i],)) if i in set(suspects) else ("distinct", i) for i in range(len(classnames))]
        groups = _equal_groups(keyed)
    if groups:
        raise _indistinguishable(groups, classnames,
                                 f"get the same prompts: {prompt_reason(backbone, classnames, templates)(groups)}")


def _indistinguishable(groups: list[list[int]], classnames: Sequence[str], what: str) -> IndistinguishableClassesError:
    n = sum(len(g) for g in groups)
    return IndistinguishableClassesError(
        f"the frozen classifier cannot tell {n} of its {len(classnames)} classes apart: "
        f"{_describe_groups(groups, classnames)} {what}", [[classnames[i] for i in g] for g in groups])


def _equal_groups(keys: list) -> list[list[int]]:
    by: dict = {}
    for i, k in enumerate(keys):
        by.setdefault(k, []).append(i)
    return sorted((g for g in by.values() if len(g) > 1), key=lambda g: g[0])


def prompt_reason(backbone, classnames: Sequence[str], templates: Sequence[str]):
    """``groups -> why`` the prompts of those classes coincide, and what to do about it."""
    def reason(groups: list[list[int]]) -> str:
        names = [classnames[i] for g in groups for i in g]
        same_text = [g for g in groups if len({classnames[i] for i in g}) == 1 or
                     len({templates[0].format(classnames[i]) for i in g}) == 1]
        tok = getattr(backbone, "_tokenizer", None)
        unknown_words = getattr(tok, "unknown_words", None)
        if same_text:
            return (f"their names give the same prompt text (e.g. {templates[0].format(classnames[same_text[0][0]])!r}); "
                    f"{CLASSNAMES_HINT}")
        if callable(unknown_words):
            unknown = sorted(unknown_words(names))
            if unknown:
                vocab = getattr(tok, "vocab", [])
                return (f"{backbone.name}'s word-level tokenizer does not know the words "
                        f"{', '.join(repr(w) for w in unknown[:12])}{' …' if len(unknown) > 12 else ''} and reads each "
                        f"as the same unknown token (it knows the {len(vocab)} words of its synthetic captions, e.g. "
                        f"{', '.join([w for w in vocab if len(w) > 3][:8])}); {CLASSNAMES_HINT}, "
                        "or use a model with a full tokenizer (e.g. model=clip_b)")
        return (f"{backbone.name}'s text tower maps their prompts to the same vector (same token ids, or a tokenizer "
                f"that drops what tells them apart); {CLASSNAMES_HINT}")
    return reason
