"""The exact linear readout of the residual units (DESIGN.md §2): from what the hooks store to
units in the output space, under either convention, and the low-rank form the cache keeps.

Notation, per image: ``c_u`` a unit's contribution to the CLS residual ``x = Σ_u c_u`` entering
the final LayerNorm (γ, β, eps); ``µ = mean(x)``, ``σ = sqrt(Var(x) + eps)`` (biased variance);
``P`` ``[W, D]`` the output projection (identity when there is none) with bias ``b_P``;
``g = Pᵀγ``, ``k = Pᵀβ + b_P``; ``L`` layers, ``H`` heads, ``N_u`` a unit's share count::

    official (default; what the authors' tracers compute)
        unit_u = Pᵀ(γ ⊙ c_u)/σ − (µ/σ)·g/N_u + k/N_u,   a head carries b_O/H of its layer's bias,
        N_u = 2L+1 for the embedding and each MLP, (2L+1)·H for each head   (no constant units)
    centred
        unit_u = Pᵀ(γ ⊙ (c_u − mean c_u))/σ,  plus  attn_bias = Pᵀ(γ ⊙ (b − mean b))/σ  (b = Σ_l b_O,l)
        and out_bias = k

Either way ``Σ_u unit_u = LN(x)·P + b_P``, the model's image feature.

**Low-rank storage.** Per image the cache keeps ``z`` ``[L·H, Dh]`` (each head's value mix
before the output projection), ``a = Pᵀ(γ ⊙ c)`` ``[1+L, D]`` for the embedding and the MLPs
with their channel means ``mean(c)`` ``[1+L]``, the statistics ``σ, µ`` and the feature.  Every
unit is then ``unit_u = G_u · x_u``: a fixed map ``G_u`` ``[D, R]`` applied to a per-image
*lifted input* ``x_u``::

    heads    x = [z/σ, 1/σ, µ/σ, 1]          R = Dh + 3   (mean(c_h) = w̄_h·z is linear in z)
    vectors  x = [a/σ, µ/σ, mean(c)/σ, 1]    R = D + 3    (the embedding and the MLPs)
    consts   x = [1/σ, 1]                    R = 2        (centred convention only)

The lift does not depend on the convention; only ``G`` does.  A head's unit therefore lives in
at most Dh + 2 dimensions (Dh under the centred convention) — what makes the cache ~14× smaller
and the per-head bases and λ rank-aware.  :class:`DenseSource` serves the same interface over
stored ``[N, U, D]`` units (``cache.layout=dense``), with identity maps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..catalog import UnitConvention, names
from .units import UnitLayout

CONVENTIONS = names(UnitConvention)
GROUPS = ("heads", "vectors", "consts")
LOWRANK_KEYS = ("z", "vec", "vec_mean", "stats", "feature")
WIDE_KEYS = ("stats", "vec_mean", "heads_mean")     # per-sample statistics: stored in float32 or wider
DENSE_KEYS = ("units", "feature")


@dataclass
class Lens:
    """The frozen readout parameters of one backbone (built by its family)."""
    w_o: torch.Tensor        # [L, W, H, Dh] per-head output projection (LayerScale folded in)
    b_o: torch.Tensor        # [L, W]        its bias (× LayerScale); zeros when there is none
    gamma: torch.Tensor      # [W]           final norm weight (ones when it has none)
    beta: torch.Tensor       # [W]           final norm bias (zeros)
    eps: float
    proj: torch.Tensor       # [W, D]        output projection (identity when there is none)
    proj_bias: torch.Tensor  # [D]           its bias (zeros)
    has_norm: bool = True    # False: no final norm (σ = 1, no centring)
    centring: bool = True    # False: the final norm does not centre (RmsNorm: µ = 0, no per-unit centring)
    pool: "object | None" = None   # attention pooling (MAP): :class:`~.pooling.MapLens`; None: CLS / average

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(L, W, H, Dh, D)``."""
        L, W, H, Dh = self.w_o.shape
        return L, W, H, Dh, self.proj.shape[1]


def norm_kind(norm: nn.Module | None) -> str | None:
    """``layer`` (LayerNorm: centres and scales), ``rms`` (RmsNorm: scales only), ``none`` (None or
    ``nn.Identity``), or None for a norm the lens cannot freeze (anything else)."""
    if norm is None or isinstance(norm, nn.Identity):
        return "none"
    if isinstance(norm, nn.LayerNorm):
        return "layer"
    rms = tuple(c for c in (getattr(nn, "RMSNorm", None),) if c is not None)
    try:
        from timm.layers import RmsNorm, RmsNormFp32
        rms += (RmsNorm, RmsNormFp32)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return "rms" if isinstance(norm, rms) else None


def norm_eps(norm: nn.Module, dtype) -> float:
    eps = getattr(norm, "eps", None)
    return float(torch.finfo(dtype).eps if eps is None else eps)        # torch's RMSNorm: eps=None


def norm_affine(norm: nn.Module | None, width: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """``(γ, β, eps, has_norm)`` of a final norm (None or ``nn.Identity``: no norm, γ = 1, β = 0;
    an RmsNorm has β = 0)."""
    kind = norm_kind(norm)
    ones, zeros = torch.ones(width, dtype=dtype, device=device), torch.zeros(width, dtype=dtype, device=device)
    if kind == "none":
        return ones, zeros, 0.0, False
    if kind is None:
        raise ValueError(f"final norm {type(norm).__name__} is neither a LayerNorm nor an RmsNorm")
    gamma = norm.weight.detach() if getattr(norm, "weight", None) is not None else ones
    beta = norm.bias.detach() if getattr(norm, "bias", None) is not None else zeros
    return gamma, beta, norm_eps(norm, dtype), True


def norm_stats(x: torch.Tensor, kind: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(µ, σ)`` over the last dim of ``x`` as the norm freezes them: LayerNorm ``mean``,
    ``sqrt(Var + eps)`` (biased); RmsNorm ``0``, ``sqrt(mean(x²) + eps)``; no norm ``0``, ``1``."""
    if kind == "layer":
        return x.mean(-1), torch.sqrt(x.var(-1, unbiased=False) + eps)
    zeros = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    if kind == "rms":
        return zeros, torch.sqrt(x.pow(2).mean(-1) + eps)
    return zeros, torch.ones_like(zeros)


def lens_from(w_o: list[torch.Tensor], b_o: list[torch.Tensor | None], ls: list[torch.Tensor | None],
              num_heads: int, norm: nn.Module | None, proj: torch.Tensor | None = None,
              proj_bias: torch.Tensor | None = None) -> Lens:
    """A :class:`Lens` from per-layer ``nn.Linear``-layout out-projections ``[W, H·Dh]``, their
    biases and LayerScales (None: none), the final norm (None or ``nn.Identity``: none) and the
    output projection ``[W, D]`` (``x @ proj``; None: identity)."""
    W = w_o[0].shape[0]
    dtype, device = w_o[0].dtype, w_o[0].device
    per_layer, biases = [], []
    for w, b, g in zip(w_o, b_o, ls):
        w = w.detach().view(W, num_heads, -1)                                 # [W, H, Dh]
        b = b.detach() if b is not None else torch.zeros(W, dtype=dtype, device=device)
        if g is not None:
            w, b = w * g.detach()[:, None, None], b * g.detach()
        per_layer.append(w)
        biases.append(b)
    gamma, beta, eps, has_norm = norm_affine(norm, W, dtype, device)
    P = proj.detach() if proj is not None else torch.eye(W, dtype=dtype, device=device)
    b_P = proj_bias.detach() if proj_bias is not None else torch.zeros(P.shape[1], dtype=dtype, device=device)
    return Lens(torch.stack(per_layer), torch.stack(biases), gamma, beta, eps, P, b_P, has_norm,
                centring=norm_kind(norm) == "layer")


def compose_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(P [W, D], b [D])`` with ``x @ P + b`` = applying ``linears`` in order (x @ W1ᵀ + b1, then
    @ W2ᵀ + b2, …); ``(None, None)`` for none."""
    proj, bias = None, None
    for lin in linears:
        w = lin.weight.T                                                  # [in, out]
        if proj is None:
            proj, bias = w, lin.bias
            continue
        proj, bias = proj @ w, (bias @ w if bias is not None else None)
        if lin.bias is not None:
            bias = lin.bias if bias is None else bias + lin.bias
    return proj, bias


@torch.no_grad()
def raw_units(norm: nn.Module | None, proj: torch.Tensor | None, x: torch.Tensor, embed: torch.Tensor,
              z: list[torch.Tensor], mlps: list[torch.Tensor], feature: torch.Tensor,
              dt: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What the cache stores of a batch (see the module docstring), in ``dt`` (the weights' dtype).

    ``x`` ``[B, W]`` the CLS row entering the final norm (its statistics are the norm's own);
    ``embed`` ``[B, W]``; ``z`` per layer ``[B, H, Dh]``; ``mlps`` per layer ``[B, W]`` (LayerScale
    included); ``feature`` ``[B, D]``.  Any autocast precision of the pieces is undone here: the
    unit algebra runs in the weights' dtype (fp32 or fp64).
    """
    W = embed.shape[-1]
    gamma, _, eps, has_norm = norm_affine(norm, W, dt, embed.device)
    x = x.to(dt)
    kind = norm_kind(norm)
    if kind == "layer":
        mu = x.mean(-1)                                                       # [B]
        sigma = torch.sqrt(x.var(-1, unbiased=False) + eps)                   # [B]
    else:
        mu, sigma = norm_stats(x, kind, eps)                                  # RmsNorm: µ = 0; none: 0, 1
    return raw_from_stats(gamma, proj, embed, z, mlps, feature, mu, sigma, dt)


@torch.no_grad()
def raw_from_stats(gamma: torch.Tensor, proj: torch.Tensor | None, embed: torch.Tensor, z: list[torch.Tensor],
                   mlps: list[torch.Tensor], feature: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                   dt: torch.dtype) -> dict[str, torch.Tensor]:
    """:func:`raw_units` with the final norm's statistics ``µ, σ`` ``[B]`` given (the effective
    statistics of a token-pooled readout, :mod:`.pooling`)."""
    c = torch.stack([embed.to(dt)] + [m.to(dt) for m in mlps], 1)             # [B, 1+L, W]
    gc = c * gamma.to(dt)                                                     # [B, 1+L, W]
    vec = gc @ proj.to(dt) if proj is not None else gc                        # [B, 1+L, D]  Pᵀ(γ ⊙ c)
    zz = torch.stack([t.to(dt) for t in z], 1)                                # [B, L, H, Dh]
    return {"z": zz.flatten(1, 2), "vec": vec, "vec_mean": c.mean(-1),        # [B, L·H, Dh], …, [B, 1+L]
            "stats": torch.stack([sigma, mu], 1), "feature": feature.to(dt)}  # [B, 2], [B, D]


def unit_groups(layout: UnitLayout) -> dict[str, list[int]]:
    """The layout's units by group: heads; vectors (embedding, MLPs, the pool's units); constants."""
    kinds = layout.kinds
    return {"heads": [i for i, k in enumerate(kinds) if k == "head"],
            "vectors": [i for i, k in enumerate(kinds) if k in ("embed", "mlp", "pool")],
            "consts": [i for i, k in enumerate(kinds) if k == "const"]}


class UnitSource(nn.Module):
    """Units of stored encodings: the groups of a layout, their lifted inputs and maps.

    ``lift(batch, group)`` ``[B, S, R]`` and ``maps(group)`` ``[S, D, R]`` (None: identity) give
    every unit of the group as ``G_u x_u``; :meth:`units` and :meth:`sum_units` build on them.
    """

    layout: UnitLayout
    keys: tuple[str, ...]
    groups: dict[str, list[int]]

    def lift(self, batch: dict, group: str) -> torch.Tensor:
        raise NotImplementedError

    def maps(self, group: str) -> torch.Tensor | None:
        raise NotImplementedError

    def blocks(self, indices) -> list[tuple[str, list[int], list[int]]]:
        """``[(group, positions within the group, unit indices)]`` of ``indices``, in group order
        (heads, vectors, consts) and layout order within a group: the order of every per-unit
        parameter of a method (the official code orders its units the same way)."""
        wanted = set(int(i) for i in indices)
        out = []
        for g in GROUPS:
            pos = [p for p, u in enumerate(self.groups.get(g, [])) if u in wanted]
            if pos:
                out.append((g, pos, [self.groups[g][p] for p in pos]))
        return out

    def _group_units(self, batch: dict, group: str, pos: list[int]) -> torch.Tensor:
        x = self.lift(batch, group)[:, pos]                                   # [B, S, R]
        G = self.maps(group)
        return x if G is None else torch.einsum("bsr,sdr->bsd", x, G[pos].to(x.dtype))

    def units(self, batch: dict, indices=None) -> torch.Tensor:
        """``[B, len(indices), D]`` units in the order of ``indices`` (default: all, layout order)."""
        indices = list(range(len(self.layout))) if indices is None else [int(i) for i in indices]
        parts, order = [], []
        for g, pos, units in self.blocks(indices):
            parts.append(self._group_units(batch, g, pos))
            order += units
        stacked = torch.cat(parts, 1)                                         # [B, S, D] in block order
        where = {u: i for i, u in enumerate(order)}
        return stacked[:, [where[i] for i in indices]]

    def sum_units(self, batch: dict, indices) -> torch.Tensor:
        """``Σ_{u ∈ indices} unit_u`` ``[B, D]`` without building the units (one GEMM per group)."""
        feature = batch["feature"]
        out = torch.zeros(feature.shape[0], self.layout_dim, dtype=self.dtype, device=feature.device)
        for g, pos, _ in self.blocks(indices):
            x = self.lift(batch, g)[:, pos]                                   # [B, S, R]
            G = self.maps(g)
            if G is None:
                out = out + x.sum(1)
            else:
                Gs = G[pos].to(x.dtype).permute(0, 2, 1).reshape(-1, G.shape[1])   # [S·R, D]
                out = out + x.reshape(x.shape[0], -1) @ Gs
        return out


class Readout(UnitSource):
    """The low-rank source: lifted inputs from ``z, vec, vec_mean, stats`` and the maps ``G`` of
    one convention (module docstring)."""

    keys = LOWRANK_KEYS

    def __init__(self, lens: Lens, convention: str = "official") -> None:
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"conventions.units={convention!r}; valid: {', '.join(CONVENTIONS)}")
        self.convention = convention
        L, W, H, Dh, D = lens.shape
        self.layout = UnitLayout.vit(L, H, constants=convention == "centred")
        self.layout_dim, self.dtype, self.num_heads, self.head_dim = D, lens.w_o.dtype, H, Dh
        self.width, self.head_rank = W, Dh
        self.groups = unit_groups(self.layout)
        P, gamma = lens.proj, lens.gamma
        g = P.T @ gamma if lens.has_norm else torch.zeros(D, dtype=P.dtype, device=P.device)    # [D]
        if not lens.centring:                                     # RmsNorm: µ = 0, nothing to centre
            g = torch.zeros_like(g)
        k = P.T @ lens.beta + lens.proj_bias                                                   # [D]
        M = torch.einsum("lwhj,w,wd->lhdj", lens.w_o, gamma, P).reshape(L * H, D, Dh)          # [L·H, D, Dh]
        if convention == "official":
            n_head, n_vec = (2 * L + 1) * H, 2 * L + 1
            q = (torch.einsum("lw,w,wd->ld", lens.b_o, gamma, P) / H).repeat_interleave(H, 0)  # [L·H, D]
            G_h = torch.cat([M, q[..., None], (-g / n_head).expand(L * H, D)[..., None],
                             (k / n_head).expand(L * H, D)[..., None]], -1)                  # [L·H, D, Dh+3]
            cols = [-g / n_vec, torch.zeros_like(g), k / n_vec]
        else:
            wbar = lens.w_o.mean(1).reshape(L * H, Dh)                                         # [L·H, Dh]
            Mc = M - g[None, :, None] * wbar[:, None, :]                                       # mean(c_h) = w̄_h·z
            z3 = torch.zeros(L * H, D, 3, dtype=P.dtype, device=P.device)
            G_h = torch.cat([Mc, z3], -1)
            cols = [torch.zeros_like(g), -g, torch.zeros_like(g)]
            b = lens.b_o.sum(0)                                                                # [W]
            b = b - b.mean() if lens.has_norm and lens.centring else b
            v = P.T @ (gamma * b)                                                              # [D]
            self.register_buffer("G_consts", torch.stack([torch.stack([v, torch.zeros_like(v)], -1),
                                                          torch.stack([torch.zeros_like(k), k], -1)]))  # [2, D, 2]
        eye = torch.eye(D, dtype=P.dtype, device=P.device)
        G_v = torch.cat([eye] + [c[:, None] for c in cols], -1).expand(L + 1, D, D + 3)          # [1+L, D, D+3]
        self.register_buffer("G_heads", G_h.contiguous())
        self.register_buffer("G_vectors", G_v.contiguous())

    def maps(self, group: str) -> torch.Tensor:
        return getattr(self, f"G_{group}")

    def lift(self, batch: dict, group: str) -> torch.Tensor:
        stats = batch["stats"].to(self.dtype)
        inv = (1.0 / stats[:, 0])[:, None, None]                              # [B, 1, 1]
        mu = stats[:, 1][:, None, None]
        if group == "heads":
            z = batch["z"].to(self.dtype)                                     # [B, S, Dh]
            B, S, _ = z.shape
            col = lambda t: t.expand(B, S, 1)
            return torch.cat([z * inv, col(inv), col(mu * inv), col(torch.ones_like(inv))], -1)   # [B, S, Dh+3]
        if group == "vectors":
            a = batch["vec"].to(self.dtype)                                   # [B, V, D]
            B, V, _ = a.shape
            col = lambda t: t.expand(B, V, 1)
            m = batch["vec_mean"].to(self.dtype)[..., None]                   # [B, V, 1]
            return torch.cat([a * inv, col(mu * inv), m * inv, col(torch.ones_like(inv))], -1)    # [B, V, D+3]
        if group == "consts":
            B = stats.shape[0]
            return torch.cat([inv.expand(B, 2, 1), torch.ones(B, 2, 1, dtype=self.dtype, device=stats.device)], -1)
        raise KeyError(group)

    def rank(self, group: str, n_samples: int) -> int:
        return official_rank(group, self.head_rank, self.width, self.layout_dim, n_samples)

    def storage_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shapes of what the low-rank cache stores (:data:`LOWRANK_KEYS`)."""
        L, S, D = self.layout.num_layers, len(self.groups["heads"]), self.layout_dim
        return {"z": (S, self.head_dim), "vec": (1 + L, D), "vec_mean": (1 + L,), "stats": (2,), "feature": (D,)}


def official_rank(group: str, head_dim: int, width: int, dim: int, n_samples: int) -> int:
    """Components kept per unit of ``group`` — the official code's accounting (its PCA keeps
    ``min(k, D, n)`` components with k the unit's raw size): ``head_dim`` for a head (its rank: J
    head_dims under a J-head attention pool), the model width for the embedding, the MLPs and
    the pool's MLP, 1 for a constant unit (a direction scaled by 1/σ)."""
    raw = {"heads": head_dim, "vectors": width, "consts": 1}[group]
    return max(0, min(raw, dim, int(n_samples)))


class DenseSource(UnitSource):
    """Stored ``[N, U, D]`` units (``cache.layout=dense``): identity maps, the groups of
    ``layout`` (heads; embed + MLPs; constants)."""

    keys = DENSE_KEYS

    def __init__(self, layout: UnitLayout, dim: int, head_dim: int, width: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layout, self.layout_dim, self.dtype = layout, int(dim), dtype
        self.head_dim, self.width = int(head_dim), int(width)     # head_dim: a head's rank (official accounting)
        self.groups = unit_groups(layout)

    @classmethod
    def like(cls, readout: "UnitSource") -> "DenseSource":
        return cls(readout.layout, readout.layout_dim, readout.head_rank, readout.width, readout.dtype)

    def lift(self, batch: dict, group: str) -> torch.Tensor:
        return batch["units"][:, self.groups[group]].to(self.dtype)

    def maps(self, group: str) -> None:
        return None

    def rank(self, group: str, n_samples: int) -> int:
        return official_rank(group, self.head_dim, self.width, self.layout_dim, n_samples)
