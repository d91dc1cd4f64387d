"""Coarse head selection: score heads, keep the top k, ablate the rest, evaluate.

Scores (higher = keep first), computed on a scoring split (val):

``zero_shot``          the head's own accuracy: its unit output x_u alone goes through the
                       frozen classifier (``scale · normalize(x_u) @ Wᵀ``);
``text_alignment``     normalised spectral cosine (sqrt-eigenvalue weighted, EVR-pruned)
                       between the head's PCA basis on the scoring split and the PCA basis of
                       the classifier's class embeddings (the text centroids for CLIP-like
                       models): does the head vary along the directions that separate classes?
``output_correlation`` mean over images of cos(x_u − x̄_u, f − f̄): how much the head's
                       variation follows the model's output;
``random``             a random permutation per seed (the baseline; mean ± std over seeds).

Ablation of the heads not kept (``kept`` = the first k of the order):

    feature_k = Σ_{u ∈ kept} x_u + Σ_{u ∉ kept} a_u + [Σ_{non-head units} x_v  if others == "add"]
    a_u = 0 (``zero``) or µ_u, the unit's mean on the reference set (``mean``)

With ``others == "drop"`` (as ``residual_coarse``) and k = all heads, feature_k is the sum of
the heads, so the accuracy is the "heads only" accuracy; with ``others == "add"`` it is the
model's own output (Σ units = feature).  Pure library: arrays and callables in, numbers out.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..catalog import COARSE_OTHERS, Ablation, Score, names
from ..classifiers import top1_accuracy
from ..spectral import PCABasis, StreamingPCA, unit_similarity

__all__ = ["keep_counts", "head_zero_shot", "text_alignment", "output_correlation", "order_of",
           "random_orders", "ablated_feature", "selection_curve", "SCORES", "head_basis", "head_scores",
           "score_rows", "selection_table", "pivot"]


def _t(x) -> torch.Tensor:
    return (x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))).float()


def keep_counts(num_heads: int, top: Sequence[int] = (1,),
                fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)) -> list[tuple[int, str]]:
    """Distinct numbers of heads to keep, increasing, each with the labels asking for it.

    ``top``: absolute counts (``top1``); ``fractions``: of ``num_heads``, rounded, at least 1
    (so "1%" of 16 heads is 1 head, the same as ``top1``: the label becomes ``top1/1%``).
    """
    if num_heads < 1:
        raise ValueError("no heads to select from")
    wanted: dict[int, list[str]] = {}
    for t in top:
        if t < 1:
            raise ValueError(f"keep_top entries must be ≥ 1, got {t}")
        wanted.setdefault(min(int(t), num_heads), []).append(f"top{int(t)}")
    for f in fractions:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"keep_fractions entries must be in (0, 1], got {f}")
        k = min(num_heads, max(1, int(math.floor(float(f) * num_heads + 0.5))))
        wanted.setdefault(k, []).append(f"{float(f) * 100:g}%")
    return [(k, "/".join(wanted[k])) for k in sorted(wanted)]


@torch.no_grad()
def head_zero_shot(units, labels, head_idx: Sequence[int], classifier: Callable,
                   progress: bool = False) -> np.ndarray:
    """``[H]``: accuracy of each head's output alone through the frozen classifier."""
    return np.array([top1_accuracy(classifier, _t(units[:, u]), labels)
                     for u in tqdm(head_idx, desc="head zero-shot", disable=not progress, leave=False)])


@torch.no_grad()
def text_alignment(head_basis: PCABasis, class_weights: torch.Tensor, weighted: bool = True,
                   evr: float | None = 0.9, **options) -> np.ndarray:
    """``[H]``: spectral cosine between each head's basis and the class-embedding basis.

    ``head_basis`` holds the H heads' PCA bases; ``class_weights`` ``[C, D]`` are the
    classifier rows (C ≥ 2), whose centred PCA (rank ≤ C − 1) is the "text" basis.
    """
    w = F.normalize(class_weights.double(), dim=-1)                       # [C, D]
    if w.shape[0] < 2:
        raise ValueError("text_alignment needs at least 2 classes")
    pca = StreamingPCA(1, w.shape[1])
    pca.update(w[:, None])                                                # [C, 1, D]
    text = pca.finalize()
    text = (text.prune(k=w.shape[0] - 1) if evr is None else text.prune(evr=evr)).compact()   # [1, ≤C−1, D]
    text = text.select([0] * head_basis.num_units)                        # the same basis H times
    return unit_similarity(head_basis, text.to(dtype=head_basis.components.dtype), weighted=weighted,
                           evr=evr, **options).cpu().numpy()


@torch.no_grad()
def output_correlation(units, features, head_idx: Sequence[int], progress: bool = False) -> np.ndarray:
    """``[H]``: mean over images of cos(x_u − mean(x_u), f − mean(f))."""
    f = _t(features)
    f = F.normalize(f - f.mean(0), dim=-1)                                # [N, D]
    out = []
    for u in tqdm(head_idx, desc="output correlation", disable=not progress, leave=False):
        x = _t(units[:, u])
        x = F.normalize(x - x.mean(0), dim=-1)                            # [N, D]
        out.append(float((x * f).sum(-1).mean()))
    return np.array(out)


def order_of(scores: Sequence[float]) -> np.ndarray:
    """Positions into the head list, best score first (ties: lower position first; NaN last)."""
    s = np.asarray(scores, float)
    s = np.where(np.isfinite(s), s, -np.inf)
    return np.argsort(-s, kind="stable")


def random_orders(num_heads: int, seeds: Sequence[int]) -> dict[int, np.ndarray]:
    return {int(s): np.random.default_rng(int(s)).permutation(num_heads) for s in seeds}


@torch.no_grad()
def ablated_feature(units, head_idx: Sequence[int], kept: Sequence[int], ablation: str = "zero",
                    means: torch.Tensor | None = None, others_idx: Sequence[int] = (),
                    others: str = "drop") -> torch.Tensor:
    """``[N, D]`` feature with the heads ``kept`` (positions into ``head_idx``) and the rest ablated.

    The reference implementation of the formula in the module docstring (one k at a time);
    :func:`selection_curve` computes the same incrementally for many k.
    """
    if ablation not in set(Ablation):
        raise ValueError(f"ablation must be {' or '.join(Ablation)}, got {ablation!r}")
    if others not in COARSE_OTHERS:
        raise ValueError(f"others must be {' or '.join(COARSE_OTHERS)}, got {others!r}")
    kept_set = {int(p) for p in kept}
    n, _, d = units.shape
    out = torch.zeros(n, d)
    for p, u in enumerate(head_idx):
        if p in kept_set:
            out += _t(units[:, u])
        elif ablation == "mean":
            if means is None:
                raise ValueError("mean ablation needs the reference means")
            out += means[u].float()
    if others == "add":
        for v in others_idx:
            out += _t(units[:, v])
    return out


@torch.no_grad()
def selection_curve(units, labels, classifier: Callable, head_idx: Sequence[int], order: Sequence[int],
                    ks: Sequence[int], ablation: str = "zero", means: torch.Tensor | None = None,
                    others_idx: Sequence[int] = (), others: str = "drop") -> np.ndarray:
    """Accuracy for every k in ``ks`` when keeping the first k heads of ``order`` → ``[len(ks)]``.

    Equal to ``top1_accuracy(classifier, ablated_feature(units, head_idx, order[:k], …))`` for each
    k, computed with one running sum over the order.
    """
    if ablation not in set(Ablation):
        raise ValueError(f"ablation must be {' or '.join(Ablation)}, got {ablation!r}")
    if ablation == Ablation.mean and means is None:
        raise ValueError("mean ablation needs the reference means")
    n, _, d = units.shape
    heads = [head_idx[int(p)] for p in order]
    base = torch.zeros(n, d)
    if others == "add":
        for v in others_idx:
            base += _t(units[:, v])
    elif others != "drop":
        raise ValueError(f"others must be drop or add, got {others!r}")
    if ablation == "mean":                              # every head starts at its mean …
        base += torch.stack([means[u].float() for u in head_idx]).sum(0)
    wanted = {int(k) for k in ks}
    acc: dict[int, float] = {}
    run = base.clone()
    for i, u in enumerate(heads, start=1):
        run += _t(units[:, u])                          # … and a kept head replaces its mean
        if ablation == "mean":
            run -= means[u].float()
        if i in wanted:
            acc[i] = top1_accuracy(classifier, run, labels)
    if 0 in wanted:
        acc[0] = top1_accuracy(classifier, base, labels)
    return np.array([acc[int(k)] for k in ks])


SCORES = names(Score)


def head_basis(units, head_idx: Sequence[int], chunk: int = 1024) -> PCABasis:
    """Per-head PCA of ``units[:, head_idx]`` (streamed in chunks of rows)."""
    pca = StreamingPCA(len(head_idx), units.shape[2])
    for i in range(0, len(units), chunk):
        pca.update(_t(np.asarray(units[i:i + chunk][:, list(head_idx)])))      # [b, H, D]
    return pca.finalize()


def head_scores(which: Sequence[str], units, features, labels, head_idx: Sequence[int], classifier,
                evr: float | None = 0.9, progress: bool = False, **options) -> dict[str, np.ndarray]:
    """``{score: [H]}`` for the requested scores (see the module docstring), in ``SCORES`` order."""
    bad = [s for s in which if s not in SCORES]
    if bad:
        raise ValueError(f"analysis.scores: unknown {bad}; valid: {', '.join(SCORES)} (random: analysis.random_seeds)")
    out: dict[str, np.ndarray] = {}
    if "zero_shot" in which:
        out["zero_shot"] = head_zero_shot(units, labels, head_idx, classifier, progress)
    if "text_alignment" in which:
        out["text_alignment"] = text_alignment(head_basis(units, head_idx), classifier.weight, True, evr, **options)
    if "output_correlation" in which:
        out["output_correlation"] = output_correlation(units, features, head_idx, progress)
    return out


def score_rows(model: str, names: Sequence[str], layers: Sequence[int], heads: Sequence[int],
               scores: dict[str, np.ndarray], orders: dict[str, np.ndarray]) -> list[dict]:
    """One row per head: its layer/head, every score and the head's rank under it (1 = best)."""
    rows = []
    for p, n in enumerate(names):
        r = {"model": model, "unit": n, "layer": layers[p], "head": heads[p]}
        for s, v in scores.items():
            r[s] = float(v[p])
            r[f"{s}_rank"] = int(np.where(orders[s] == p)[0][0]) + 1
        rows.append(r)
    return rows


def selection_table(model: str, names: Sequence[str], units, labels, classifier, head_idx: Sequence[int],
                    orders: dict[str, np.ndarray], randoms: dict[int, np.ndarray], ks_labels, ablations,
                    means, others_idx: Sequence[int], others: str):
    """``(rows, curves)`` of keeping the top-k heads of every order (score orders and random ones)
    under every ablation: one row per (ablation, order, k); ``curves[ablation][score]`` is
    ``[1 or #seeds, len(ks)]``."""
    ks = [k for k, _ in ks_labels]
    lab = dict(ks_labels)
    rows, curves = [], {}
    for abl in ablations:
        curves[abl] = {}
        todo = [(s, None, o) for s, o in orders.items()] + [("random", seed, o) for seed, o in randoms.items()]
        rand_acc = []
        for s, seed, order in todo:
            acc = selection_curve(units, labels, classifier, head_idx, order, ks, abl, means, others_idx, others)
            if s == "random":
                rand_acc.append(acc)
            else:
                curves[abl][s] = acc[None]
            for k, v in zip(ks, acc):
                rows.append({"model": model, "ablation": abl, "others": others, "score": s,
                             "seed": seed if seed is not None else "", "k": k, "keep": lab[k],
                             "n_ablated": len(head_idx) - k, "accuracy": float(v),
                             "kept": " ".join(names[int(p)] for p in order[:k])})
        if rand_acc:
            curves[abl]["random"] = np.stack(rand_acc)
    return rows, curves


def pivot(rows: Sequence[dict]) -> list[dict]:
    """Accuracy vs heads kept, one row per (model, ablation, k), one column per score
    (random: ``mean±std`` over its seeds)."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["ablation"], r["k"], r["keep"]), {}).setdefault(r["score"], []).append(r["accuracy"])
    return [{"model": m, "ablation": ab, "k": k, "keep": kp,
             **{s: (f"{np.mean(v):.3f}±{np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}") for s, v in d.items()}}
            for (m, ab, k, kp), d in cells.items()]
