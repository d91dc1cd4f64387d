"""The seven ways to adapt a frozen model (DESIGN.md §1), as small ``nn.Module`` adapters.

Every adapter maps what the encoder produced to an adapted image feature ``[B, D]`` that
the frozen :class:`~residual_exp.classifiers.ClassifierHead` turns into logits.  An adapter
works in two steps so that training never needs the backbone:

* ``prepare(batch) -> dict`` — a per-sample transform of the stored encodings (``batch``: the
  tensors of :mod:`residual_exp.encode`, low-rank or dense, always with ``feature``) that does
  not depend on the trainable parameters, e.g. the PCA coefficients of each selected unit.  It
  is applied once to a cached split (or per batch when streamed, or to the live backbone
  output with ``method.cache=false``).  Units are read through a
  :class:`~residual_exp.decompose.readout.UnitSource`: for the low-rank cache a head's
  coefficients come straight from its head_dim activations (``C = Φ G``), never through D.
* ``forward(**prepared) -> [B, D]`` — the cheap trainable part.

``needs`` says what ``prepare`` reads: ``feature`` (the model's output) or ``units``.
``finetune`` is different: it trains the image tower and takes images.

============================  ===============================================  ==============
name                          adapted feature                                  parameters
============================  ===============================================  ==============
``base``                      f                                                0
``linear_adapter``            W f + b   (nn.Linear's init; ``init=identity``)   D² + D
``spectral_adapter``          Φᵀ diag(λ) Φ (f − µ)   over the output's PCs       D
``residual_coarse``           Σ_h λ_h x_h   (heads; other units dropped)          #heads
``residual_fine``             Σ_h Φ_hᵀ diag(λ_h) Φ_h (x_h − µ_h), EVR-pruned     Σ_h kept_h
``residual_full``             Σ_u RD_u(x_u) + Σ_other x_u   (heads + MLPs)        Σ_u K_u
============================  ===============================================  ==============

K_u follows the official accounting (``min(head_dim, D)`` per head, ``min(width, D)`` per MLP).
The official code's bugs are reproduced only with ``compat=official`` (see FIDELITY.md):
``coordinate_basis`` (a, spectral_adapter), ``square_transpose`` (b, residual_full) and
``batch_mean`` (d, ``others=mean``); (c) is an EVR rule (``PCABasis.prune``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..spectral import PCABasis


def init_lambda(n: int, how: str, eigenvalues: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """λ initialisation: ``normal`` N(1, 1) (the paper's), ``ones``, or ``eigenvalues``
    (each PC's eigenvalue divided by the largest kept eigenvalue of its unit)."""
    if how == "normal":
        return 1.0 + torch.randn(n, generator=generator, dtype=torch.float64)
    if how == "ones":
        return torch.ones(n, dtype=torch.float64)
    if how == "eigenvalues":
        if eigenvalues is None:
            raise ValueError("method.init=eigenvalues needs a PCA basis")
        return eigenvalues.double().reshape(-1)[:n].clone()
    raise ValueError(f"method.init={how!r}; valid: normal | ones | eigenvalues")


def _check_others(others: str) -> None:
    if others not in ("drop", "mean", "add"):
        raise ValueError(f"method.others={others!r}; valid: drop | mean | add")


class Adapter(nn.Module):
    needs = "feature"

    def prepare(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"feature": batch["feature"]}

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class ZeroShot(Adapter):
    """``base``: the frozen model's own feature."""

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return feature


class LinearAdapter(Adapter):
    """``linear_adapter``: a D×D affine map on the output feature.  ``init="default"`` keeps
    ``nn.Linear``'s own random init (the official code's), ``"identity"`` starts at W = I, b = 0."""

    def __init__(self, dim: int, init: str = "default") -> None:
        super().__init__()
        if init not in ("default", "identity"):
            raise ValueError(f"method.init={init!r} for linear_adapter; valid: default | identity")
        self.linear = nn.Linear(dim, dim)
        if init == "identity":
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim))
                self.linear.bias.zero_()

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.linear(feature)


class _Rest(Adapter):
    """What every unit-level adapter does with the units it does not select (``others``)."""

    def _init_rest(self, source, selected: list[int], num_units: int, others: str,
                   other_mean: torch.Tensor | None, batch_mean: bool) -> None:
        _check_others(others)
        self.others, self.batch_mean = others, bool(batch_mean)
        self._source = (source,)                                  # not a submodule: prepare() only
        self.register_buffer("selected", torch.tensor(selected, dtype=torch.long))
        self.register_buffer("others_idx", torch.tensor([i for i in range(num_units) if i not in set(selected)],
                                                        dtype=torch.long))
        dim = source.layout_dim if source is not None else 1
        self.register_buffer("other_mean", other_mean.clone() if other_mean is not None else torch.zeros(dim))

    @property
    def source(self):
        return self._source[0]

    def _rest_inputs(self, batch: dict) -> dict:
        if self.others == "add" or (self.others == "mean" and self.batch_mean):
            return {"rest": self.source.sum_units(batch, self.others_idx.tolist())}   # [B, D]
        return {}

    def _add_rest(self, y: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
        if self.others == "add":
            return y + rest.to(y.dtype)
        if self.others == "mean":
            if self.batch_mean:               # compat=official (d): the current batch's mean
                return y + rest.to(y.dtype).mean(0, keepdim=True)
            return y + self.other_mean.to(y.dtype)                # the reference set's mean
        return y


class SpectralReweighting(_Rest):
    """λ per principal component of a set of units (the core of ResiDual).

    ``RD_u(x) = Φ_uᵀ diag(λ_u) Φ_u (x_u − µ_u)`` summed over the selected units, plus the
    other units dropped / replaced by their mean / added unchanged.  ``blocks`` are
    ``(group, unit indices, PCABasis)`` triples (:meth:`UnitBases.blocks`, pruned), each with
    its own number of components; every active component of every unit is one row of the flat
    ``[F, D]`` matrices below, so the forward is one GEMM ``(c ⊙ λ) · R``.  λ is one flat
    parameter over the *kept* components (so the count equals Σ kept); pruned components get
    the fixed ``dropped_value`` (0 removes them, 1 passes them through).

    ``from_feature``: one "unit", the model's output feature (``spectral_adapter``).
    ``square_transpose`` (compat b): reconstruct unit u with the transposed top-left
    ``K_u × K_u`` block of its components, as the official code does when its zero-padded
    bases are square.
    """

    needs = "units"

    def __init__(self, blocks: list[tuple[str, list[int], PCABasis]], source, num_units: int,
                 others: str = "drop", other_mean: torch.Tensor | None = None, dropped_value: float = 0.0,
                 init: str = "normal", generator: torch.Generator | None = None, from_feature: bool = False,
                 square_transpose: bool = False, batch_mean: bool = False) -> None:
        super().__init__()
        self.from_feature = from_feature
        if from_feature:
            self.needs = "feature"
        selected = [u for _, idx, _ in blocks for u in idx]
        self._init_rest(source, selected, num_units, "drop" if from_feature else others, other_mean, batch_mean)
        self.dropped_value = float(dropped_value)
        self.groups = [g for g, _, _ in blocks]
        k_max = max(b.num_components for _, _, b in blocks)
        masks, coeff_maps, offsets, recon, valids, trained, eig = [], [], [], [], [], [], []
        self.positions = []                       # per block: the units' positions in their source group
        for g, idx, b in blocks:
            S, K, D = b.components.shape
            # rows of the flat matrices: the kept components, or every stored one when the pruned
            # ones pass with a fixed λ = dropped_value
            valid = b.mask if self.dropped_value == 0 else torch.ones_like(b.mask)     # [S, K]
            self.positions.append([] if from_feature else [source.groups[g].index(int(u)) for u in idx])
            G = None if from_feature else source.maps(g)
            G = None if G is None else G[self.positions[-1]]                              # [S, D, R]
            comps = b.components.to(torch.float64)                                        # [S, K, D]
            C = comps if G is None else torch.einsum("skd,sdr->skr", comps, G.to(torch.float64).cpu())
            coeff_maps.append(C)                                                          # [S, K, R] (float64)
            offsets.append(torch.einsum("skd,sd->sk", comps, b.mean.double()))             # [S, K] Φ µ
            R = comps
            if square_transpose:                  # compat (b): R_u[k, d] = Φ_u[d, k] for d < K_u
                R = torch.zeros_like(comps)
                R[:, :, :K] = comps[:, :, :K].transpose(1, 2)
            recon.append(R[valid])                                                        # [F_b, D]
            valids.append(valid)
            trained.append(b.mask[valid])
            masks.append(torch.nn.functional.pad(b.mask, (0, k_max - K)))
            e = b.eigenvalues / b.eigenvalues[:, :1].clamp_min(1e-30)
            eig.append(e[b.mask])
        for i, (C, off, valid) in enumerate(zip(coeff_maps, offsets, valids)):
            self.register_buffer(f"C{i}", C)
            self.register_buffer(f"offset{i}", off)
            self.register_buffer(f"valid{i}", valid)
        self.register_buffer("recon", torch.cat(recon))                       # [F, D] reconstruction rows
        self.register_buffer("trained", torch.cat(trained))                   # [F] trainable λ entries
        self.register_buffer("mask", torch.cat(masks))                        # [S, K_max] kept PCs (λ file)
        n = int(self.mask.sum())
        self.lam = nn.Parameter(init_lambda(n, init, torch.cat(eig), generator).float())

    def lambdas(self) -> torch.Tensor:
        """λ as a dense ``[S, K_max]`` matrix (pruned / absent components hold ``dropped_value``)."""
        full = torch.full(self.mask.shape, self.dropped_value, dtype=self.lam.dtype, device=self.lam.device)
        return full.masked_scatter(self.mask, self.lam)                     # [S, K]

    def _flat_lambda(self) -> torch.Tensor:
        full = torch.full(self.trained.shape, self.dropped_value, dtype=self.lam.dtype, device=self.lam.device)
        return full.masked_scatter(self.trained, self.lam)                  # [F]

    def prepare(self, batch: dict) -> dict:
        parts = []
        for i, g in enumerate(self.groups):
            C = getattr(self, f"C{i}")
            if self.from_feature:
                x = batch["feature"][:, None].to(C.dtype)                          # [B, 1, D]
            else:
                x = self.source.lift(batch, g)[:, self.positions[i]].to(C.dtype)   # [B, S, R]
            coeffs = torch.einsum("bsr,skr->bsk", x, C) - getattr(self, f"offset{i}")   # [B, S, K]
            parts.append(coeffs[:, getattr(self, f"valid{i}")])                    # [B, F_b]
        out = {"coeffs": torch.cat(parts, 1)}                                      # [B, F]
        if not self.from_feature:
            out.update(self._rest_inputs(batch))
        return out

    def forward(self, coeffs: torch.Tensor, rest: torch.Tensor | None = None) -> torch.Tensor:
        y = (coeffs * self._flat_lambda().to(coeffs.dtype)) @ self.recon.to(coeffs.dtype)   # [B, D]
        return self._add_rest(y, rest)


class HeadScaling(_Rest):
    """``residual_coarse``: one scalar per selected unit on the raw (uncentred) units,
    ``Σ_u λ_u x_u``; each unit is read as ``G_u x_u`` from its lifted input (identity for dense
    storage), so the prepared tensor is head_dim + 3 wide per head, not D."""

    needs = "units"

    def __init__(self, selected: list[int], source, num_units: int, others: str = "drop",
                 other_mean: torch.Tensor | None = None, init: str = "normal",
                 generator: torch.Generator | None = None, batch_mean: bool = False) -> None:
        super().__init__()
        if init == "eigenvalues":
            raise ValueError("method.init=eigenvalues is meaningless for residual_coarse (no PCs)")
        blocks = source.blocks(selected)
        self._init_rest(source, [u for _, _, idx in blocks for u in idx], num_units, others, other_mean, batch_mean)
        self.groups = [(g, pos) for g, pos, _ in blocks]
        self.sizes = [len(pos) for _, pos, _ in blocks]
        for i, (g, pos, _) in enumerate(blocks):
            G = source.maps(g)
            self.register_buffer(f"G{i}", (G[pos].permute(0, 2, 1).contiguous() if G is not None
                                          else torch.zeros(0)))              # [S, R, D] or empty: identity
        self.lam = nn.Parameter(init_lambda(len(self.selected), init, generator=generator).float())

    def prepare(self, batch: dict) -> dict:
        out = {f"x{i}": self.source.lift(batch, g)[:, pos] for i, (g, pos) in enumerate(self.groups)}   # [B, S, R]
        out.update(self._rest_inputs(batch))
        return out

    def forward(self, rest: torch.Tensor | None = None, **xs: torch.Tensor) -> torch.Tensor:
        y, start = 0, 0
        for i, n in enumerate(self.sizes):
            x = xs[f"x{i}"]
            lam = self.lam[start:start + n].to(x.dtype)
            G = getattr(self, f"G{i}")
            if G.numel() == 0:
                y = y + torch.einsum("bsd,s->bd", x, lam)                          # dense: the units themselves
            else:
                B, S, R = x.shape
                y = y + (x * lam[None, :, None]).reshape(B, S * R) @ G.to(x.dtype).reshape(S * R, -1)
            start += n
        return self._add_rest(y, rest)
