"""The seven ways to adapt a frozen model (DESIGN.md §1), as small ``nn.Module`` adapters.

Every adapter maps what the encoder produced to an adapted image feature ``[B, D]`` that
the frozen :class:`~residual_exp.classifiers.ClassifierHead` turns into logits.  An adapter
works in two steps so that training never needs the backbone:

* ``prepare(units, feature) -> dict`` — a per-sample transform of the encoder output that
  does not depend on the trainable parameters (e.g. the PCA coefficients of each selected
  unit).  It is applied once to the cached encodings (or per batch when they are streamed,
  or to the live backbone output with ``method.cache=false``).
* ``forward(**prepared) -> [B, D]`` — the cheap trainable part.

``needs`` says what ``prepare`` reads: ``feature`` (the model's output) or ``units``.
``finetune`` is different: it trains the image tower and takes images.

============================  ===============================================  ==============
name                          adapted feature                                  parameters
============================  ===============================================  ==============
``base``                      f                                                0
``linear_adapter``            W f + b   (W = I, b = 0 at init)                   D² + D
``spectral_adapter``          Φᵀ diag(λ) Φ (f − µ)   over the output's PCs       D
``residual_coarse``           Σ_h λ_h x_h   (heads; other units dropped)          #heads
``residual_fine``             Σ_h Φ_hᵀ diag(λ_h) Φ_h (x_h − µ_h), EVR-pruned     Σ_h kept_h
``residual_full``             Σ_u RD_u(x_u) + Σ_other x_u   (heads + MLPs)        (#heads+#MLPs)·D
============================  ===============================================  ==============
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


class Adapter(nn.Module):
    needs = "feature"

    def prepare(self, units: torch.Tensor | None, feature: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"feature": feature}

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class ZeroShot(Adapter):
    """``base``: the frozen model's own feature."""

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return feature


class LinearAdapter(Adapter):
    """``linear_adapter``: a D×D affine map on the output feature, initialised to identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.linear(feature)


class SpectralReweighting(Adapter):
    """λ per principal component of a stack of units (the core of ResiDual).

    ``RD_u(x) = Φ_uᵀ diag(λ_u) Φ_u (x_u − µ_u)`` summed over the selected units, plus the
    other units dropped / replaced by their reference mean / added unchanged.  λ is one flat
    parameter over the *kept* components only (so the count equals Σ kept); pruned
    components get the fixed ``dropped_value`` (0 removes them, 1 passes them through).
    """

    needs = "units"

    def __init__(self, basis: PCABasis, selected: list[int], num_units: int, others: str = "drop",
                 other_mean: torch.Tensor | None = None, dropped_value: float = 0.0, init: str = "normal",
                 generator: torch.Generator | None = None, from_feature: bool = False) -> None:
        super().__init__()
        if others not in ("drop", "mean", "add"):
            raise ValueError(f"method.others={others!r}; valid: drop | mean | add")
        assert basis.mean.shape[0] == len(selected), (basis.mean.shape, len(selected))
        self.from_feature = from_feature
        if from_feature:
            self.needs = "feature"
        self.register_buffer("selected", torch.tensor(selected, dtype=torch.long))
        others_idx = [i for i in range(num_units) if i not in set(selected)]
        self.register_buffer("others_idx", torch.tensor(others_idx, dtype=torch.long))
        self.others = others
        self.register_buffer("mean", basis.mean.clone())                   # [S, D]
        self.register_buffer("components", basis.components.clone())       # [S, K, D]
        self.register_buffer("mask", basis.mask.clone())                   # [S, K] kept PCs
        self.register_buffer("other_mean", (other_mean if other_mean is not None
                                            else torch.zeros(basis.mean.shape[1])).clone())  # [D]
        self.dropped_value = float(dropped_value)
        n = int(self.mask.sum())
        eig = basis.eigenvalues / basis.eigenvalues[:, :1].clamp_min(1e-30)
        lam = init_lambda(n, init, eig[self.mask], generator)
        self.lam = nn.Parameter(lam.to(basis.components.dtype))

    def lambdas(self) -> torch.Tensor:
        """λ as a dense ``[S, K]`` matrix (pruned components hold ``dropped_value``)."""
        full = torch.full(self.mask.shape, self.dropped_value, dtype=self.lam.dtype, device=self.lam.device)
        return full.masked_scatter(self.mask, self.lam)                     # [S, K]

    def prepare(self, units, feature):
        x = feature[:, None] if self.from_feature else units[:, self.selected]   # [B, S, D]
        x = x.to(self.components.dtype)
        coeffs = torch.einsum("bsd,skd->bsk", x - self.mean, self.components)    # [B, S, K]
        out = {"coeffs": coeffs}
        if self.others == "add" and not self.from_feature:
            out["rest"] = units[:, self.others_idx].to(x.dtype).sum(1)           # [B, D]
        return out

    def forward(self, coeffs: torch.Tensor, rest: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.einsum("bsk,skd->bd", coeffs * self.lambdas(), self.components)  # [B, D]
        if self.others == "add":
            y = y + rest
        elif self.others == "mean":
            y = y + self.other_mean
        return y


class HeadScaling(Adapter):
    """``residual_coarse``: one scalar per selected unit on the raw units, ``Σ_u λ_u x_u``."""

    needs = "units"

    def __init__(self, selected: list[int], num_units: int, others: str = "drop",
                 other_mean: torch.Tensor | None = None, init: str = "normal",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if others not in ("drop", "mean", "add"):
            raise ValueError(f"method.others={others!r}; valid: drop | mean | add")
        if init == "eigenvalues":
            raise ValueError("method.init=eigenvalues is meaningless for residual_coarse (no PCs)")
        self.register_buffer("selected", torch.tensor(selected, dtype=torch.long))
        self.register_buffer("others_idx", torch.tensor([i for i in range(num_units) if i not in set(selected)],
                                                        dtype=torch.long))
        self.others = others
        self.register_buffer("other_mean", other_mean.clone() if other_mean is not None else torch.zeros(1))
        self.lam = nn.Parameter(init_lambda(len(selected), init, generator=generator).float())

    def prepare(self, units, feature):
        out = {"sel": units[:, self.selected]}                                   # [B, S, D]
        if self.others == "add":
            out["rest"] = units[:, self.others_idx].sum(1)                       # [B, D]
        return out

    def forward(self, sel: torch.Tensor, rest: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.einsum("bsd,s->bd", sel, self.lam.to(sel.dtype))               # [B, D]
        if self.others == "add":
            y = y + rest
        elif self.others == "mean":
            y = y + self.other_mean.to(y.dtype)
        return y
