"""Normalised spectral cosine: properties, a brute-force reference, and the PCABasis helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from residual_exp.spectral import (
    StreamingPCA,
    cross_similarity,
    greedy_match,
    spectral_cosine,
    unit_similarity,
)

D = 24


def _orthonormal(k: int, dim: int = D, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    return q.T.contiguous()  # [k, D] orthonormal rows


def _reference(comp1: np.ndarray, comp2: np.ndarray, w1=None, w2=None) -> float:
    """Straight transcription of the formula: plain Python greedy loop."""
    w1 = np.ones(len(comp1)) if w1 is None else np.asarray(w1, dtype=float)
    w2 = np.ones(len(comp2)) if w2 is None else np.asarray(w2, dtype=float)
    c = np.abs(comp1 @ comp2.T) * np.outer(w1, w2)
    k = min(c.shape)
    rows, cols, matched = set(), set(), []
    for _ in range(k):
        best, arg = -1.0, None
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                if i not in rows and j not in cols and c[i, j] > best:
                    best, arg = c[i, j], (i, j)
        matched.append(best)
        rows.add(arg[0])
        cols.add(arg[1])
    norm = np.linalg.norm(np.sort(w1)[::-1][:k] * np.sort(w2)[::-1][:k])
    return float(np.linalg.norm(matched) / norm)


@pytest.mark.parametrize("weighted", [False, True])
def test_identical_bases_score_one(weighted: bool) -> None:
    comp = _orthonormal(6)
    w = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.1], dtype=torch.float64) if weighted else None
    assert spectral_cosine(comp, comp, w, w) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_invariant_to_sign_and_order(weighted: bool) -> None:
    a, b = _orthonormal(5, seed=1), _orthonormal(7, seed=2)
    wa = torch.linspace(2.0, 0.2, 5, dtype=torch.float64) if weighted else None
    wb = torch.linspace(3.0, 0.5, 7, dtype=torch.float64) if weighted else None
    base = spectral_cosine(a, b, wa, wb)
    perm = torch.tensor([3, 0, 4, 1, 2])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    a2, wa2 = (a * signs)[perm], (wa[perm] if weighted else None)
    assert spectral_cosine(a2, b, wa2, wb) == pytest.approx(base, abs=1e-12)
    # identical sets of directions, shuffled and sign-flipped: still exactly 1
    assert spectral_cosine(a2, a, wa2, wa) == pytest.approx(1.0, abs=1e-12)
    # symmetric
    assert spectral_cosine(b, a, wb, wa) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_orthogonal_subspaces_score_zero(weighted: bool) -> None:
    q = _orthonormal(8)
    w = torch.ones(4, dtype=torch.float64) * 2 if weighted else None
    assert spectral_cosine(q[:4], q[4:], w, w) == pytest.approx(0.0, abs=1e-12)


def test_partial_overlap_value() -> None:
    eye = torch.eye(D, dtype=torch.float64)
    # span(e0, e1) vs span(e0, e2): matched |cos| = (1, 0) -> sqrt((1 + 0) / 2)
    assert spectral_cosine(eye[[0, 1]], eye[[0, 2]]) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    # weighted: the shared direction carries (2·3)² of the normaliser (2·3)² + (1·1)²
    w1 = torch.tensor([2.0, 1.0], dtype=torch.float64)
    w2 = torch.tensor([3.0, 1.0], dtype=torch.float64)
    expected = 6.0 / math.sqrt(36.0 + 1.0)
    assert spectral_cosine(eye[[0, 1]], eye[[0, 2]], w1, w2) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_bruteforce_reference_and_bounds(seed: int, weighted: bool) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    k1, k2 = 3 + seed, 6 - seed // 2
    # correlated subspaces: b shares part of a's span
    a = _orthonormal(k1, seed=10 * seed)
    mix = torch.cat([a[: k2 // 2], torch.randn(k2 - k2 // 2, D, generator=gen, dtype=torch.float64)])
    b = torch.linalg.qr((mix + 0.3 * torch.randn(k2, D, generator=gen, dtype=torch.float64)).T)[0].T
    wa = torch.rand(k1, generator=gen, dtype=torch.float64) if weighted else None
    wb = torch.rand(k2, generator=gen, dtype=torch.float64) if weighted else None
    got = spectral_cosine(a, b, wa, wb)
    ref = _reference(a.numpy(), b.numpy(), None if wa is None else wa.numpy(), None if wb is None else wb.numpy())
    assert got == pytest.approx(ref, abs=1e-12)
    assert 0.0 < got < 1.0


def test_greedy_match_batched_and_masked() -> None:
    scores = torch.tensor(
        [[[0.9, 0.8, 0.1], [0.85, 0.2, 0.3]], [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]], dtype=torch.float64
    )  # [2, 2, 3]
    valid_rows = torch.tensor([[True, True], [True, True]])
    valid_cols = torch.tensor([[True, True, True], [True, True, False]])
    out = greedy_match(scores, valid_rows, valid_cols)
    # pair 0: 0.9 (r0,c0), then best of row 1 without c0: 0.3; pair 1: c2 masked -> 0.5, then 0.1
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.3], [0.5, 0.1]], dtype=torch.float64))
    out = greedy_match(scores, torch.tensor([[True, False], [False, False]]), valid_cols)
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_spectral_cosine_validates_arguments() -> None:
    a = _orthonormal(3)
    with pytest.raises(ValueError, match="both w1 and w2"):
        spectral_cosine(a, a, torch.ones(3), None)
    with pytest.raises(ValueError, match="orthonormal"):
        spectral_cosine(a * 2, a)
    with pytest.raises(ValueError, match="share D"):
        spectral_cosine(a, _orthonormal(3, dim=D + 1))
    with pytest.raises(ValueError, match="w1 must be"):
        spectral_cosine(a, a, torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        spectral_cosine(a, a, -torch.ones(3), torch.ones(3))


# ------------------------------------------------------------------------------ PCABasis helpers
def _basis(x: torch.Tensor):
    acc = StreamingPCA(num_units=x.shape[1], dim=x.shape[2])
    acc.update(x)
    return acc.finalize()


@pytest.fixture(scope="module")
def bases():
    """Two datasets for 4 units of dim 12: B = A's distribution with units 2, 3 rotated."""
    gen = torch.Generator().manual_seed(7)
    n, units, dim = 400, 4, 12
    scales = torch.tensor([4.0, 2.0, 1.0] + [0.05] * (dim - 3), dtype=torch.float64)  # ~3-d units
    rots = [torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0] for _ in range(units)]

    def sample(rotations):
        z = torch.randn(n, units, dim, generator=gen, dtype=torch.float64) * scales
        return torch.stack([z[:, u] @ rotations[u] for u in range(units)], dim=1)  # [n, U, D]

    other = rots[:2] + [torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0] for _ in range(2)]
    return _basis(sample(rots)), _basis(sample(other))


@pytest.mark.parametrize("weighted", [False, True])
def test_unit_similarity(bases, weighted: bool) -> None:
    a, b = bases
    self_sim = unit_similarity(a, a, weighted=weighted, evr=0.9)
    torch.testing.assert_close(self_sim, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    sim = unit_similarity(a, b, weighted=weighted, evr=0.9, weighting="sqrt_eigenvalues", unweighted="matched")
    assert sim.shape == (4,) and ((sim >= 0) & (sim <= 1)).all()
    assert sim[:2].min() > 0.9 > sim[2:].max()  # same distribution vs rotated units
    official = unit_similarity(a, b, weighted=weighted, evr=0.9)       # the defaults: official variants
    assert official[:2].min() > 0.9 > official[2:].max()
    # the sqrt-weighted / matched variants agree with spectral_cosine on the pruned bases
    pa, pb = a.prune(evr=0.9), b.prune(evr=0.9)
    for u in range(4):
        ka, kb = int(pa.kept()[u]), int(pb.kept()[u])
        wa = pa.eigenvalues[u, :ka].sqrt() if weighted else None
        wb = pb.eigenvalues[u, :kb].sqrt() if weighted else None
        expected = spectral_cosine(pa.components[u, :ka], pb.components[u, :kb], wa, wb)
        assert float(sim[u]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_similarity(bases, weighted: bool) -> None:
    a, b = bases
    full = cross_similarity(a, b, weighted=weighted, evr=0.9)
    assert full.shape == (4, 4)
    torch.testing.assert_close(full.diagonal(), unit_similarity(a, b, weighted=weighted, evr=0.9))
    chunked = cross_similarity(a, b, weighted=weighted, evr=0.9, max_elements=1)  # one row per chunk
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-14)
    sub = cross_similarity(a.select([0, 2]), b, weighted=weighted, evr=None)
    assert sub.shape == (2, 4)
    torch.testing.assert_close(cross_similarity(a, a, weighted=weighted).diagonal(), torch.ones(4, dtype=torch.float64))


def test_similarity_of_zero_variance_unit_is_zero() -> None:
    x = torch.randn(30, 2, 5, dtype=torch.float64)
    x[:, 1] = 1.0  # constant unit: keeps 0 components under any EVR
    basis = _basis(x)
    sim = unit_similarity(basis, basis)
    assert torch.isfinite(sim).all() and sim[1] == 0 and sim[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same U"):
        unit_similarity(basis, basis.select([0]))
