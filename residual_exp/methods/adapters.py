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

from ..catalog import Init, Needs, Others
from ..export import Accumulator, Folded
from ..spectral import PCABasis
from .base import Adapter, Context


def init_lambda(n: int, how: str, eigenvalues: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """λ initialisation: ``normal`` N(1, 1) (the paper's), ``ones``, or ``eigenvalues``
    (each PC's eigenvalue divided by the largest kept eigenvalue of its unit)."""
    if how == Init.normal:
        return 1.0 + torch.randn(n, generator=generator, dtype=torch.float64)
    if how == Init.ones:
        return torch.ones(n, dtype=torch.float64)
    if how == Init.eigenvalues:
        if eigenvalues is None:
            raise ValueError("method.init=eigenvalues needs a PCA basis")
        return eigenvalues.double().reshape(-1)[:n].clone()
    raise ValueError(f"method.init={how!r}; valid: {Init.normal} | {Init.ones} | {Init.eigenvalues}")


def warn_k_clamped(k: int | None, components: dict) -> bool:
    """``rank.k`` above a unit's number of components keeps all of them (clamped per unit, README): say so."""
    over = {g: int(n) for g, n in components.items() if k is not None and k > int(n)}
    if over:
        import logging
        logging.getLogger(__name__).warning(
            "rank.k=%d is more than the components of %s: those units keep all their components (k is clamped "
            "per unit)", k, ", ".join(f"{g} ({n})" for g, n in over.items()))
    return bool(over)


def prune_rule(evr_rule: str = "strict", compat: str = "none") -> dict:
    """Keyword arguments of :meth:`PCABasis.prune` for ``conventions.evr_rule`` and ``compat``
    (compat=official also keeps k=1 when a unit never reaches the EVR target, bug (c))."""
    return {"rule": evr_rule, "unreachable": "one" if compat == "official" else "all"}


def coordinate_basis(basis: PCABasis) -> PCABasis:
    """compat=official (a): the official spectral_adapter scales output *coordinates*,
    ``(f − µ) ⊙ λ``: the same reweighting with the identity as its "basis"."""
    D = basis.dim
    eye = torch.eye(D, dtype=basis.components.dtype)[None]
    ones = torch.ones(1, D, dtype=basis.eigenvalues.dtype)
    return PCABasis(mean=basis.mean, components=eye, eigenvalues=ones, explained_variance_ratio=ones / D,
                    mask=torch.ones(1, D, dtype=torch.bool), n_samples=basis.n_samples, meta=dict(basis.meta))


def _double(state: dict) -> dict:
    return {k: v.detach().double() if v.is_floating_point() else v for k, v in state.items()}


class ZeroShot(Adapter):
    """``base``: the frozen model's own feature."""

    @classmethod
    def build(cls, cfg, ctx: Context) -> "ZeroShot":
        return cls()

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return feature

    @classmethod
    def fold(cls, state, readout, cfg, layout, compat) -> Folded:
        return Folded(readout.layout_dim, feature=torch.eye(readout.layout_dim, dtype=torch.float64))


class LinearAdapter(Adapter):
    """``linear_adapter``: a D×D affine map on the output feature.  ``init="default"`` keeps
    ``nn.Linear``'s own random init (the official code's), ``"identity"`` starts at W = I, b = 0."""

    def __init__(self, dim: int, init: str = Init.default) -> None:
        super().__init__()
        if init not in (Init.default, Init.identity):
            raise ValueError(f"method.init={init!r} for linear_adapter; valid: {Init.default} | {Init.identity}")
        self.linear = nn.Linear(dim, dim)
        if init == Init.identity:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim))
                self.linear.bias.zero_()

    @classmethod
    def build(cls, cfg, ctx: Context) -> "LinearAdapter":
        return cls(ctx.output_dim, cfg.init)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.linear(feature)

    @classmethod
    def fold(cls, state, readout, cfg, layout, compat) -> Folded:
        st = _double(state)
        return Folded(readout.layout_dim, feature=st["linear.weight"], bias=st["linear.bias"])


class _Rest(Adapter):
    """What every unit-level adapter does with the units it does not select (``others``)."""

    def _init_rest(self, source, selected: list[int], num_units: int, others: str,
                   other_mean: torch.Tensor | None, batch_mean: bool) -> None:
        if others not in set(Others):
            raise ValueError(f"method.others={others!r}; valid: {' | '.join(Others)}")
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

    @staticmethod
    def selection(cfg, ctx: Context) -> tuple[list[int], torch.Tensor | None]:
        """``(selected unit indices, Σ of the reference means of the others or None)``."""
        layout, selected = ctx.source.layout, list(ctx.selected)
        if not selected:
            raise ValueError(f"method={cfg.name} reweights residual units, and none is selected")
        others = [i for i in range(len(layout)) if i not in set(selected)]
        other_mean = ctx.unit_bases.mean[others].sum(0) if ctx.unit_bases is not None and others else None  # [D]
        return selected, other_mean

    def _rest_inputs(self, batch: dict) -> dict:
        if self.others == "add" or (self.others == "mean" and self.batch_mean):
            return {"rest": self.source.sum_units(batch, self.others_idx.tolist())}   # [B, D]
        return {}

    def _add_rest(self, y: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
        if self.others == Others.add:
            return y + rest.to(y.dtype)
        if self.others == Others.mean:
            if self.batch_mean:               # compat=official (d): the current batch's mean
                return y + rest.to(y.dtype).mean(0, keepdim=True)
            return y + self.other_mean.to(y.dtype)                # the reference set's mean
        return y

    def lambda_state(self, layout):
        return {"lambda": self.lam}, [layout.names[i] for i in self.selected.tolist()]

    def lambda_values(self) -> torch.Tensor:
        return self.lam.detach().flatten().float().cpu()

    @classmethod
    def fold(cls, state, readout, cfg, layout, compat) -> Folded:
        """The selected units' maps (:meth:`_fold_units`), then the other units as ``others`` says."""
        st = _double(state)
        acc = Accumulator(readout)
        cls._fold_units(acc, st, readout, cfg, layout)
        folded, others = acc.f, cfg["others"]
        rest = [int(u) for u in st["others_idx"].tolist()]
        batch_mean = compat == "official" and others == Others.mean
        if others == Others.add or batch_mean:
            tgt = acc if others == Others.add else Accumulator(readout)   # batch mean: a fold of its own
            for u in rest:
                g, p = tgt.pos[u]
                G = readout.maps(g)                                    # None: stored as units (MAP readouts)
                tgt.add(u, G[p].double() if G is not None else torch.eye(readout.layout_dim, dtype=torch.float64))
            if batch_mean:
                folded.batch_mean = tgt.f
        elif others == Others.mean:
            folded.bias += st["other_mean"]
        return folded


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

    needs = Needs.units

    def __init__(self, blocks: list[tuple[str, list[int], PCABasis]], source, num_units: int,
                 others: str = "drop", other_mean: torch.Tensor | None = None, dropped_value: float = 0.0,
                 init: str = "normal", generator: torch.Generator | None = None, from_feature: bool = False,
                 square_transpose: bool = False, batch_mean: bool = False) -> None:
        super().__init__()
        self.from_feature = from_feature
        if from_feature:
            self.needs = Needs.feature
        selected = [u for _, idx, _ in blocks for u in idx]
        self._init_rest(source, selected, num_units, Others.drop if from_feature else others, other_mean, batch_mean)
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
            comps = b.components.to("cpu", torch.float64)                                 # [S, K, D]
            C = comps if G is None else torch.einsum("skd,sdr->skr", comps, G.to("cpu", torch.float64))
            coeff_maps.append(C)                                                          # [S, K, R] (float64)
            offsets.append(torch.einsum("skd,sd->sk", comps, b.mean.to("cpu", torch.float64)))   # [S, K] Φ µ
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

    @classmethod
    def build(cls, cfg, ctx: Context) -> "SpectralReweighting":
        """λ per kept PC of the selected units (residual_fine / residual_full)."""
        selected, other_mean = cls.selection(cfg, ctx)
        blocks = ctx.unit_bases.blocks(selected)
        # the official code zero-pads every unit's basis to the largest K; square (K = D) bases are
        # then reconstructed with their transpose (bug b)
        square = ctx.official and max(b.num_components for _, _, b in blocks) == ctx.unit_bases.dim
        rule = prune_rule(ctx.evr_rule, ctx.compat)
        warn_k_clamped(ctx.k, {grp: b.num_components for grp, _, b in blocks})
        blocks = [(grp, idx, b.prune(evr=ctx.evr, k=ctx.k, **rule).compact()) for grp, idx, b in blocks]
        return cls(blocks, ctx.source, len(ctx.source.layout), others=cfg.others, other_mean=other_mean,
                   dropped_value=cfg.dropped_value, init=cfg.init, generator=ctx.generator(),
                   square_transpose=square, batch_mean=ctx.official)

    def lambda_state(self, layout):
        units = ["output"] if self.from_feature else [layout.names[i] for i in self.selected.tolist()]
        return {"lambda": self.lambdas(), "mask": self.mask}, units

    def lambda_values(self) -> torch.Tensor:
        with torch.no_grad():
            return self.lambdas().detach()[self.mask.bool()].flatten().float().cpu()

    def kept_components(self) -> int:
        return int(self.mask.sum())

    @staticmethod
    def _flat(st: dict, dropped_value: float) -> torch.Tensor:
        full = torch.full(st["trained"].shape, float(dropped_value), dtype=torch.float64)
        return full.masked_scatter(st["trained"].bool(), st["lam"])                 # [F]

    @classmethod
    def _fold_units(cls, acc: Accumulator, st: dict, readout, cfg, layout: str) -> None:
        """Each selected unit's ``R_uᵀ diag(λ_u) C_u`` on its lifted input (or on the unit itself:
        dense layout), minus ``R_uᵀ (λ_u ⊙ Φ_u µ_u)``."""
        lam_flat, row = cls._flat(st, cfg["dropped_value"]), 0
        for i, (g, pos, units) in enumerate(readout.blocks([int(u) for u in st["selected"].tolist()])):
            C, off, valid = st[f"C{i}"], st[f"offset{i}"], st[f"valid{i}"].bool()
            for s, u in enumerate(units):
                keep = valid[s]
                n = int(keep.sum())
                R, lam = st["recon"][row:row + n], lam_flat[row:row + n]          # [n, D], [n]
                acc.f.bias += -(R.T @ (lam * off[s][keep]))                       # [D]
                Fu = R.T @ (lam[:, None] * C[s][keep])        # [D, R_lift]  (or [D, D] on units: dense)
                (acc.add_unit_map if layout == "dense" else acc.add)(u, Fu)
                row += n

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


class OutputSpectral(SpectralReweighting):
    """``spectral_adapter``: λ per principal component of the model's output feature,
    ``Φᵀ diag(λ) Φ (f − µ)`` (compat=official: of its coordinates, bug a)."""
    needs = Needs.feature

    @classmethod
    def build(cls, cfg, ctx: Context) -> "OutputSpectral":
        warn_k_clamped(ctx.k, {"output": ctx.output_basis.num_components})
        basis = ctx.output_basis.prune(evr=ctx.evr, k=ctx.k, **prune_rule(ctx.evr_rule, ctx.compat))
        basis = coordinate_basis(basis) if ctx.official else basis.compact()
        return cls([("output", [0], basis)], None, 1, dropped_value=cfg.dropped_value, init=cfg.init,
                   generator=ctx.generator(), from_feature=True)

    @classmethod
    def fold(cls, state, readout, cfg, layout, compat) -> Folded:
        st = _double(state)
        lam_flat = cls._flat(st, cfg["dropped_value"])
        C, off, valid = st["C0"], st["offset0"], st["valid0"].bool()
        Fm = st["recon"].T @ (lam_flat[:, None] * C[valid])                         # [D, D] on f
        return Folded(readout.layout_dim, feature=Fm, bias=-(st["recon"].T @ (lam_flat * off[valid])))


class HeadScaling(_Rest):
    """``residual_coarse``: one scalar per selected unit on the raw (uncentred) units,
    ``Σ_u λ_u x_u``; each unit is read as ``G_u x_u`` from its lifted input (identity for dense
    storage), so the prepared tensor is head_dim + 3 wide per head, not D."""

    needs = Needs.units

    def __init__(self, selected: list[int], source, num_units: int, others: str = Others.drop,
                 other_mean: torch.Tensor | None = None, init: str = Init.normal,
                 generator: torch.Generator | None = None, batch_mean: bool = False) -> None:
        super().__init__()
        if init == Init.eigenvalues:
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

    @classmethod
    def build(cls, cfg, ctx: Context) -> "HeadScaling":
        selected, other_mean = cls.selection(cfg, ctx)
        return cls(selected, ctx.source, len(ctx.source.layout), others=cfg.others, other_mean=other_mean,
                   init=cfg.init, generator=ctx.generator(), batch_mean=ctx.official)

    @classmethod
    def _fold_units(cls, acc: Accumulator, st: dict, readout, cfg, layout: str) -> None:
        """Each selected unit scaled by its λ: ``λ_u G_u`` on its lifted input (identity when dense)."""
        start, D = 0, readout.layout_dim
        for i, (g, pos, units) in enumerate(readout.blocks([int(u) for u in st["selected"].tolist()])):
            G, lam = st[f"G{i}"], st["lam"][start:start + len(units)]
            for s, u in enumerate(units):
                if G.numel():
                    acc.add(u, lam[s] * G[s].T)                                   # stored [S, R, D]
                else:
                    acc.add_unit_map(u, lam[s] * torch.eye(D, dtype=torch.float64))
            start += len(units)

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
