"""Per-unit intrinsic dimension (the paper's "low-dimensional heads" analysis).

For every selected unit u of a model, from its outputs ``x_u`` over N images (``[N, D]``):

* ``linear_dim``  the number of principal components explaining ``threshold`` (99%) of the
  variance (:func:`~residual_exp.spectral.linear_dimensions` on the exact PCA eigenvalues of
  :class:`~residual_exp.spectral.StreamingPCA`);
* ``twonn``       the TwoNN estimate (:func:`~residual_exp.spectral.twonn`: chunked distances,
  duplicates dropped first, the top ``discard_fraction`` of μ = r2/r1 discarded);
* ``ratio``       linear_dim / twonn (how much larger the linear span is than the manifold).

Units that have no spread (constant ``embed``/bias units, or fewer than 3 distinct points)
get NaN TwoNN/ratio and a ``note``.  :func:`layer_profiles` averages over the heads of each
layer (the profile across depth the paper plots).  Pure library: arrays in, rows out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..spectral import StreamingPCA, linear_dimensions, twonn

__all__ = ["unit_dimensions", "layer_profiles"]


def _unit_points(units, u: int) -> torch.Tensor:
    """``[N, D]`` float64 points of unit ``u`` from ``units`` ``[N, U, D]`` (array, memmap or tensor)."""
    x = units[:, u]
    x = x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
    return x.to(torch.float64)


def unit_dimensions(units, names: Sequence[str], indices: Sequence[int] | None = None,
                    kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None, threshold: float = 0.99,
                    discard_fraction: float = 0.1, estimator: str = "linear",
                    chunk_size: int | None = None, progress: bool = False,
                    desc: str = "intrinsic dimension") -> list[dict]:
    """One row per unit in ``indices`` (default: all): linear dim, TwoNN, ratio.

    Args:
        units: ``[N, U, D]`` unit outputs (numpy array/memmap or tensor).
        names, kinds, layers, heads: per-unit labels of all U units (a ``UnitLayout``'s fields);
            ``kinds``/``layers``/``heads`` are optional and copied into the rows.
        threshold: explained-variance target of the linear dimension.
        discard_fraction, estimator, chunk_size: passed to :func:`~residual_exp.spectral.twonn`.
    """
    n, num_units, dim = units.shape
    if len(names) != num_units:
        raise ValueError(f"{len(names)} names for {num_units} units")
    indices = list(range(num_units)) if indices is None else list(indices)
    rows = []
    for u in tqdm(indices, desc=desc, disable=not progress, leave=False):
        x = _unit_points(units, u)                                          # [N, D]
        pca = StreamingPCA(1, dim)
        pca.update(x[:, None])                                              # [N, 1, D]
        eig = pca.finalize().eigenvalues                                    # [1, D]
        lin = int(linear_dimensions(eig, threshold)[0])
        unique = int(torch.unique(x, dim=0).shape[0])
        note, est = "", float("nan")
        if unique < 3 or lin == 0:
            note = "constant unit" if unique == 1 else f"only {unique} distinct points"
        else:
            try:
                est = twonn(x, discard_fraction=discard_fraction, chunk_size=chunk_size, method=estimator)
            except ValueError as e:                                         # degenerate point set
                note = str(e)
        row = {"unit": names[u], "kind": kinds[u] if kinds else "", "layer": layers[u] if layers else -1,
               "head": heads[u] if heads else -1, "n_samples": n, "n_distinct": unique,
               "linear_dim": lin, "twonn": est,
               "ratio": lin / est if est and math.isfinite(est) and est > 0 else float("nan"),
               "note": note}
        rows.append(row)
    return rows


def layer_profiles(rows: Sequence[dict], kind: str = "head") -> list[dict]:
    """Mean/std over the units of ``kind`` of every layer: ``linear``, ``twonn``, ``ratio``.

    Returns one row per layer with ``layer``, ``num_layers`` (the model's depth, from the
    largest layer index seen in ``rows``), ``n_units`` and ``<key>_mean`` / ``<key>_std``
    (NaN values are ignored; a layer whose values are all NaN gets NaN).
    """
    depth = max((int(r["layer"]) for r in rows), default=-1) + 1
    out = []
    for layer in range(depth):
        sel = [r for r in rows if int(r["layer"]) == layer and r["kind"] == kind]
        if not sel:
            continue
        row = {"layer": layer, "num_layers": depth, "n_units": len(sel)}
        for key, col in (("linear", "linear_dim"), ("twonn", "twonn"), ("ratio", "ratio")):
            v = np.array([float(r[col]) for r in sel], float)
            v = v[np.isfinite(v)]
            row[f"{key}_mean"] = float(v.mean()) if v.size else float("nan")
            row[f"{key}_std"] = float(v.std()) if v.size else float("nan")
        out.append(row)
    return out
