"""Spectral similarity of units across datasets and across models (tables and grids).

Builds on :func:`~residual_exp.spectral.unit_similarity` / :func:`~residual_exp.spectral.cross_similarity`
(normalised spectral cosine between EVR-pruned PCA bases; weights and variants per
``conventions``, see :func:`similarity_options`).

Across datasets (same model). Unit u's basis fitted on the reference set and on dataset X live
in the same space (the model's output space), so the spectral cosine of the two bases directly
says whether the unit spans the same principal directions, with the same spectrum, on X as on
the reference.  :func:`dataset_similarity` → a ``[layers, heads]`` grid per dataset.

Across models.  Units of *different* models live in different spaces: even when the output
dimensions agree (CLIP-B/16 from OpenAI vs OpenCLIP-B/16, both 512-d), coordinate i of one
model has nothing to do with coordinate i of the other, so the cosine between their principal
directions is not a similarity of anything.  Comparing directions would need an alignment of
the two spaces first (e.g. a map fitted on paired images), which this project does not do.
What *is* comparable is the pattern each model shows in its own space: per layer (relative
depth), how similar its heads stay between the reference and each dataset.  Two modes
(``cross_model``):

* ``profile`` (default): :func:`profile_correlation` correlates, between every two models, their
  per-(dataset, relative-depth) mean head similarity (Pearson r over the flattened profiles,
  after resampling both to a common number of depth bins when the depths differ);
* ``raw``: :func:`cross_model_grid` compares head directions across two models directly, only
  allowed when the output dims match, and only meaningful when the models share their output
  space (e.g. a model and a fine-tuned copy, or the same weights in two precisions); the
  caller is told so.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..spectral import PCABasis, cross_similarity, unit_similarity

__all__ = ["dataset_similarity", "grid_of", "unit_grid", "layer_profile", "profile_correlation",
           "cross_model_grid", "raw_cross_model", "similarity_rows", "summary_row"]


def grid_of(values: Sequence[float], layers: Sequence[int], heads: Sequence[int],
            num_layers: int, num_heads: int) -> np.ndarray:
    """Scatter per-head values into a ``[num_layers, num_heads]`` grid (NaN where no head)."""
    g = np.full((num_layers, num_heads), np.nan)
    for v, l, h in zip(values, layers, heads):
        g[int(l), int(h)] = float(v)
    return g


def unit_grid(values: Sequence[float], kinds: Sequence[str], layers: Sequence[int], heads: Sequence[int],
              num_layers: int, num_heads: int) -> np.ndarray:
    """Heads in a ``[L, H]`` grid (:func:`grid_of`) plus, when MLP units are among the values, a
    last column ``H`` holding each layer's MLP; NaN where there is no value."""
    sel = [(v, l, h) for v, k, l, h in zip(values, kinds, layers, heads) if k == "head"]
    g = grid_of([v for v, _, _ in sel], [l for _, l, _ in sel], [h for _, _, h in sel], num_layers, num_heads)
    mlps = [(v, l) for v, k, l in zip(values, kinds, layers) if k == "mlp"]
    if not mlps:
        return g
    col = grid_of([v for v, _ in mlps], [l for _, l in mlps], [0] * len(mlps), num_layers, 1)
    return np.concatenate([g, col], axis=1)


def summary_row(model: str, dataset: str, variant: str, names: Sequence[str], sims: Sequence[float]) -> dict:
    """Mean / min similarity over the units of one (model, dataset, variant), and the weakest unit."""
    sims = np.asarray(sims, dtype=float)
    empty = sims.size == 0
    return {"model": model, "dataset": dataset, "variant": variant,
            "mean": float("nan") if empty else float(sims.mean()),
            "min": float("nan") if empty else float(sims.min()),
            "min_unit": "" if empty else names[int(np.argmin(sims))]}


def similarity_options(cfg) -> dict:
    """Keyword arguments of the spectral cosine for a job's ``conventions`` and ``compat``."""
    from ..methods import prune_rule
    c = cfg.conventions
    return {"weighting": c.similarity_weights, "unweighted": c.similarity_unweighted,
            "prune_kwargs": prune_rule(c.evr_rule, cfg.compat)}


def dataset_similarity(ref, other, indices: Sequence[int], weighted: bool, evr: float | None,
                       **options) -> np.ndarray:
    """Spectral cosine of unit ``indices[i]`` between ``ref`` and ``other`` → ``[len(indices)]``
    (``options``: :func:`similarity_options`)."""
    idx = list(indices)
    return unit_similarity(ref.select(idx), other.select(idx), weighted=weighted, evr=evr, **options).cpu().numpy()


def similarity_rows(model: str, dataset: str, variant: str, names: Sequence[str], layers: Sequence[int],
                    heads: Sequence[int], values: Sequence[float]) -> list[dict]:
    return [{"model": model, "dataset": dataset, "variant": variant, "unit": n, "layer": int(l),
             "head": int(h), "similarity": float(v)} for n, l, h, v in zip(names, layers, heads, values)]


def layer_profile(grid: np.ndarray) -> np.ndarray:
    """Mean over heads of every layer of a ``[L, H]`` grid → ``[L]`` (NaN cells ignored)."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(grid), grid, np.nan), axis=1)


def _resample(profile: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of a per-layer profile onto ``n`` points of relative depth [0, 1]."""
    profile = np.asarray(profile, float)
    if len(profile) == n:
        return profile
    src = np.linspace(0.0, 1.0, len(profile))
    return np.interp(np.linspace(0.0, 1.0, n), src, profile)


def profile_correlation(profiles: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict]:
    """Pearson r between every two models' similarity profiles.

    ``profiles[model][dataset]`` is the ``[L_model]`` per-layer mean head similarity.  For each
    pair of models the profiles of the datasets both have are resampled to a common depth
    (the smaller L) and concatenated; r is computed over those values (NaN if < 3 values or
    no variance).  Rows: ``model_a, model_b, n_values, pearson_r, mean_abs_diff``.
    """
    models = list(profiles)
    rows = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            common = [d for d in profiles[a] if d in profiles[b]]
            va, vb = [], []
            for d in common:
                n = min(len(profiles[a][d]), len(profiles[b][d]))
                va.append(_resample(profiles[a][d], n))
                vb.append(_resample(profiles[b][d], n))
            x = np.concatenate(va) if va else np.zeros(0)
            y = np.concatenate(vb) if vb else np.zeros(0)
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            r = float("nan")
            if x.size >= 3 and x.std() > 0 and y.std() > 0:
                r = float(np.corrcoef(x, y)[0, 1])
            rows.append({"model_a": a, "model_b": b, "datasets": ",".join(common), "n_values": int(x.size),
                         "pearson_r": r, "mean_abs_diff": float(np.abs(x - y).mean()) if x.size else float("nan")})
    return rows


def cross_model_grid(basis_a: PCABasis, idx_a: Sequence[int], basis_b: PCABasis, idx_b: Sequence[int],
                     weighted: bool, evr: float | None, **options) -> np.ndarray:
    """``[len(idx_a), len(idx_b)]`` spectral cosine between units of two models (``raw`` mode).

    Raises ``ValueError`` when the output dims differ: there is no common space to compare in.
    """
    if basis_a.dim != basis_b.dim:
        raise ValueError(f"output dims differ ({basis_a.dim} vs {basis_b.dim}): units of the two models "
                         "live in different spaces; use cross_model=profile")
    out = cross_similarity(basis_a.select(list(idx_a)), basis_b.select(list(idx_b)).to(
        device=basis_a.mean.device), weighted=weighted, evr=evr, **options)
    return out.cpu().numpy() if torch.is_tensor(out) else np.asarray(out)


def raw_cross_model(head_bases: Mapping[str, tuple[PCABasis, object]], **options) -> tuple[list[dict], dict[str, np.ndarray]]:
    """``cross_model=raw`` for every two models: ``(rows, grids)``.  ``head_bases[label]`` is
    ``(basis of the model's heads, its UnitLayout)``.  Rows name, per head of model a, the most
    similar head of model b (and the similarity to the head of the same name); models with other
    output dims are reported as not comparable.  ``grids["a × b"]`` is the ``[H_a, H_b]`` grid."""
    labels = list(head_bases)
    rows, grids = [], {}
    for i, la in enumerate(labels):
        for lb in labels[i + 1:]:
            (ba, lay_a), (bb, lay_b) = head_bases[la], head_bases[lb]
            if ba.dim != bb.dim:
                rows.append({"model_a": la, "model_b": lb, "note": f"output dims differ ({ba.dim} vs {bb.dim}): "
                             "different spaces, not compared"})
                continue
            grid = cross_model_grid(ba, range(ba.num_units), bb, range(bb.num_units), True, None, **options)
            grids[f"{la} × {lb}"] = grid
            names_a = [n for n, k in zip(lay_a.names, lay_a.kinds) if k == "head"]
            names_b = [n for n, k in zip(lay_b.names, lay_b.kinds) if k == "head"]
            for r, na in enumerate(names_a):
                j = int(np.argmax(grid[r]))
                same = names_b.index(na) if na in names_b else None
                rows.append({"model_a": la, "model_b": lb, "unit_a": na, "best_unit_b": names_b[j],
                             "best": float(grid[r, j]), "same_name": float(grid[r, same]) if same is not None else None})
    return rows, grids
