"""The spectral cosine the official code computes (normalized_spectral_cosine with
get_weights(mode="eigs") and the identity weight matrix for the unweighted variant),
re-derived here as an explicit loop from its description, against our vectorised version."""
from __future__ import annotations

import pytest
import torch

from residual_exp.spectral import PCABasis, StreamingPCA, unit_similarity


def official_score(X: torch.Tensor, Y: torch.Tensor, wx=None, wy=None) -> float:
    """C = |X Yᵀ| ⊙ W with W = wx wyᵀ (or I) normalised by ‖diag W‖; greedy picks of the
    largest remaining entry, row and column removed, min(Kx, Ky) times; ‖picks‖ / ‖diag W‖."""
    kx, ky = X.shape[0], Y.shape[0]
    C = (X @ Y.T).abs()
    W = torch.eye(kx, ky, dtype=X.dtype) if wx is None else torch.outer(wx, wy)
    W = W / torch.diagonal(W).norm()
    C = (C * W).clone()
    picks = []
    for _ in range(min(kx, ky)):
        flat = int(torch.argmax(C))
        i, j = divmod(flat, ky)
        picks.append(float(C[i, j]))
        C[i, :] = -float("inf")
        C[:, j] = -float("inf")
    return float(torch.tensor(picks, dtype=X.dtype).norm() / torch.diagonal(W).norm())


def _basis(seed: int, n=300, units=3, dim=10) -> PCABasis:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, dim, dtype=torch.float64)
    x = torch.randn(n, units, dim, generator=g, dtype=torch.float64) * scales
    rot = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    p = StreamingPCA(units, dim)
    p.update(x @ rot)
    return p.finalize()


@pytest.mark.parametrize("seeds,evr", [((0, 1), 0.9), ((2, 3), 0.7), ((4, 4), 0.95), ((5, 6), 0.5)])
@pytest.mark.parametrize("weighted", [True, False])
def test_our_default_spectral_cosine_is_the_official_one(seeds, evr, weighted):
    a, b = _basis(seeds[0]), _basis(seeds[1])
    ours = unit_similarity(a, b, weighted=weighted, evr=evr, prune_kwargs={"unreachable": "one"})
    pa, pb = a.prune(evr=evr), b.prune(evr=evr)
    for u in range(a.num_units):
        ka, kb = int(pa.kept()[u]), int(pb.kept()[u])
        X, Y = a.components[u, :ka], b.components[u, :kb]
        wx = a.eigenvalues[u, :ka] if weighted else None                  # eigenvalues ∝ singular values²
        wy = b.eigenvalues[u, :kb] if weighted else None
        assert float(ours[u]) == pytest.approx(official_score(X, Y, wx, wy), abs=1e-12), (u, ka, kb)


def test_the_other_variants_stay_available_and_differ():
    a, b = _basis(0), _basis(1)
    d = unit_similarity(a, b, weighted=True, evr=0.9)
    s = unit_similarity(a, b, weighted=True, evr=0.9, weighting="sqrt_eigenvalues")
    m = unit_similarity(a, b, weighted=False, evr=0.9, unweighted="matched")
    o = unit_similarity(a, b, weighted=False, evr=0.9)
    assert (d - s).abs().max() > 1e-4 and (m - o).abs().max() > 1e-4
    with pytest.raises(ValueError, match="weighting"):
        unit_similarity(a, b, weighting="singular")
