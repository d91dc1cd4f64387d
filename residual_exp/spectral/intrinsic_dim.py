"""Intrinsic dimension of unit representations: linear (PCA) and non-linear (TwoNN).

The ResiDual paper compares, per head, the number of principal components needed for 99%
of the variance (a *linear* dimension) with the TwoNN estimate (Facco et al. 2017,
"Estimating the intrinsic dimension of datasets by a minimal neighborhood information",
Sci. Rep. 7:12140) of the *non-linear* manifold dimension.

TwoNN. For every point i let r1_i ≤ r2_i be the distances to its first and second nearest
neighbours and μ_i = r2_i / r1_i. On a d-dimensional manifold with locally uniform density
μ is Pareto distributed, F(μ) = 1 − μ^{−d}, so ``−log(1 − F(μ)) = d · log μ``. With μ sorted
increasingly, N points, and the largest ``discard_fraction`` of the μ's dropped (they come
from low-density regions and bias the fit), keep n = ⌊N (1 − discard_fraction)⌋ points and
fit the line through the origin::

    x_i = log μ_(i),  y_i = −log(1 − i / N),  i = 1..n
    d̂  = Σ x_i y_i / Σ x_i²

This is exactly ``skdim.id.TwoNN(discard_fraction).fit(X).dimension_`` (including the
empirical CDF i/N with the full N). With ``discard_fraction = 0`` the last point, where
1 − F = 0, is dropped (skdim would return inf/NaN there).
"""

from __future__ import annotations

import math

import torch

from ..catalog import Estimator
from .pca import num_components_for_evr

__all__ = ["linear_dimension", "linear_dimensions", "two_nn_distances", "twonn"]


# --------------------------------------------------------------------------- linear dimension
def _ratios(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``[U, K]`` (any order) -> explained-variance ratios sorted decreasingly."""
    lam = eigenvalues.to(torch.float64).clamp_min(0.0).sort(dim=-1, descending=True).values  # [U, K]
    total = lam.sum(dim=-1, keepdim=True)  # [U, 1]
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, lam / safe, torch.zeros_like(lam))  # [U, K]


def linear_dimensions(eigenvalues: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """Per unit, the number of principal components explaining ≥ ``threshold`` of the variance.

    ``eigenvalues``: ``[U, K]`` covariance eigenvalues (any order, negatives from round-off
    are clipped to 0). Returns LongTensor ``[U]``: the smallest k with
    ``Σ_{i≤k} λ↓_i / Σ_i λ_i ≥ threshold``; 0 for a zero-variance unit (the rule of
    :func:`~residual_exp.spectral.pca.num_components_for_evr`).
    """
    if eigenvalues.ndim != 2:
        raise ValueError(f"eigenvalues must be [U, K], got shape {tuple(eigenvalues.shape)}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return num_components_for_evr(_ratios(eigenvalues), threshold)


def linear_dimension(eigenvalues: torch.Tensor, threshold: float = 0.99) -> int:
    """Number of principal components for ``threshold`` of the variance of one unit (``[K]``)."""
    eigenvalues = torch.as_tensor(eigenvalues)
    if eigenvalues.ndim != 1:
        raise ValueError(f"eigenvalues must be [K], got shape {tuple(eigenvalues.shape)}; "
                         "use linear_dimensions for [U, K]")
    return int(linear_dimensions(eigenvalues[None], threshold)[0])


# --------------------------------------------------------------------------- TwoNN
@torch.no_grad()
def two_nn_distances(
    x: torch.Tensor, chunk_size: int | None = None, candidates: int = 8
) -> torch.Tensor:
    """Distances to the first and second nearest neighbour of every point, ``[N, D] -> [N, 2]``.

    Never materialises the N×N matrix: query rows are processed ``chunk_size`` at a time
    against all points with ``‖q‖² + ‖x‖² − 2 q·x`` in float64 (data centred first to limit
    cancellation), keeping the ``candidates`` smallest per row with ``topk``; the distances
    to those candidates are then recomputed exactly as ‖q − x_j‖, so round-off in the
    expansion can only matter if it reorders the 2nd and the (candidates+1)-th neighbour.
    A point is never its own neighbour (by index); duplicates of it are, at distance 0.

    Memory: O(chunk_size · N) float64; the default chunk keeps that at 256 MiB
    (N = 50k, D = 768: 671 rows per chunk, ≈ 0.6 GiB peak with the data itself).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    num = x.shape[0]
    if num < 3:
        raise ValueError(f"need at least 3 points, got N={num}")
    if chunk_size is None:
        chunk_size = max(1, min(num, (1 << 25) // num))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if candidates < 2:
        raise ValueError(f"candidates must be ≥ 2, got {candidates}")
    pts = x.to(torch.float64)
    pts = pts - pts.mean(dim=0)  # [N, D]
    sq = (pts * pts).sum(dim=1)  # [N]
    m = min(candidates, num - 1)
    out = torch.empty(num, 2, dtype=torch.float64, device=pts.device)  # [N, 2]
    for start in range(0, num, chunk_size):
        stop = min(start + chunk_size, num)
        q = pts[start:stop]  # [C, D]
        rows = torch.arange(stop - start, device=pts.device)  # [C]
        d2 = torch.addmm(sq[None, :], q, pts.T, alpha=-2.0)  # [C, N] = ‖x‖² − 2 q·x
        d2 += sq[start:stop, None]  # [C, N]
        d2[rows, start + rows] = float("inf")  # exclude self
        cand = d2.topk(m, dim=1, largest=False).indices  # [C, m]
        exact = (q[:, None, :] - pts[cand]).norm(dim=-1)  # [C, m]
        out[start:stop] = exact.sort(dim=1).values[:, :2]  # [C, 2]
    return out


@torch.no_grad()
def twonn(
    x: torch.Tensor,
    discard_fraction: float = 0.1,
    chunk_size: int | None = None,
    method: str = "linear",
    drop_duplicates: bool = True,
) -> float:
    """TwoNN intrinsic dimension of the points ``x`` ``[N, D]`` (formula in the module docstring).

    Args:
        x: ``[N, D]`` points (any float dtype; distances are computed in float64).
        discard_fraction: fraction in [0, 1) of the largest μ = r2/r1 left out of the fit.
        chunk_size: query rows per distance chunk (see :func:`two_nn_distances`).
        method: ``"linear"`` (regression through the origin, Facco et al.) or ``"mle"``
            (skdim's closed form ``(n − 1) / (Σ_{i≤n} log μ_(i) + (N − n) log μ_(n))``).
        drop_duplicates: exact duplicate rows are removed first (``torch.unique``), so the
            estimate is that of the *set* of points and r1 > 0 for every point. With False,
            points whose nearest neighbour is at distance 0 are skipped instead (skdim's
            behaviour); either way no inf/NaN reaches the fit.

    Returns:
        The estimated dimension (float).
    """
    if not 0.0 <= float(discard_fraction) < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    if method not in set(Estimator):
        raise ValueError(f"method must be {' or '.join(Estimator)}, got {method!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    pts = x.to(torch.float64)
    if not bool(torch.isfinite(pts).all()):
        raise ValueError("x contains NaN or inf values")
    if drop_duplicates:
        pts = torch.unique(pts, dim=0)  # [N', D]
    dist = two_nn_distances(pts, chunk_size=chunk_size)  # [N, 2]
    r1, r2 = dist[:, 0], dist[:, 1]
    keep = r1 > 0  # zero distance to the 1st neighbour: duplicate point, μ undefined
    mu = (r2[keep] / r1[keep]).sort().values  # [N] increasing, ≥ 1
    total = mu.numel()
    n_keep = min(int(total * (1.0 - float(discard_fraction))), total - 1)
    if n_keep < 2:
        raise ValueError(f"only {n_keep} usable points after discarding; need ≥ 2")
    log_mu = mu[:n_keep].log()  # [n]
    if method == "mle":
        denom = log_mu.sum() + (total - n_keep) * log_mu[-1]
        if float(denom) <= 0:
            raise ValueError("degenerate data: every kept μ = r2/r1 equals 1")
        return float((n_keep - 1) / denom)
    f_emp = torch.arange(1, n_keep + 1, dtype=torch.float64, device=mu.device) / total  # [n]
    y = -torch.log1p(-f_emp)  # [n]  −log(1 − F)
    sxx = float((log_mu * log_mu).sum())
    if sxx <= 0:
        raise ValueError("degenerate data: every kept μ = r2/r1 equals 1")
    d = float((log_mu * y).sum()) / sxx
    assert math.isfinite(d), d
    return d
