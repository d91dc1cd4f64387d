"""Normalised spectral cosine similarity between the PCA bases of residual units.

Definition (the official ResiDual code's ``normalized_spectral_cosine``, github.com/Flegyas/ResiDual,
``residual/decomposition/unit_distance.py``, re-derived). Given two bases with orthonormal
rows Φ ∈ R^{K1×D}, Ψ ∈ R^{K2×D} and non-negative weights w ∈ R^{K1}, v ∈ R^{K2}::

    C_ij  = w_i · v_j · |⟨Φ_i, Ψ_j⟩|                       weighted |cosine| matrix, [K1, K2]
    greedy matching on C: k = min(K1, K2) times, take the largest remaining entry
    C_{i_t j_t} and delete its row i_t and column j_t; s_t = C_{i_t j_t}
    score = sqrt(Σ_t s_t²) / sqrt(Σ_{t<k} (w↓_t · v↓_t)²)

where w↓, v↓ are the weights sorted decreasingly (identical to the official ``‖diag(w vᵀ)‖₂``
for PCA weights, which already are sorted; sorting keeps the [0, 1] bound for any order).

Choices (``conventions.similarity_weights`` / ``conventions.similarity_unweighted``):

* ``weighting="eigenvalues"`` (default, the official configuration of the paper's figures:
  weights = squared singular values ∝ eigenvalues) or ``"sqrt_eigenvalues"`` (∝ singular
  values; this project's earlier choice);
* unweighted ``"diagonal"`` (default, official: C is multiplied by an identity, so component i is
  compared with component i only: ``score = sqrt(Σ_{i<k} cos_ii² / k)``) or ``"matched"`` (w = v = 1
  with the greedy matching over all pairs: invariant to the order of the components).

Properties (tested): invariant to the sign of every component; the ``matched`` and weighted
variants also to reordering components together with their weights; exactly 1 when both bases
are the same set of directions with the same weights; 0 for orthogonal subspaces; in [0, 1].
It compares *bases*, not bare subspaces: a rotation of the basis inside the same subspace
lowers the score.  Degenerate pairs (k = 0 kept components, or a zero normaliser) score 0.

Cost: the greedy matching is vectorised over pairs but sequential over matches,
O(P · K1 · K2 · min(K1, K2)) for P pairs; prune first (``evr=0.9`` keeps a few dozen
components per head) rather than matching full 768-component bases.
"""
from __future__ import annotations

import torch

from ..catalog import SimilarityUnweighted, SimilarityWeights, names
from .pca import PCABasis

__all__ = ["spectral_cosine", "unit_similarity", "cross_similarity", "greedy_match", "WEIGHTINGS", "UNWEIGHTED"]

WEIGHTINGS = names(SimilarityWeights)
UNWEIGHTED = names(SimilarityUnweighted)


def greedy_match(scores: torch.Tensor, valid_rows: torch.Tensor, valid_cols: torch.Tensor) -> torch.Tensor:
    """Batched greedy maximum matching on non-negative score matrices.

    For every pair p, repeat ``k_p = min(#valid rows, #valid cols)`` times: take the largest
    remaining entry among valid rows/columns, record it, delete its row and column.

    Args:
        scores: ``[P, K1, K2]`` non-negative scores.
        valid_rows: ``[P, K1]`` bool, rows that may be matched.
        valid_cols: ``[P, K2]`` bool, columns that may be matched.

    Returns:
        ``[P, min(K1, K2)]`` matched values in selection order, 0 after the k_p-th.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be [P, K1, K2], got shape {tuple(scores.shape)}")
    num_pairs, k1, k2 = scores.shape
    if valid_rows.shape != (num_pairs, k1) or valid_cols.shape != (num_pairs, k2):
        raise ValueError(
            f"valid_rows/valid_cols must be [P, K1]/[P, K2] = {(num_pairs, k1)}/{(num_pairs, k2)}, "
            f"got {tuple(valid_rows.shape)}/{tuple(valid_cols.shape)}"
        )
    k_max = min(k1, k2)
    matched = torch.zeros(num_pairs, k_max, dtype=scores.dtype, device=scores.device)  # [P, k]
    if k_max == 0 or num_pairs == 0:
        return matched
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    work = scores.masked_fill(~(valid_rows[:, :, None] & valid_cols[:, None, :]), neg_inf)  # [P, K1, K2]
    k_pair = torch.minimum(valid_rows.sum(1), valid_cols.sum(1))  # [P]
    pair_idx = torch.arange(num_pairs, device=scores.device)  # [P]
    for t in range(int(k_pair.max().item())):
        best, flat = work.view(num_pairs, -1).max(dim=1)  # [P], [P]
        active = t < k_pair  # [P]
        matched[:, t] = torch.where(active, best, torch.zeros_like(best))
        rows, cols = flat // k2, flat % k2  # [P], [P]
        work[pair_idx, rows, :] = neg_inf
        work[pair_idx, :, cols] = neg_inf
    return matched


def _score_from_cos(
    cos: torch.Tensor,  # [P, K1, K2] |⟨Φ_i, Ψ_j⟩|
    w_a: torch.Tensor,  # [P, K1] ≥ 0 (1 for unweighted)
    w_b: torch.Tensor,  # [P, K2]
    valid_a: torch.Tensor,  # [P, K1] bool
    valid_b: torch.Tensor,  # [P, K2] bool
) -> torch.Tensor:
    """Normalised spectral cosine for P pairs of (masked) bases -> ``[P]`` (see module doc)."""
    w_a = torch.where(valid_a, w_a, torch.zeros_like(w_a))  # [P, K1]
    w_b = torch.where(valid_b, w_b, torch.zeros_like(w_b))  # [P, K2]
    weighted = cos * w_a[:, :, None] * w_b[:, None, :]  # [P, K1, K2]
    matched = greedy_match(weighted, valid_a, valid_b)  # [P, k]
    k = matched.shape[1]
    w_a_sorted = w_a.sort(dim=1, descending=True).values[:, :k]  # [P, k]
    w_b_sorted = w_b.sort(dim=1, descending=True).values[:, :k]  # [P, k]
    # pairs beyond min(kept_a, kept_b) multiply by a 0 (masked) weight, so this is Σ_{t<k_p}.
    norm = (w_a_sorted * w_b_sorted).norm(dim=1)  # [P]
    num = matched.norm(dim=1)  # [P]
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    score = torch.where(norm > 0, num / safe, torch.zeros_like(num))  # [P]
    # |cos| ≤ 1 up to round-off; clamp the last ulp so callers can rely on [0, 1].
    return score.clamp(0.0, 1.0)


def spectral_cosine(
    comp1: torch.Tensor,
    comp2: torch.Tensor,
    w1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    atol: float = 1e-4,
) -> float:
    """Normalised spectral cosine between two bases (formula in the module docstring).

    Args:
        comp1: ``[K1, D]`` orthonormal rows.
        comp2: ``[K2, D]`` orthonormal rows.
        w1, w2: ``[K1]``, ``[K2]`` non-negative weights (e.g. sqrt of eigenvalues), or both
            None for the unweighted variant.
        atol: tolerance of the orthonormality check of the rows.

    Returns:
        A float in [0, 1].
    """
    for name, comp in (("comp1", comp1), ("comp2", comp2)):
        if comp.ndim != 2:
            raise ValueError(f"{name} must be [K, D], got shape {tuple(comp.shape)}")
    if comp1.shape[1] != comp2.shape[1]:
        raise ValueError(f"comp1 and comp2 must share D, got {comp1.shape[1]} and {comp2.shape[1]}")
    if (w1 is None) != (w2 is None):
        raise ValueError("pass both w1 and w2 (weighted) or neither (unweighted)")
    dtype = torch.promote_types(comp1.dtype, comp2.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    c1, c2 = comp1.to(dtype), comp2.to(device=comp1.device, dtype=dtype)
    for name, c in (("comp1", c1), ("comp2", c2)):
        gram = c @ c.T  # [K, K]
        eye = torch.eye(c.shape[0], dtype=dtype, device=c.device)
        if not torch.allclose(gram, eye, atol=atol):
            raise ValueError(f"{name} rows must be orthonormal (max |ΦΦᵀ − I| = "
                             f"{(gram - eye).abs().max().item():.3g} > atol={atol})")
    if w1 is None:
        wa = torch.ones(c1.shape[0], dtype=dtype, device=c1.device)
        wb = torch.ones(c2.shape[0], dtype=dtype, device=c1.device)
    else:
        wa = torch.as_tensor(w1).to(device=c1.device, dtype=dtype)
        wb = torch.as_tensor(w2).to(device=c1.device, dtype=dtype)
        for name, w, c in (("w1", wa, c1), ("w2", wb, c2)):
            if w.shape != (c.shape[0],):
                raise ValueError(f"{name} must be [{c.shape[0]}], got shape {tuple(w.shape)}")
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
                raise ValueError(f"{name} must be finite and non-negative")
    cos = (c1 @ c2.T).abs()[None]  # [1, K1, K2]
    score = _score_from_cos(
        cos, wa[None], wb[None],
        torch.ones_like(wa, dtype=torch.bool)[None], torch.ones_like(wb, dtype=torch.bool)[None],
    )
    return float(score[0])


def _diagonal_score(cos: torch.Tensor, valid_a: torch.Tensor, valid_b: torch.Tensor) -> torch.Tensor:
    """The official unweighted score: ``sqrt(Σ_{i<k} cos_ii² / k)``, k = min(#kept_a, #kept_b)
    (kept components are a prefix).  ``cos`` ``[P, K1, K2]`` → ``[P]``."""
    k = torch.minimum(valid_a.sum(1), valid_b.sum(1))                     # [P]
    m = min(cos.shape[1], cos.shape[2])
    diag = torch.diagonal(cos[:, :m, :m], dim1=1, dim2=2)                 # [P, m]
    on = torch.arange(m, device=cos.device)[None] < k[:, None]            # [P, m]
    num = (diag.where(on, torch.zeros_like(diag)) ** 2).sum(1)
    safe = torch.where(k > 0, k, torch.ones_like(k)).to(cos.dtype)
    return torch.where(k > 0, (num / safe).sqrt(), torch.zeros_like(num)).clamp(0.0, 1.0)


def _check_options(weighting: str, unweighted: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"similarity weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if unweighted not in UNWEIGHTED:
        raise ValueError(f"unweighted similarity {unweighted!r}; valid: {', '.join(UNWEIGHTED)}")


def _prepared(basis: PCABasis, evr: float | None, weighted: bool, dtype: torch.dtype,
              weighting: str = "eigenvalues", prune_kwargs: dict | None = None):
    """Prune (if ``evr``), compact, and return (components, weights, mask) in ``dtype``."""
    if evr is not None:
        basis = basis.prune(evr=evr, **(prune_kwargs or {}))
    basis = basis.compact()
    comps = basis.components.to(dtype)  # [U, K, D]
    if weighted:
        eig = basis.eigenvalues.to(dtype).clamp_min(0)
        weights = eig if weighting == "eigenvalues" else eig.sqrt()  # [U, K]
    else:
        weights = torch.ones_like(basis.eigenvalues, dtype=dtype)  # [U, K]
    return comps, weights, basis.mask


def _scores(cos, w_a, w_b, m_a, m_b, weighted: bool, unweighted: str) -> torch.Tensor:
    if not weighted and unweighted == "diagonal":
        return _diagonal_score(cos, m_a, m_b)
    return _score_from_cos(cos, w_a, w_b, m_a, m_b)


def _check_pair(basis_a: PCABasis, basis_b: PCABasis) -> torch.dtype:
    if basis_a.dim != basis_b.dim:
        raise ValueError(f"bases must share D, got {basis_a.dim} and {basis_b.dim}")
    if basis_a.mean.device != basis_b.mean.device:
        raise ValueError(f"bases live on different devices: {basis_a.mean.device}, {basis_b.mean.device}")
    return torch.promote_types(basis_a.components.dtype, basis_b.components.dtype)


@torch.no_grad()
def unit_similarity(
    basis_a: PCABasis, basis_b: PCABasis, weighted: bool = True, evr: float | None = 0.9,
    weighting: str = "eigenvalues", unweighted: str = "diagonal", prune_kwargs: dict | None = None,
) -> torch.Tensor:
    """Spectral cosine of unit u of ``basis_a`` with unit u of ``basis_b`` -> ``[U]``.

    Each basis is first pruned with ``prune(evr=evr, **prune_kwargs)`` (``evr=None`` keeps the
    bases' current masks). ``weighted`` uses ``weighting`` weights (module docstring), else the
    ``unweighted`` variant.
    """
    _check_options(weighting, unweighted)
    if basis_a.num_units != basis_b.num_units:
        raise ValueError(f"bases must have the same U, got {basis_a.num_units} and {basis_b.num_units}")
    dtype = _check_pair(basis_a, basis_b)
    comp_a, w_a, m_a = _prepared(basis_a, evr, weighted, dtype, weighting, prune_kwargs)
    comp_b, w_b, m_b = _prepared(basis_b, evr, weighted, dtype, weighting, prune_kwargs)
    cos = torch.bmm(comp_a, comp_b.transpose(1, 2)).abs()  # [U, Ka, Kb]
    return _scores(cos, w_a, w_b, m_a, m_b, weighted, unweighted)  # [U]


@torch.no_grad()
def cross_similarity(
    basis_a: PCABasis,
    basis_b: PCABasis,
    weighted: bool = True,
    evr: float | None = 0.9,
    max_elements: int = 1 << 24,
    weighting: str = "eigenvalues",
    unweighted: str = "diagonal",
    prune_kwargs: dict | None = None,
) -> torch.Tensor:
    """Spectral cosine between every unit of ``basis_a`` and every unit of ``basis_b`` -> ``[Ua, Ub]``.

    Same pruning and weights as :func:`unit_similarity`. Pairs are processed in chunks of
    at most ``max_elements`` entries of the ``[P, Ka, Kb]`` cosine tensor.
    """
    _check_options(weighting, unweighted)
    dtype = _check_pair(basis_a, basis_b)
    comp_a, w_a, m_a = _prepared(basis_a, evr, weighted, dtype, weighting, prune_kwargs)  # [Ua, Ka, D] ...
    comp_b, w_b, m_b = _prepared(basis_b, evr, weighted, dtype, weighting, prune_kwargs)  # [Ub, Kb, D] ...
    num_a, num_b = comp_a.shape[0], comp_b.shape[0]
    ka, kb = comp_a.shape[1], comp_b.shape[1]
    out = torch.zeros(num_a, num_b, dtype=dtype, device=comp_a.device)  # [Ua, Ub]
    rows_per_chunk = max(1, max_elements // max(1, num_b * ka * kb))
    for start in range(0, num_a, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_a)
        r = stop - start
        cos = torch.einsum("akd,bld->abkl", comp_a[start:stop], comp_b).abs()  # [r, Ub, Ka, Kb]
        scores = _scores(
            cos.reshape(r * num_b, ka, kb),  # [r·Ub, Ka, Kb]
            w_a[start:stop].repeat_interleave(num_b, dim=0),  # [r·Ub, Ka]
            w_b.repeat(r, 1),  # [r·Ub, Kb]
            m_a[start:stop].repeat_interleave(num_b, dim=0),  # [r·Ub, Ka]
            m_b.repeat(r, 1),  # [r·Ub, Kb]
            weighted, unweighted,
        )  # [r·Ub]
        out[start:stop] = scores.view(r, num_b)
    return out
