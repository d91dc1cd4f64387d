"""Streaming PCA == sklearn PCA; pruning rules; save/load; projection round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from residual_exp.spectral import PCABasis, StreamingPCA, num_components_for_evr
from residual_exp.spectral import pca as pca_module

N, U, D = 600, 3, 16


def _random_rotation(dim: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # [D, D] orthogonal


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    """``[N, U, D]`` float64: anisotropic, rotated, with a large mean (tests the shift trick)."""
    gen = torch.Generator().manual_seed(0)
    units = []
    for u in range(U):
        scales = torch.logspace(0.5, -1.5, D, dtype=torch.float64) * (u + 1)  # distinct spectrum
        z = torch.randn(N, D, generator=gen, dtype=torch.float64) * scales  # [N, D]
        offset = 1e3 * torch.randn(D, generator=gen, dtype=torch.float64)  # ‖µ‖ ≫ σ
        units.append(z @ _random_rotation(D, gen) + offset)
    return torch.stack(units, dim=1)  # [N, U, D]


def _fit(x: torch.Tensor, batch_sizes: list[int] | int) -> PCABasis:
    acc = StreamingPCA(num_units=x.shape[1], dim=x.shape[2])
    if isinstance(batch_sizes, int):
        batch_sizes = [batch_sizes] * (-(-x.shape[0] // batch_sizes))
    start = 0
    for size in batch_sizes:
        acc.update(x[start : start + size])
        start += size
    assert start >= x.shape[0]
    return acc.finalize()


def _assert_bases_close(a: PCABasis, b: PCABasis, atol: float = 1e-12) -> None:
    for name in ("mean", "components", "eigenvalues", "explained_variance_ratio"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol, msg=name)
    assert torch.equal(a.mask, b.mask)
    assert a.n_samples == b.n_samples


def test_matches_sklearn(data: torch.Tensor) -> None:
    basis = _fit(data, [100, 1, 250, 49, 200])  # uneven batches, one of size 1
    assert basis.n_samples == N
    assert basis.components.shape == (U, D, D) and basis.mask.all()
    for u in range(U):
        ref = PCA(svd_solver="full").fit(data[:, u].numpy())  # exact centring + SVD
        comps = basis.components[u].numpy()  # [K, D]
        signs = np.sign(np.sum(comps * ref.components_, axis=1, keepdims=True))
        np.testing.assert_allclose(comps * signs, ref.components_, rtol=0, atol=1e-10)
        np.testing.assert_allclose(basis.eigenvalues[u].numpy(), ref.explained_variance_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            basis.explained_variance_ratio[u].numpy(), ref.explained_variance_ratio_, rtol=0, atol=1e-10
        )
        np.testing.assert_allclose(basis.mean[u].numpy(), ref.mean_, rtol=0, atol=1e-10)


def test_orthonormal_sorted_and_sign_convention(data: torch.Tensor) -> None:
    basis = _fit(data, 128)
    eye = torch.eye(D, dtype=torch.float64).expand(U, D, D)
    torch.testing.assert_close(basis.components @ basis.components.transpose(1, 2), eye, rtol=0, atol=1e-12)
    assert (basis.eigenvalues[:, :-1] >= basis.eigenvalues[:, 1:]).all()
    torch.testing.assert_close(basis.explained_variance_ratio.sum(1), torch.ones(U, dtype=torch.float64))
    largest = basis.components.gather(-1, basis.components.abs().argmax(-1, keepdim=True))
    assert (largest > 0).all()  # deterministic sign: largest-|.| coordinate positive


def test_multi_unit_equals_separate_fits(data: torch.Tensor) -> None:
    joint = _fit(data, 64)
    for u in range(U):
        single = _fit(data[:, u : u + 1], 64)
        _assert_bases_close(joint.select([u]), single, atol=1e-11)


def test_batch_size_invariance(data: torch.Tensor) -> None:
    reference = _fit(data, N)
    for sizes in (1, 7, [N // 2, 0, N - N // 2]):  # includes an empty batch
        _assert_bases_close(_fit(data, sizes), reference, atol=1e-10)


def test_single_unit_accepts_2d_batches_and_float32(data: torch.Tensor) -> None:
    x = data[:, 0]  # [N, D]
    acc = StreamingPCA(num_units=1, dim=D)
    acc.update(x[:300].float())
    acc.update(x[300:].float())
    basis = acc.finalize(dtype=torch.float32, meta={"unit": "L0H0"})
    assert basis.components.dtype == torch.float32 and basis.meta == {"unit": "L0H0"}
    ref = PCA(svd_solver="full").fit(x.float().double().numpy())
    np.testing.assert_allclose(basis.eigenvalues[0].numpy(), ref.explained_variance_, rtol=1e-5)


def test_zero_variance_unit_is_defined() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 2, 4, generator=gen, dtype=torch.float64)
    x[:, 1] = torch.tensor([3.0, -1.0, 0.5, 7.0], dtype=torch.float64)  # constant (bias) unit
    acc = StreamingPCA(2, 4)
    for chunk in x.split(13):
        acc.update(chunk)
    basis = acc.finalize()
    assert torch.isfinite(basis.explained_variance_ratio).all()
    assert (basis.eigenvalues[1] == 0).all() and (basis.explained_variance_ratio[1] == 0).all()
    torch.testing.assert_close(basis.mean[1], x[0, 1])
    assert basis.prune(evr=0.9).kept()[1].item() == 0  # nothing to explain
    assert basis.prune(k=2).kept().tolist() == [2, 2]
    coeffs = basis.project(x)
    assert (coeffs[:, 1] == 0).all()


def test_update_validates_arguments() -> None:
    acc = StreamingPCA(2, 3)
    with pytest.raises(ValueError, match="x must be"):
        acc.update(torch.zeros(4, 3, 3))
    with pytest.raises(ValueError, match="floating-point"):
        acc.update(torch.zeros(4, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((4, 2, 3), float("nan")))
    acc.update(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        acc.finalize()
    with pytest.raises(ValueError, match="num_units"):
        StreamingPCA(0, 3)
    with pytest.raises(ValueError, match="dim"):
        StreamingPCA(1, -1)


# ---------------------------------------------------------------------------------- pruning
SPECTRA = torch.tensor(
    [
        [5.0, 3.0, 1.0, 0.5, 0.3, 0.2],  # EVR .50 .30 .10 .05 .03 .02 -> cum .5 .8 .9 .95 .98 1
        [9.0, 0.4, 0.3, 0.15, 0.1, 0.05],  # cum .90 .94 .97 .985 .995 1
    ],
    dtype=torch.float64,
)


@pytest.fixture(scope="module")
def known_spectrum_basis() -> PCABasis:
    """Data whose sample covariance is exactly Q diag(SPECTRA[u]) Qᵀ."""
    gen = torch.Generator().manual_seed(2)
    n, dim = 200, SPECTRA.shape[1]
    units = []
    for lam in SPECTRA:
        z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        z = z - z.mean(0)
        q, _ = torch.linalg.qr(z)  # [n, D] orthonormal columns, zero mean
        white = q * (n - 1) ** 0.5  # sample covariance exactly I
        units.append(white * lam.sqrt() @ _random_rotation(dim, gen) + 10.0)
    basis = _fit(torch.stack(units, dim=1), 50)
    torch.testing.assert_close(basis.eigenvalues, SPECTRA, rtol=1e-12, atol=1e-12)
    return basis


@pytest.mark.parametrize(
    ("evr", "expected"),
    [(1e-3, [1, 1]), (0.6, [2, 1]), (0.85, [3, 1]), (0.93, [4, 2]), (0.96, [5, 3]), (0.99, [6, 5]), (1.0, [6, 6])],
)
def test_prune_evr_rule(known_spectrum_basis: PCABasis, evr: float, expected: list[int]) -> None:
    pruned = known_spectrum_basis.prune(evr=evr)
    assert pruned.kept().tolist() == expected
    assert pruned.components.shape == known_spectrum_basis.components.shape  # stackable
    k = torch.tensor(expected)
    assert torch.equal(pruned.mask, torch.arange(6)[None] < k[:, None])  # prefixes
    assert torch.equal(num_components_for_evr(pruned.explained_variance_ratio, evr), k)


def test_prune_k_rule_and_defaults(known_spectrum_basis: PCABasis) -> None:
    basis = known_spectrum_basis
    assert basis.prune(k=2).kept().tolist() == [2, 2]
    assert basis.prune(k=0).kept().tolist() == [0, 0]
    assert basis.prune(k=100).kept().tolist() == [6, 6]  # clamped to K
    assert basis.prune().kept().tolist() == [6, 6]
    # recomputed from scratch, never compounded
    assert basis.prune(k=1).prune(evr=0.96).kept().tolist() == [5, 3]
    with pytest.raises(ValueError, match="at most one"):
        basis.prune(evr=0.9, k=3)
    with pytest.raises(ValueError, match="evr"):
        basis.prune(evr=1.5)
    with pytest.raises(ValueError, match="k must"):
        basis.prune(k=-1)


def test_compact_and_select(known_spectrum_basis: PCABasis) -> None:
    pruned = known_spectrum_basis.prune(evr=0.93)  # kept [4, 2]
    compact = pruned.compact()
    assert compact.num_components == 4 and compact.kept().tolist() == [4, 2]
    torch.testing.assert_close(compact.components, pruned.components[:, :4])
    # EVR stays relative to the full spectrum, so re-pruning a compact basis is consistent
    assert compact.prune(evr=0.85).kept().tolist() == [3, 1]
    assert compact.prune(evr=0.99).kept().tolist() == [4, 4]  # unreachable within K=4: keep all
    sub = pruned.select([1])
    assert sub.num_units == 1 and sub.kept().tolist() == [2]
    torch.testing.assert_close(sub.mean, pruned.mean[1:])
    assert pruned.select(torch.tensor([False, True])).kept().tolist() == [2]
    assert pruned.select([1, 0]).kept().tolist() == [2, 4]
    with pytest.raises(ValueError, match="out of range"):
        pruned.select([2])


def test_save_load_round_trip(tmp_path, known_spectrum_basis: PCABasis) -> None:
    basis = known_spectrum_basis.prune(evr=0.9)
    basis.meta.update({"model": "tiny", "units": "L0H0,L0H1"})
    path = tmp_path / "sub" / "basis.safetensors"
    basis.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["basis.safetensors"]  # no stray temp
    loaded = PCABasis.load(path)
    _assert_bases_close(loaded, basis, atol=0)
    assert loaded.meta == {"model": "tiny", "units": "L0H0,L0H1"}
    basis.prune(k=1).save(path)  # overwrite in place
    assert PCABasis.load(path).kept().tolist() == [1, 1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["basis.safetensors"]


def test_save_crash_leaves_no_partial_file(tmp_path, monkeypatch, known_spectrum_basis: PCABasis) -> None:
    path = tmp_path / "basis.safetensors"
    known_spectrum_basis.save(path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(pca_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        known_spectrum_basis.prune(k=1).save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["basis.safetensors"]
    assert path.read_bytes() == before  # the old file is intact


def test_load_rejects_foreign_files(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a PCA basis"):
        PCABasis.load(path)
    with pytest.raises(FileNotFoundError):
        PCABasis.load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------- projection
def test_project_reconstruct_identity(data: torch.Tensor) -> None:
    basis = _fit(data, 200)
    x = data[:32]  # [B, U, D]
    coeffs = basis.project(x)
    assert coeffs.shape == (32, U, D)
    torch.testing.assert_close(basis.reconstruct(coeffs), x - basis.mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(basis.reconstruct(coeffs, add_mean=True), x, rtol=0, atol=1e-9)
    # float32 inputs come back in the promoted dtype
    assert basis.to(dtype=torch.float32).project(x.float()).dtype == torch.float32


def test_project_with_pruning_is_orthogonal_projection(data: torch.Tensor) -> None:
    basis = _fit(data, 200).prune(k=5)
    x = data[:16]
    rec = basis.reconstruct(basis.project(x))  # [B, U, D]
    phi = basis.components[:, :5]  # [U, 5, D]
    expected = torch.einsum("bud,ukd,uke->bue", x - basis.mean, phi, phi)
    torch.testing.assert_close(rec, expected, rtol=0, atol=1e-9)
    assert (basis.project(x)[..., 5:] == 0).all()
    with pytest.raises(ValueError, match="x must be"):
        basis.project(x[:, :2])
    with pytest.raises(ValueError, match="coeffs must be"):
        basis.reconstruct(torch.zeros(2, U, D + 1))


def test_basis_validates_shapes(known_spectrum_basis: PCABasis) -> None:
    b = known_spectrum_basis
    with pytest.raises(ValueError, match="eigenvalues"):
        PCABasis(b.mean, b.components, b.eigenvalues[:, :3], b.explained_variance_ratio, b.mask, 5)
    with pytest.raises(ValueError, match="mask must be a bool"):
        PCABasis(b.mean, b.components, b.eigenvalues, b.explained_variance_ratio, b.mask.long(), 5)
