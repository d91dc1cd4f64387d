"""Rank-aware per-unit PCA of a whole unit layout, fitted in the lifted space.

Every unit is ``unit_u = G_u · x_u`` with a small per-image lifted input ``x_u`` ``[R]`` and a
fixed map ``G_u`` ``[D, R]`` (:mod:`residual_exp.decompose.readout`; R = head_dim + 3 for a head,
D + 3 for the embedding and the MLPs, and ``G = I`` for stored dense units).  So the unit's
covariance is ``G C_x Gᵀ`` and its mean ``G x̄``: :class:`GroupPCA` accumulates the exact float64
statistics of the lifted inputs — ``[R, R]`` per head instead of ``[D, D]``, ~(D/R)² less work —
and :func:`lifted_basis` eigendecomposes ``G C_x Gᵀ`` through the QR factorisation ``G = Q T``:
``G C_x Gᵀ = Q (T C_x Tᵀ) Qᵀ``, an ``[m, m]`` problem (m = min(D, R)) whose eigenvectors ``V``
give the unit's principal directions ``(Q V)ᵀ``.  Exact: the same eigenpairs as the PCA of the
D-dimensional units (tested against the dense path and scikit-learn).

Components kept per unit follow the official code's accounting (``UnitSource.rank``): a head
keeps its first ``min(head_dim, D, n)`` components, the embedding and each MLP
``min(width, D, n)``.  :class:`UnitBases` holds one :class:`PCABasis` per unit group, each with
its own K, so nothing is padded to D×D (a ViT-L/14 head basis is 64 × 768, not 768 × 768).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..decompose.readout import GROUPS
from .pca import PCABasis, StreamingPCA, _sign_flip

GROUP_ORDER = GROUPS          # the low-rank groups, in the readout's order


@torch.no_grad()
def lifted_basis(cov: torch.Tensor, mean: torch.Tensor, maps: torch.Tensor | None, k: int,
                 n_samples: int, meta: dict | None = None) -> PCABasis:
    """PCA of units ``G_s x_s`` from the lifted covariance ``cov`` ``[S, R, R]`` and mean ``[S, R]``.

    ``maps`` ``[S, D, R]`` (None: the lifted inputs are the units, ``G = I``).  Returns a
    :class:`PCABasis` with the leading ``k`` components per unit (float64); explained-variance
    ratios are relative to the unit's total variance (all components).
    """
    cov, mean = cov.double(), mean.double()
    S = cov.shape[0]
    if maps is None:
        small, Q, unit_mean = cov, None, mean                                  # [S, D, D]
    else:
        G = maps.to(device=cov.device, dtype=torch.float64)                     # [S, D, R]
        Q, T = torch.linalg.qr(G, mode="reduced")                              # [S, D, m], [S, m, R]
        small = T @ cov @ T.transpose(1, 2)                                    # [S, m, m]
        unit_mean = torch.einsum("sdr,sr->sd", G, mean)                        # [S, D]
    small = 0.5 * (small + small.transpose(1, 2))
    evals, vecs = torch.linalg.eigh(small)                                     # ascending
    evals = evals.flip(-1).clamp_min(0.0)                                      # [S, m] decreasing
    vecs = vecs.flip(-1)                                                       # [S, m, m] columns
    comps = (vecs if Q is None else Q @ vecs).transpose(1, 2)                  # [S, m, D] rows
    comps = _sign_flip(comps)
    total = evals.sum(1, keepdim=True)
    ratio = torch.where(total > 0, evals / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.zeros_like(evals))
    m, D = comps.shape[1], comps.shape[2]
    if m < k:                                                                  # fewer directions than kept slots
        pad = k - m
        comps = torch.cat([comps, comps.new_zeros(S, pad, D)], 1)
        evals = torch.cat([evals, evals.new_zeros(S, pad)], 1)
        ratio = torch.cat([ratio, ratio.new_zeros(S, pad)], 1)
    mask = torch.ones(S, k, dtype=torch.bool, device=cov.device)
    mask[:, m:] = False
    return PCABasis(mean=unit_mean, components=comps[:, :k].contiguous(), eigenvalues=evals[:, :k].contiguous(),
                    explained_variance_ratio=ratio[:, :k].contiguous(), mask=mask, n_samples=int(n_samples),
                    meta=dict(meta or {}))


class UnitBases:
    """The PCA bases of every unit of a layout, one rank-aware :class:`PCABasis` per group.

    ``groups[g] = (unit indices in layout order, basis of those units)``.  :meth:`blocks` hands
    a method the bases of its units group by group (the order of its parameters);
    :meth:`select` gives one :class:`PCABasis` of any units (zero-padded to the largest K among
    them, padded components masked out) for the analyses.
    """

    def __init__(self, groups: dict[str, tuple[list[int], PCABasis]], num_units: int) -> None:
        self.groups = {g: (list(map(int, idx)), b) for g, (idx, b) in groups.items() if idx}
        self.num_units = int(num_units)
        bases = [b for _, b in self.groups.values()]
        self.dim = bases[0].dim
        self.n_samples = bases[0].n_samples
        self.meta = dict(bases[0].meta)
        self._where = {u: (g, p) for g, (idx, _) in self.groups.items() for p, u in enumerate(idx)}
        missing = [u for u in range(self.num_units) if u not in self._where]
        if missing:
            raise ValueError(f"unit bases lack units {missing[:8]}")

    @property
    def mean(self) -> torch.Tensor:
        """``[U, D]`` per-unit means."""
        out = None
        for idx, b in self.groups.values():
            if out is None:
                out = b.mean.new_zeros(self.num_units, self.dim)
            out[idx] = b.mean
        return out

    def num_components(self, unit: int) -> int:
        g, _ = self._where[int(unit)]
        return self.groups[g][1].num_components

    def blocks(self, indices) -> list[tuple[str, list[int], PCABasis]]:
        """``[(group, unit indices, basis of those units)]`` in group order, layout order within."""
        wanted = {int(i) for i in indices}
        out = []
        for g in GROUP_ORDER:
            if g not in self.groups:
                continue
            idx, basis = self.groups[g]
            pos = [p for p, u in enumerate(idx) if u in wanted]
            if pos:
                out.append((g, [idx[p] for p in pos], basis.select(pos)))
        return out

    def select(self, indices) -> PCABasis:
        """One :class:`PCABasis` of ``indices`` (in that order), zero-padded to their largest K."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("select() of no unit")
        parts = []
        for u in indices:
            g, p = self._where[u]
            parts.append(self.groups[g][1].select([p]))
        k = max(b.num_components for b in parts)
        pad = lambda t, fill: torch.cat([t, t.new_full((t.shape[0], k - t.shape[1], *t.shape[2:]), fill)], 1)
        return PCABasis(mean=torch.cat([b.mean for b in parts]),
                        components=torch.cat([pad(b.components, 0.0) for b in parts]),
                        eigenvalues=torch.cat([pad(b.eigenvalues, 0.0) for b in parts]),
                        explained_variance_ratio=torch.cat([pad(b.explained_variance_ratio, 0.0) for b in parts]),
                        mask=torch.cat([pad(b.mask, False) for b in parts]), n_samples=parts[0].n_samples,
                        meta=dict(parts[0].meta))

    def to(self, device=None, dtype=None) -> "UnitBases":
        return UnitBases({g: (idx, b.to(device=device, dtype=dtype)) for g, (idx, b) in self.groups.items()},
                         self.num_units)

    # --- persistence: a folder with one safetensors file per group + groups.json ------------
    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            for g, (_, b) in self.groups.items():
                b.save(tmp / f"{g}.safetensors")
            (tmp / "groups.json").write_text(json.dumps(
                {"num_units": self.num_units, "groups": {g: idx for g, (idx, _) in self.groups.items()}}))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> "UnitBases":
        folder = Path(folder)
        index = json.loads((folder / "groups.json").read_text())
        groups = {g: (idx, PCABasis.load(folder / f"{g}.safetensors", device=device))
                  for g, idx in index["groups"].items()}
        return cls(groups, index["num_units"])


class GroupPCA:
    """Streaming PCA of every unit of a :class:`~residual_exp.decompose.readout.UnitSource`,
    accumulated per group on the lifted inputs (float64, exact: see the module docstring)."""

    def __init__(self, source, device: str | torch.device = "cpu") -> None:
        self.source, self.device = source, device
        self.pcas: dict[str, StreamingPCA] = {}

    def update(self, batch: dict) -> None:
        for g, idx in self.source.groups.items():
            if not idx:
                continue
            x = self.source.lift(batch, g).to(torch.float64)                   # [B, S, R]
            if g not in self.pcas:
                self.pcas[g] = StreamingPCA(x.shape[1], x.shape[2], device=self.device)
            self.pcas[g].update(x)

    def finalize(self, meta: dict | None = None) -> UnitBases:
        groups = {}
        for g, pca in self.pcas.items():
            n = pca.n_samples
            groups[g] = (self.source.groups[g], lifted_basis(pca.covariance(), pca.mean(), self.source.maps(g),
                                                             self.source.rank(g, n), n, meta))
        return UnitBases(groups, len(self.source.layout))
