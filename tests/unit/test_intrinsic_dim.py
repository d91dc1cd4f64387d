"""Linear dimension and TwoNN (checked against scikit-dimension)."""

from __future__ import annotations

import math
import warnings

import pytest
import skdim
import torch

from residual_exp.spectral import (
    StreamingPCA,
    linear_dimension,
    linear_dimensions,
    two_nn_distances,
    twonn,
)

AMBIENT = 768


def _sphere(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 768]`` points uniform on the d-sphere S^d ⊂ R^{d+1}, randomly rotated into 768 dims."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d + 1, generator=gen, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True)  # [n, d+1] uniform on S^d
    q, _ = torch.linalg.qr(torch.randn(AMBIENT, d + 1, generator=gen, dtype=torch.float64))  # [768, d+1]
    return z @ q.T  # [n, 768]


@pytest.fixture(scope="module", params=[2, 5, 10])
def sphere(request) -> tuple[int, torch.Tensor]:
    d = request.param
    return d, _sphere(d, n=4000 if d == 10 else 2500)  # TwoNN's variance grows with d


def test_twonn_recovers_sphere_dimension(sphere) -> None:
    d, x = sphere
    est = twonn(x)
    assert est == pytest.approx(d, rel=0.10)


def test_twonn_agrees_with_skdim(sphere) -> None:
    x = sphere[1][:2000]  # a uniform subsample keeps this test fast
    ours = twonn(x, discard_fraction=0.1)
    ref = skdim.id.TwoNN(discard_fraction=0.1).fit(x.numpy()).dimension_
    # same formula on the same neighbour distances: agreement to round-off, far inside "a few %"
    assert ours == pytest.approx(ref, rel=1e-6)


def test_twonn_mle_agrees_with_skdim() -> None:
    x = _sphere(5, n=1500, seed=3)
    ours = twonn(x, method="mle")
    ref = skdim.id.TwoNN(method="mle").fit(x.numpy()).dimension_
    assert ours == pytest.approx(ref, rel=1e-6)


def test_chunked_equals_unchunked() -> None:
    x = _sphere(5, n=500, seed=1)
    full = twonn(x, chunk_size=x.shape[0])
    for chunk in (1_000_000, 37, 1):
        assert twonn(x, chunk_size=chunk) == full  # exact distances -> identical estimate
    torch.testing.assert_close(
        two_nn_distances(x, chunk_size=29), two_nn_distances(x, chunk_size=x.shape[0]), rtol=0, atol=0
    )


def test_two_nn_distances_match_bruteforce() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 20, generator=gen, dtype=torch.float64) * 5 + 100  # far from the origin
    full = torch.cdist(x, x)
    full.fill_diagonal_(float("inf"))
    expected = full.topk(2, dim=1, largest=False).values  # [N, 2]
    torch.testing.assert_close(two_nn_distances(x, chunk_size=64), expected, rtol=1e-12, atol=0)


def test_duplicates_do_not_break_twonn() -> None:
    x = _sphere(3, n=1500, seed=2)
    dup = torch.cat([x, x[:200], x[:50]])  # 250 duplicated rows (some three times)
    clean = twonn(x)
    assert twonn(dup) == clean  # exact duplicates dropped first
    skipped = twonn(dup, drop_duplicates=False)  # skip points at distance 0 instead
    assert math.isfinite(skipped) and skipped == pytest.approx(3, rel=0.2)
    # same zero-distance rule as skdim, fed the same (r1, r2). (skdim on the raw points is not
    # comparable: its ‖a‖²+‖b‖²−2ab distances leave duplicates at ~1e-8 instead of 0, so
    # they enter the fit with huge μ.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skdim warns about the dropped points
        ref = skdim.id.TwoNN(dist=True).fit(two_nn_distances(dup).numpy()).dimension_
    assert skipped == pytest.approx(ref, rel=1e-9)


def test_twonn_validates_arguments() -> None:
    x = _sphere(2, n=50)
    with pytest.raises(ValueError, match="discard_fraction"):
        twonn(x, discard_fraction=1.0)
    with pytest.raises(ValueError, match="method"):
        twonn(x, method="bayes")
    with pytest.raises(ValueError, match="x must be"):
        twonn(x[None])
    with pytest.raises(ValueError, match="at least 3 points"):
        twonn(torch.zeros(10, 4))  # all duplicates -> one point
    with pytest.raises(ValueError, match="chunk_size"):
        two_nn_distances(x, chunk_size=0)
    assert twonn(x, discard_fraction=0.0) > 0  # last point (1 − F = 0) dropped, finite


# ------------------------------------------------------------------------------ linear dimension
@pytest.mark.parametrize("k", [1, 3, 10])
def test_linear_dimension_of_subspace_data(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    dim, n = 64, 500
    basis = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))[0].T  # [k, D]
    x = torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis + 3.0  # [n, D], exactly k-dim
    acc = StreamingPCA(num_units=1, dim=dim)
    acc.update(x)
    eig = acc.finalize().eigenvalues  # [1, D]
    assert linear_dimension(eig[0]) == k
    assert linear_dimension(eig[0], threshold=1.0) >= k  # round-off tail may count at exactly 1.0


def test_linear_dimension_rule_and_batched() -> None:
    lam = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.3, 0.2], dtype=torch.float64)  # cum .5 .8 .9 .95 .98 1
    assert linear_dimension(lam) == 6
    assert linear_dimension(lam, threshold=0.97) == 5
    assert linear_dimension(lam, threshold=0.6) == 2
    assert linear_dimension(lam.flip(0), threshold=0.6) == 2  # order of the input is irrelevant
    eigs = torch.stack([lam, torch.zeros(6), torch.tensor([1.0, 0, 0, 0, 0, -1e-18])])
    assert linear_dimensions(eigs, threshold=0.99).tolist() == [6, 0, 1]  # zero variance -> 0
    with pytest.raises(ValueError, match="threshold"):
        linear_dimension(lam, threshold=0.0)
    with pytest.raises(ValueError, match="linear_dimensions"):
        linear_dimension(eigs)
