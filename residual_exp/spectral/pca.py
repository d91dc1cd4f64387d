"""Exact streaming PCA of many residual units at once, and the resulting PCA bases.

A *unit* is one residual contribution (embedding, one attention head, one MLP, a bias term)
read in the output space, so a batch of encoded images is a tensor ``[B, U, D]``. ResiDual
needs, for every unit u, the mean µ_u and the principal basis Φ_u of its outputs over a
reference dataset. :class:`StreamingPCA` accumulates exact sufficient statistics in float64
one batch at a time (one batched matmul per update) and :meth:`StreamingPCA.finalize`
turns them into a :class:`PCABasis`.

Statistics (per unit, c_u a fixed shift = the first batch's mean, y = x − c_u)::

    n            number of samples
    s_u  = Σ y           # [U, D]
    G_u  = Σ y yᵀ        # [U, D, D]
    µ_u  = c_u + s_u / n
    C_u  = (G_u − s_u s_uᵀ / n) / (n − 1)     (sample covariance, as sklearn's PCA)
    C_u  = Φ_uᵀ diag(λ_u) Φ_u,  λ_u sorted decreasingly, rows of Φ_u orthonormal

The shift c_u makes the result exact to float64 round-off even when ‖µ_u‖ ≫ σ_u (the
naive ``G/n − µµᵀ`` loses ≈ log10(‖µ‖²/σ²) digits), and makes constant units (bias
units) come out with exactly zero covariance. The covariance is shift-invariant, so this
changes nothing mathematically.

Conventions shared with ``sklearn.decomposition.PCA``: ``eigenvalues`` equal
``explained_variance_`` (n − 1 normalisation), ``explained_variance_ratio`` equals
``explained_variance_ratio_`` (λ_i / Σ_j λ_j), and each component's sign is chosen so that
its largest-|·| coordinate is positive (sklearn ≥ 1.5, ``svd_flip(u_based_decision=False)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..catalog import EvrRule, names

__all__ = ["PCABasis", "StreamingPCA", "num_components_for_evr"]

_FORMAT_KEY = "residual_exp.format"
_FORMAT_VALUE = "pca_basis/v1"
_N_SAMPLES_KEY = "residual_exp.n_samples"
_META_PREFIX = "meta."
_TENSOR_FIELDS = ("mean", "components", "eigenvalues", "explained_variance_ratio", "mask")


EVR_RULES = names(EvrRule)
UNREACHABLE = ("all", "one")


def num_components_for_evr(ratio: torch.Tensor, evr: float, rule: str = "strict",
                           unreachable: str = "all") -> torch.Tensor:
    """Per unit, the number of leading components kept for a target explained-variance ratio.

    With r the explained-variance ratios of one unit sorted decreasingly and R_k = r_1 + … + r_k::

        rule="strict"     k = min{ k : R_k >  evr }   (the official ResiDual code; sklearn's
                                                       PCA(n_components=evr) too)
        rule="inclusive"  k = min{ k : R_k >= evr }   (they differ only when R_k hits evr exactly)

    When no k qualifies (R_K does not pass evr: float round-off at evr = 1, or a basis already
    truncated below the target): ``unreachable="all"`` keeps all K (the default);
    ``unreachable="one"`` keeps 1, what the official code's ``(R > evr).argmax() + 1`` returns
    (bug (c), reproduced with ``compat=official``).  A unit with zero variance (all r = 0) keeps 0
    components with ``unreachable="all"``; with ``"one"`` it keeps 1, as the official code does.

    Args:
        ratio: explained-variance ratios, ``[K]`` or ``[U, K]``, each row sorted decreasingly.
        evr: target fraction in (0, 1].

    Returns:
        LongTensor ``[]`` (0-d) or ``[U]`` with values in 0..K.
    """
    if not 0.0 < float(evr) <= 1.0:
        raise ValueError(f"evr must be in (0, 1], got {evr!r}")
    if rule not in EVR_RULES:
        raise ValueError(f"EVR rule {rule!r}; valid: {', '.join(EVR_RULES)}")
    if unreachable not in UNREACHABLE:
        raise ValueError(f"unreachable={unreachable!r}; valid: {', '.join(UNREACHABLE)}")
    if ratio.ndim not in (1, 2):
        raise ValueError(f"ratio must be [K] or [U, K], got shape {tuple(ratio.shape)}")
    squeeze = ratio.ndim == 1
    r = ratio.unsqueeze(0) if squeeze else ratio  # [U, K]
    num_units, k_max = r.shape
    cum = r.to(torch.float64).cumsum(dim=1)  # [U, K]
    reached = cum > float(evr) if rule == "strict" else cum >= float(evr)  # [U, K]
    # first True index + 1; argmax of a bool row returns the first True (0 if none).
    first = reached.to(torch.int8).argmax(dim=1) + 1  # [U]
    if unreachable == "one":
        return (first[0] if squeeze else first).to(torch.long)
    k = torch.where(reached.any(dim=1), first, torch.full_like(first, k_max))  # [U]
    has_variance = r.sum(dim=1) > 0  # [U]
    k = torch.where(has_variance, k, torch.zeros_like(k)).to(torch.long)
    return k[0] if squeeze else k


def _sign_flip(components: torch.Tensor) -> torch.Tensor:
    """Make the largest-|·| coordinate of every component (last dim) positive. ``[..., K, D]``."""
    idx = components.abs().argmax(dim=-1, keepdim=True)  # [..., K, 1]
    signs = torch.sign(components.gather(-1, idx))  # [..., K, 1]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # all-zero rows: keep
    return components * signs


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file via a temp file in the same directory + ``os.replace``."""
    with atomic_path(path) as tmp:   # flushed to disk before the rename makes it visible
        save_file(tensors, str(tmp), metadata=metadata)


@dataclass
class PCABasis:
    """Per-unit PCA bases, stackable across units (every tensor has a leading U dim).

    Attributes:
        mean: ``[U, D]`` per-unit mean µ_u.
        components: ``[U, K, D]`` principal directions Φ_u as orthonormal rows, sorted by
            decreasing eigenvalue (K = D when fitted and not compacted).
        eigenvalues: ``[U, K]`` explained variance λ_u (sample covariance, n − 1), ≥ 0,
            decreasing. Equal to sklearn's ``explained_variance_``.
        explained_variance_ratio: ``[U, K]`` λ_ui / Σ_j λ_uj over *all* D components of the
            fitted unit (so it stays correct after :meth:`compact`); an all-zero row for a
            zero-variance unit (instead of sklearn's 0/0 = NaN).
        mask: ``[U, K]`` bool, the components kept by :meth:`prune` (all True when unpruned).
        n_samples: number of samples the basis was fitted on.
        meta: free-form string metadata (model, dataset, unit names, …), saved with the file.

    :meth:`project` / :meth:`reconstruct` honour ``mask``: dropped components get zero
    coefficients, so ``reconstruct(project(x))`` is the projection of ``x − µ`` onto the
    kept subspace (and exactly ``x − µ`` when nothing is dropped).
    """

    mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    explained_variance_ratio: torch.Tensor
    mask: torch.Tensor
    n_samples: int
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mean.ndim != 2:
            raise ValueError(f"mean must be [U, D], got shape {tuple(self.mean.shape)}")
        num_units, dim = self.mean.shape
        if self.components.ndim != 3 or self.components.shape[::2] != (num_units, dim):
            raise ValueError(
                f"components must be [U={num_units}, K, D={dim}], got {tuple(self.components.shape)}"
            )
        k = self.components.shape[1]
        for name in ("eigenvalues", "explained_variance_ratio", "mask"):
            shape = tuple(getattr(self, name).shape)
            if shape != (num_units, k):
                raise ValueError(f"{name} must be [U={num_units}, K={k}], got {shape}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {self.mask.dtype}")
        if not isinstance(self.n_samples, int) or self.n_samples < 0:
            raise ValueError(f"n_samples must be a non-negative int, got {self.n_samples!r}")
        self.meta = {str(key): str(value) for key, value in self.meta.items()}

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_units(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def num_components(self) -> int:
        """K, the number of stored components per unit (kept or not)."""
        return self.components.shape[1]

    def kept(self) -> torch.Tensor:
        """LongTensor ``[U]``: number of kept components per unit."""
        return self.mask.sum(dim=1)

    # ------------------------------------------------------------------ pruning
    def prune(self, evr: float | None = None, k: int | None = None, rule: str = "strict",
              unreachable: str = "all") -> PCABasis:
        """Return a copy whose ``mask`` keeps, per unit, a prefix of the components.

        Exactly one rule (or none) applies, always recomputed from all K stored components
        (the current mask is ignored, so pruning twice does not compound):

        - ``evr``: the smallest number of leading components whose cumulative EVR passes
          ``evr`` (``rule``: strict ``>``, the default, or inclusive ``>=``; see
          :func:`num_components_for_evr` for ``unreachable`` and the other edge cases);
        - ``k``: the first ``min(k, K)`` components of every unit;
        - neither: keep all K.

        Tensors keep their ``[U, K]`` shapes; use :meth:`compact` to trim K.
        """
        if evr is not None and k is not None:
            raise ValueError(f"pass at most one of evr={evr!r} and k={k!r}")
        num_units, k_max = self.mask.shape
        if evr is not None:
            counts = num_components_for_evr(self.explained_variance_ratio, evr, rule, unreachable)  # [U]
        elif k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"k must be a non-negative int, got {k!r}")
            counts = torch.full((num_units,), min(k, k_max), dtype=torch.long)
        else:
            counts = torch.full((num_units,), k_max, dtype=torch.long)
        positions = torch.arange(k_max, device=self.mask.device)  # [K]
        mask = positions[None, :] < counts.to(self.mask.device)[:, None]  # [U, K]
        return replace(self, mask=mask, meta=dict(self.meta))

    def compact(self) -> PCABasis:
        """Trim K to the last component any unit keeps (masked entries inside stay masked)."""
        any_kept = self.mask.any(dim=0)  # [K]
        new_k = int(any_kept.nonzero().max().item()) + 1 if bool(any_kept.any()) else 0
        return replace(
            self,
            components=self.components[:, :new_k].contiguous(),
            eigenvalues=self.eigenvalues[:, :new_k].contiguous(),
            explained_variance_ratio=self.explained_variance_ratio[:, :new_k].contiguous(),
            mask=self.mask[:, :new_k].contiguous(),
            meta=dict(self.meta),
        )

    def select(self, indices: Sequence[int] | torch.Tensor) -> PCABasis:
        """Subset (or reorder) units: a sequence/LongTensor of indices or a bool ``[U]`` mask."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (self.num_units,):
                raise ValueError(f"bool indices must be [U={self.num_units}], got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        if idx.ndim != 1 or (idx.numel() and idx.dtype.is_floating_point):
            raise ValueError(f"indices must be a 1-d sequence of ints, got {indices!r}")
        idx = idx.to(torch.long)
        if idx.numel() and (idx.min() < -self.num_units or idx.max() >= self.num_units):
            raise ValueError(f"indices out of range for U={self.num_units}: {idx.tolist()}")
        dev = self.mean.device
        return replace(
            self,
            mean=self.mean[idx.to(dev)],
            components=self.components[idx.to(dev)],
            eigenvalues=self.eigenvalues[idx.to(dev)],
            explained_variance_ratio=self.explained_variance_ratio[idx.to(dev)],
            mask=self.mask[idx.to(self.mask.device)],
            meta=dict(self.meta),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PCABasis:
        """Move to ``device`` and/or cast the float tensors to ``dtype`` (mask stays bool)."""
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return replace(
            self,
            mean=cast(self.mean),
            components=cast(self.components),
            eigenvalues=cast(self.eigenvalues),
            explained_variance_ratio=cast(self.explained_variance_ratio),
            mask=self.mask.to(device=device),
            meta=dict(self.meta),
        )

    # ------------------------------------------------------------------ projection
    def _check_x(self, x: torch.Tensor, name: str, last: int) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.num_units, last):
            raise ValueError(
                f"{name} must be [B, U={self.num_units}, {last}], got shape {tuple(x.shape)}"
            )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients of ``x − µ`` on the kept components: ``[B, U, D] -> [B, U, K]``.

        ``coeffs[b, u, i] = mask[u, i] · ⟨x[b, u] − µ_u, Φ_u[i]⟩``, i.e. ``(x − µ) Φᵀ``.
        """
        self._check_x(x, "x", self.dim)
        dtype = torch.promote_types(x.dtype, self.components.dtype)
        centred = x.to(dtype) - self.mean.to(dtype)  # [B, U, D]
        coeffs = torch.einsum("bud,ukd->buk", centred, self.components.to(dtype))  # [B, U, K]
        return coeffs * self.mask.to(device=coeffs.device, dtype=dtype)  # [B, U, K]

    def reconstruct(self, coeffs: torch.Tensor, add_mean: bool = False) -> torch.Tensor:
        """``Σ_i mask[u, i] · coeffs[b, u, i] Φ_u[i]`` (+ µ_u if ``add_mean``): ``[B, U, K] -> [B, U, D]``.

        Without ``add_mean`` this inverts :meth:`project` on ``x − µ`` (ResiDual works on
        centred units and does not add the mean back).
        """
        self._check_x(coeffs, "coeffs", self.num_components)
        dtype = torch.promote_types(coeffs.dtype, self.components.dtype)
        coeffs = coeffs.to(dtype) * self.mask.to(device=coeffs.device, dtype=dtype)  # [B, U, K]
        out = torch.einsum("buk,ukd->bud", coeffs, self.components.to(dtype))  # [B, U, D]
        return out + self.mean.to(dtype) if add_mean else out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Save to a safetensors file atomically (temp file in the same dir, then ``os.replace``)."""
        path = Path(path)
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in _TENSOR_FIELDS}
        metadata = {_FORMAT_KEY: _FORMAT_VALUE, _N_SAMPLES_KEY: str(self.n_samples)}
        metadata.update({_META_PREFIX + key: value for key, value in self.meta.items()})
        _atomic_save(tensors, metadata, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> PCABasis:
        """Load a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no PCA basis file at {path}")
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            metadata: Mapping[str, str] = fh.metadata() or {}
            if metadata.get(_FORMAT_KEY) != _FORMAT_VALUE:
                raise ValueError(
                    f"{path} is not a PCA basis file ({_FORMAT_KEY}={metadata.get(_FORMAT_KEY)!r}, "
                    f"expected {_FORMAT_VALUE!r})"
                )
            missing = [name for name in _TENSOR_FIELDS if name not in fh.keys()]
            if missing:
                raise ValueError(f"{path} lacks tensors {missing}")
            tensors = {name: fh.get_tensor(name) for name in _TENSOR_FIELDS}
        meta = {
            key[len(_META_PREFIX):]: value
            for key, value in metadata.items()
            if key.startswith(_META_PREFIX)
        }
        return cls(**tensors, n_samples=int(metadata[_N_SAMPLES_KEY]), meta=meta)


class StreamingPCA:
    """Exact PCA of ``num_units`` units of dimension ``dim``, fed one batch at a time.

    ``update(x)`` takes ``[B, U, D]`` (any float dtype; ``[B, D]`` is accepted when U = 1)
    and adds it to float64 statistics with a single batched matmul (``baddbmm`` over units:
    O(U·D²·B) flops, O(U·D²) memory — 1.8 GiB for U = 400, D = 768). ``finalize()``
    eigendecomposes each unit's sample covariance; the result equals
    ``sklearn.decomposition.PCA`` fitted on the concatenated batches (see module docstring).

    Example::

        acc = StreamingPCA(num_units=U, dim=D)
        for x in loader:            # x: [B, U, D]
            acc.update(x)
        basis = acc.finalize().prune(evr=0.9)
    """

    def __init__(self, num_units: int, dim: int, device: torch.device | str = "cpu") -> None:
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
            raise ValueError(f"num_units must be a positive int, got {num_units!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.num_units = num_units
        self.dim = dim
        self.device = torch.device(device)
        self.n_samples = 0
        f64 = dict(dtype=torch.float64, device=self.device)
        self._shift: torch.Tensor | None = None  # [U, D], set from the first non-empty batch
        self._sum = torch.zeros(num_units, dim, **f64)  # [U, D]   Σ (x − shift)
        self._gram = torch.zeros(num_units, dim, dim, **f64)  # [U, D, D] Σ (x − shift)(x − shift)ᵀ

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Accumulate a batch ``[B, U, D]`` (or ``[B, D]`` when U = 1). Empty batches are no-ops."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} "
                             f"{getattr(x, 'dtype', '')}")
        if x.ndim == 2 and self.num_units == 1:
            x = x[:, None, :]  # [B, 1, D]
        if x.ndim != 3 or x.shape[1:] != (self.num_units, self.dim):
            raise ValueError(
                f"x must be [B, U={self.num_units}, D={self.dim}], got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return
        x = x.to(device=self.device, dtype=torch.float64)  # [B, U, D]
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf values")
        if self._shift is None:
            self._shift = x.mean(dim=0)  # [U, D]
        y = (x - self._shift).transpose(0, 1).contiguous()  # [U, B, D]
        self._sum += y.sum(dim=1)  # [U, D]
        self._gram.baddbmm_(y.transpose(1, 2), y)  # [U, D, D] += [U, D, B] @ [U, B, D]
        self.n_samples += x.shape[0]

    @torch.no_grad()
    def covariance(self) -> torch.Tensor:
        """Sample covariance ``[U, D, D]`` (normalised by n − 1)."""
        self._check_enough()
        n = self.n_samples
        cov = self._gram - torch.einsum("ud,ue->ude", self._sum, self._sum) / n  # [U, D, D]
        return cov / (n - 1)

    def mean(self) -> torch.Tensor:
        """Mean ``[U, D]`` (float64)."""
        self._check_enough(minimum=1)
        assert self._shift is not None
        return self._shift + self._sum / self.n_samples

    def _check_enough(self, minimum: int = 2) -> None:
        if self.n_samples < minimum:
            raise ValueError(
                f"need at least {minimum} samples, StreamingPCA has seen {self.n_samples}"
            )

    @torch.no_grad()
    def finalize(
        self,
        dtype: torch.dtype = torch.float64,
        unit_chunk: int | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> PCABasis:
        """Eigendecompose every unit's covariance into a full (K = D, unpruned) :class:`PCABasis`.

        Args:
            dtype: dtype of the returned tensors (computation is float64; float32 halves
                the basis memory at real sizes).
            unit_chunk: units per ``eigh`` call (bounds the float64 workspace); default
                ≈ 256 MiB worth of ``[D, D]`` matrices.
            meta: string metadata stored in the basis.
        """
        self._check_enough()
        num_units, dim, n = self.num_units, self.dim, self.n_samples
        if unit_chunk is None:
            unit_chunk = max(1, (1 << 25) // (dim * dim))
        if unit_chunk < 1:
            raise ValueError(f"unit_chunk must be ≥ 1, got {unit_chunk}")
        out = dict(dtype=dtype, device=self.device)
        components = torch.empty(num_units, dim, dim, **out)  # [U, K=D, D]
        eigenvalues = torch.empty(num_units, dim, **out)  # [U, K]
        ratio = torch.empty(num_units, dim, **out)  # [U, K]
        for start in range(0, num_units, unit_chunk):
            sl = slice(start, min(start + unit_chunk, num_units))
            s = self._sum[sl]  # [u, D]
            cov = (self._gram[sl] - torch.einsum("ud,ue->ude", s, s) / n) / (n - 1)  # [u, D, D]
            cov = 0.5 * (cov + cov.transpose(1, 2))  # exact symmetry for eigh
            evals, evecs = torch.linalg.eigh(cov)  # ascending; evecs [u, D, K] as columns
            evals = evals.flip(-1).clamp_min(0.0)  # [u, K] decreasing, PSD round-off clipped
            comps = _sign_flip(evecs.flip(-1).transpose(1, 2))  # [u, K, D] rows
            total = evals.sum(dim=1, keepdim=True)  # [u, 1]
            safe_total = torch.where(total > 0, total, torch.ones_like(total))
            ratio_chunk = torch.where(total > 0, evals / safe_total, torch.zeros_like(evals))
            components[sl] = comps.to(dtype)
            eigenvalues[sl] = evals.to(dtype)
            ratio[sl] = ratio_chunk.to(dtype)
        mask = torch.ones(num_units, dim, dtype=torch.bool, device=self.device)
        basis = PCABasis(
            mean=self.mean().to(dtype),
            components=components,
            eigenvalues=eigenvalues,
            explained_variance_ratio=ratio,
            mask=mask,
            n_samples=n,
            meta=dict(meta or {}),
        )
        assert torch.isfinite(basis.explained_variance_ratio).all(), "EVR must never be NaN"
        return basis
