"""Pooled readouts: average pooling and attention pooling (MAP) as exact sums of residual units.

A pooled feature reads *every* token of the residual stream, ``x_t = Σ_u c_{u,t}``; with the
per-sample statistics of the norms held fixed (as for the CLS readout, DESIGN.md §2) it is still
linear in the units:

**Average pooling** (``global_pool='avg'``, open_clip ``pool_type='avg'``; the mean of tokens
``start:``, i.e. after the prefix tokens).

* norm *after* the pool (``fc_norm``, ``final_ln_after_pool``) or no norm: the pooled vector is
  ``x̄ = Σ_u c̄_u`` with ``c̄_u`` the token mean of a unit, and the CLS algebra applies unchanged
  to the pooled rows — the hooks keep token means instead of CLS rows (a head keeps the token mean
  of its value mix, still ``head_dim`` numbers).
* norm *before* the pool (per token, e.g. SigLIP's ``*_gap`` towers): ``Σ_t a_t LN(x_t)`` with
  ``a_t = 1/n`` is ``γ ⊙ Σ_t w_t x_t − γ Σ_t w_t µ_t + β`` with ``w_t = a_t/σ_t``.  With the
  *effective* statistics ``σ* = 1/Σ_t w_t``, ``a'_t = w_t σ*`` (weights summing to one) and
  ``µ* = Σ_t a'_t µ_t`` this is ``γ ⊙ (Σ_t a'_t x_t − µ*)/σ* + β``: the CLS form again, on the
  ``a'``-weighted token means, so the low-rank cache (``z``: ``head_dim`` per head, σ*, µ*) and
  every map of :class:`~.readout.Readout` are the CLS ones.  (The hooks keep the token tensors
  until the last norm's σ_t are known.)

**Attention pooling** (MAP, timm ``AttentionPoolLatent``: one learned query, J pool heads over
``y_t = LN(x_t)``, out-projection ``W_p``, then ``p + mlp(norm(p))``; SigLIP / SigLIP2, PE-Core,
NaFlexVit).  With the pool's attention weights ``a_{j,t}`` and the per-token statistics fixed,
pool head j reads ``ȳ_j = Σ_t a_{j,t} y_t = γ ⊙ Σ_t w_{j,t} x_t − γ m_j + β`` (``w_{j,t} =
a_{j,t}/σ_t``, ``s_j = Σ_t w_{j,t}``, ``m_j = Σ_t w_{j,t} µ_t``).  With ``A_j = Pᵀ W_{p,j} V_j
diag(γ)`` (``V_j`` pool head j's value rows, ``P``/``b_P`` the linear maps after the pool),
``g_j = A_j 1`` and the constant ``k = Pᵀ(W_p (Vβ + b_v) + b_p) + b_P``::

    official   head h (layer l):  Σ_j A_j W_{O,h} ζ_{h,j} + Σ_j s_j A_j b_{O,l}/H − Σ_j m_j g_j/N_h + k/N_h
               embed / MLP u:     Σ_j A_j C̃_{u,j}                           − Σ_j m_j g_j/N_u + k/N_u
               pool.mlp:          Pᵀ mlp(norm(p))            (after the norm: takes no share)
    centred    head / embed / MLP: Σ_j A_j (C̃_{u,j} − mean(C̃_{u,j}))     pool.mlp as above
               attn_bias = Σ_j s_j A_j (b − mean b)  (b = Σ_l b_{O,l}),   out_bias = k

with ``ζ_{h,j} = Σ_t w_{j,t} z_{h,t}`` (head h's value mix weighted by pool head j) and
``C̃_{u,j} = Σ_t w_{j,t} c_{u,t}``; N_u as for the CLS readout (2L+1, ×H for a head).  Σ units
is the pooled feature.  Each pool head weights the tokens differently, so a block head's unit
spans up to ``J·head_dim`` dimensions (768 = D for SigLIP B/16), not ``head_dim``: the low-rank
cache of a MAP readout stores each unit's *linear part* (``D`` numbers) and its J per-channel
means, and :class:`MapSource` rebuilds the units with no per-unit map (``maps() = None``: the
PCA, the methods and the export treat them like stored units).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .readout import CONVENTIONS, Lens, Readout, UnitSource, norm_affine, norm_kind, norm_stats, official_rank, \
    raw_from_stats, unit_groups
from ..catalog import Pooling, names
from .units import UnitLayout

POOL_KINDS = names(Pooling)
MAP_KEYS = ("heads", "heads_mean", "vec", "vec_mean", "stats", "feature")


@dataclass(frozen=True)
class Pool:
    """How a backbone reads its feature off the token stream.

    ``kind``: ``token`` (the CLS row), ``avg`` (mean of tokens ``start:``) or ``map`` (attention
    pool); ``per_token_norm``: the final norm acts on every token before the pool (then the hooks
    keep whole token tensors until the norm's σ_t are known: :attr:`deferred`)."""
    kind: Pooling = Pooling.token
    start: int = 0
    per_token_norm: bool = False

    @property
    def deferred(self) -> bool:
        return self.kind == Pooling.map or (self.kind == Pooling.avg and self.per_token_norm)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """What a hook keeps of a batch-first token tensor ``[B, N, …]``: the CLS row (cloned: a
        view would keep the whole activation alive), the token mean, or the tokens (deferred)."""
        if self.deferred:
            return t
        if self.kind == Pooling.avg:
            return t[:, self.start:].mean(1)
        return t[:, 0].clone()


TOKEN = Pool()


@torch.no_grad()
def avg_raw(norm: nn.Module | None, proj: torch.Tensor | None, store: dict, start: int, feature: torch.Tensor,
            dt: torch.dtype) -> dict[str, torch.Tensor]:
    """The CLS-layout cache arrays of a per-token-normalised average pool (module docstring):
    token tensors of ``store`` (``final_in`` ``[B, N, W]``, ``embed``, ``heads`` ``[B, N, H, Dh]``,
    ``mlps``) weighted by ``a'_t``, with the effective statistics σ*, µ*."""
    x = store["final_in"].to(dt)[:, start:]                                   # [B, n, W]
    gamma, _, eps, _ = norm_affine(norm, x.shape[-1], dt, x.device)
    mu_t, sigma_t = norm_stats(x, norm_kind(norm), eps)                       # [B, n]
    w = 1.0 / (x.shape[1] * sigma_t)                                          # [B, n]  a_t / σ_t
    sigma = 1.0 / w.sum(-1)                                                   # [B]     σ*
    a = w * sigma[:, None]                                                    # [B, n]  a'_t (Σ = 1)
    pool = lambda t: torch.einsum("bn,bn...->b...", a, t[:, start:].to(dt))
    return raw_from_stats(gamma, proj, pool(store["embed"]), [pool(z) for z in store["heads"]],
                          [pool(m) for m in store["mlps"]], feature, (a * mu_t).sum(-1), sigma, dt)


# --- attention pooling ----------------------------------------------------------------------------
@dataclass
class MapLens:
    """The frozen parameters of an attention pool (built by the family from its module)."""
    value: torch.Tensor        # [J, d, W]  value rows of each pool head
    value_bias: torch.Tensor   # [J, d]
    out: torch.Tensor          # [D0, J·d]  the pool's out-projection (identity when none)
    out_bias: torch.Tensor     # [D0]
    units: tuple[str, ...] = ("pool.mlp",)   # the pool's own units (its MLP branch), or ()

    @classmethod
    def of(cls, pool: nn.Module) -> "MapLens":
        """From timm's ``AttentionPoolLatent`` (``kv`` fused: k rows first, then v)."""
        J, d = pool.num_heads, pool.head_dim
        W = pool.kv.weight.shape[1]
        dt, dev = pool.kv.weight.dtype, pool.kv.weight.device
        v = pool.kv.weight.detach()[J * d:].reshape(J, d, W)
        bv = pool.kv.bias.detach()[J * d:].reshape(J, d) if pool.kv.bias is not None else torch.zeros(J, d, dtype=dt,
                                                                                                  device=dev)
        if isinstance(pool.proj, nn.Linear):
            out = pool.proj.weight.detach()
            ob = pool.proj.bias.detach() if pool.proj.bias is not None else torch.zeros(out.shape[0], dtype=dt,
                                                                                        device=dev)
        else:                                                         # out_features=0: no projection, no MLP
            out, ob = torch.eye(J * d, dtype=dt, device=dev), torch.zeros(J * d, dtype=dt, device=dev)
        return cls(v, bv, out, ob, ("pool.mlp",) if getattr(pool, "mlp", None) is not None else ())


def map_weights_hook(pool: nn.Module, store: dict):
    """A forward pre-hook (with kwargs) on an ``AttentionPoolLatent``: stores its attention
    weights ``[B, J, n]`` over the ``n`` tokens it reads (recomputed from its own q and k with an
    explicit softmax; the model's forward is untouched)."""
    def hook(module, args, kwargs):
        if kwargs.get("attn_mask") is not None or len(args) > 1:
            raise ValueError("attention pooling with an attention mask (NaFlex padding) is not decomposed: "
                             "feed whole images")
        x = args[0]                                                           # [B, n, W]
        B, n, C = x.shape
        J, d = pool.num_heads, pool.head_dim
        kb = pool.kv.bias[:J * d] if pool.kv.bias is not None else None
        k = nn.functional.linear(x, pool.kv.weight[:J * d], kb).reshape(B, n, J, d).transpose(1, 2)   # [B, J, n, d]
        q = pool.q(pool.latent).reshape(1, pool.latent_len, J, d).transpose(1, 2)   # [1, J, 1, d]
        q, k = pool.q_norm(q), pool.k_norm(k)
        logits = (q * pool.scale) @ k.transpose(-2, -1)                      # [B, J, 1, n]
        wide = torch.promote_types(logits.dtype, torch.float32)              # never below fp32 (autocast)
        store["pool_weights"] = logits.to(wide).softmax(-1)[:, :, 0]         # [B, J, n]
    return hook


class MapSource(UnitSource):
    """Units of an attention-pooled readout (module docstring): the arrays :meth:`raw` builds from
    the hooks' token tensors, read back as units with identity maps."""

    keys = MAP_KEYS

    def __init__(self, lens: Lens, convention: str = "official") -> None:
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"conventions.units={convention!r}; valid: {', '.join(CONVENTIONS)}")
        pool: MapLens = lens.pool
        self.convention = convention
        L, W, H, Dh, D = lens.shape
        J, d, _ = pool.value.shape
        self.layout = UnitLayout.vit(L, H, constants=convention == "centred", pool=pool.units)
        self.groups = unit_groups(self.layout)
        self.layout_dim, self.dtype, self.num_heads, self.head_dim, self.width = D, lens.w_o.dtype, H, Dh, W
        self.channels = J
        self.head_rank = J * Dh
        self.norm_kind = "layer" if lens.centring and lens.has_norm else ("rms" if lens.has_norm else "none")
        self.eps = lens.eps
        P, gamma = lens.proj, lens.gamma
        wout = (pool.out.T @ P).T                                             # [D, J·d]  Pᵀ W_p
        wout_j = wout.reshape(D, J, d).permute(1, 0, 2)                      # [J, D, d]
        A = lambda vecs: torch.einsum("jDd,jdw,...w->...jD", wout_j, pool.value, vecs)   # Σ… A_j (vec ⊙ γ)
        g = A(gamma) if self.norm_kind == "layer" else torch.zeros(J, D, dtype=P.dtype, device=P.device)  # [J, D]
        k = wout @ (torch.einsum("jdw,w->jd", pool.value, lens.beta) + pool.value_bias).reshape(-1) \
            + P.T @ pool.out_bias + lens.proj_bias                             # [D]
        U = torch.einsum("jdw,w,lwhe->lhjed", pool.value, gamma, lens.w_o)    # [L, H, J, Dh, d]  V_j γ W_{O,h}
        self.register_buffer("U", U.reshape(L, H * J, Dh, d).contiguous())   # batched over (head, pool head)
        self.register_buffer("wout", wout.contiguous())
        self.register_buffer("wbar", lens.w_o.mean(1))                       # [L, H, Dh]
        self.register_buffer("value_gamma", (pool.value * gamma).transpose(1, 2).contiguous())   # [J, W, d]
        self.register_buffer("g", g)
        self.register_buffer("k", k)
        self.register_buffer("q", A(gamma * lens.b_o) / H)                   # [L, J, D]  A_j b_{O,l} / H
        b = lens.b_o.sum(0)
        b = b - b.mean() if self.norm_kind == "layer" else b
        self.register_buffer("attn_bias", A(gamma * b))                      # [J, D]
        self.register_buffer("proj", P)
        n_vec = 2 * L + 1
        self.n_head, self.n_vec = n_vec * H, n_vec
        self.layer_of_head = [self.layout.layers[i] for i in self.groups["heads"]]
        self.register_buffer("is_pool", torch.tensor([self.layout.kinds[i] == "pool" for i in self.groups["vectors"]]))

    # --- building the stored arrays -----------------------------------------------------------------
    @torch.no_grad()
    def raw(self, store: dict, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        dt = self.dtype
        a = store["pool_weights"].to(dt)                                      # [B, J, n]
        n = a.shape[-1]
        x = store["final_in"].to(dt)
        start = x.shape[1] - n
        mu_t, sigma_t = norm_stats(x[:, start:], self.norm_kind, self.eps)   # [B, n]
        w = a / sigma_t[:, None]                                              # [B, J, n]  a_{j,t}/σ_t
        stats = torch.cat([w.sum(-1), (w * mu_t[:, None]).sum(-1)], 1)       # [B, 2J]  s, m
        B, J, H = w.shape[0], self.channels, self.num_heads
        L, Dh = len(store["heads"]), self.head_dim
        # batched over the layers (few large products, not many small ones)
        zeta = torch.empty(L, B, J, H * Dh, dtype=dt, device=w.device)
        for l, zt in enumerate(store["heads"]):                               # [B, N, H, Dh]
            torch.bmm(w, zt[:, start:].to(dt).reshape(B, n, H * Dh), out=zeta[l])   # [B, J, H·Dh]
        zeta = zeta.view(L, B, J, H, Dh).permute(0, 3, 2, 1, 4).reshape(L * H * J, B, Dh)   # [L·H·J, B, Dh]
        y = torch.bmm(zeta, self.U.view(L * H * J, Dh, -1))                   # [L·H·J, B, d]
        y = y.view(L * H, J, B, -1).permute(2, 0, 1, 3).reshape(B, L * H, -1)   # [B, L·H, J·d]
        heads = y @ self.wout.T                                               # [B, L·H, D]
        zm = (zeta.view(L * H, J, B, Dh) * self.wbar.view(L * H, 1, 1, Dh)).sum(-1)   # [L·H, J, B]
        heads_mean = zm.permute(2, 0, 1)                                      # [B, L·H, J]
        tokens = [store["embed"]] + list(store["mlps"])                       # [B, N, W] each
        C = torch.empty(len(tokens), B, J, self.width, dtype=dt, device=w.device)
        for i, ct in enumerate(tokens):
            torch.bmm(w, ct[:, start:].to(dt), out=C[i])                      # [B, J, W]
        V = len(tokens)
        y = torch.bmm(C.permute(2, 0, 1, 3).reshape(J, V * B, -1), self.value_gamma)   # [J, V·B, d]
        vecs = list((y.view(J, V, B, -1).permute(2, 1, 0, 3).reshape(B, V, -1) @ self.wout.T).unbind(1))  # V × [B, D]
        vec_means = list(C.mean(-1).permute(1, 0, 2).unbind(1))               # V × [B, J]
        if "pool_mlp" in store:
            r = store["pool_mlp"].to(dt)                                      # [B, D0]
            vecs.append(r @ self.proj)
            vec_means.append(torch.zeros_like(vec_means[0]))
        return {"heads": heads, "heads_mean": heads_mean,                     # [B, L·H, D], [B, L·H, J]
                "vec": torch.stack(vecs, 1), "vec_mean": torch.stack(vec_means, 1),     # [B, V, D], [B, V, J]
                "stats": stats, "feature": feature.to(dt)}

    def storage_shapes(self) -> dict[str, tuple[int, ...]]:
        S, V, D, J = len(self.groups["heads"]), len(self.groups["vectors"]), self.layout_dim, self.channels
        return {"heads": (S, D), "heads_mean": (S, J), "vec": (V, D), "vec_mean": (V, J), "stats": (2 * J,),
                "feature": (D,)}

    # --- units ----------------------------------------------------------------------------------------
    def maps(self, group: str) -> None:
        return None

    def lift(self, batch: dict, group: str) -> torch.Tensor:
        """The units of ``group`` themselves ``[B, S, D]`` (identity maps)."""
        J = self.channels
        stats = batch["stats"].to(self.dtype)
        s, m = stats[:, :J], stats[:, J:]                                     # [B, J]
        official = self.convention == "official"
        if group == "heads":
            a = batch["heads"].to(self.dtype)                                 # [B, S, D]
            if official:
                share = (self.k - m @ self.g)[:, None] / self.n_head          # [B, 1, D]
                bias = torch.einsum("bj,ljd->bld", s, self.q)[:, self.layer_of_head]   # [B, S, D]
                return a + bias + share
            return a - torch.einsum("bsj,jd->bsd", batch["heads_mean"].to(self.dtype), self.g)
        if group == "vectors":
            a = batch["vec"].to(self.dtype)                                   # [B, V, D]
            keep = (~self.is_pool).to(a.dtype)[None, :, None]                 # the pool's units take no share
            if official:
                return a + keep * ((self.k - m @ self.g)[:, None] / self.n_vec)
            return a - torch.einsum("bvj,jd->bvd", batch["vec_mean"].to(self.dtype), self.g)
        if group == "consts":                                                 # centred: attn_bias, out_bias
            return torch.stack([s @ self.attn_bias, self.k.expand(s.shape[0], -1)], 1)
        raise KeyError(group)

    def rank(self, group: str, n_samples: int) -> int:
        return official_rank(group, self.head_rank, self.width, self.layout_dim, n_samples)


def build_readout(lens: Lens, convention: str = "official") -> UnitSource:
    """The low-rank unit source of ``lens``: :class:`MapSource` for an attention pool, else the
    CLS-form :class:`~.readout.Readout` (CLS and average pooling)."""
    return MapSource(lens, convention) if lens.pool is not None else Readout(lens, convention)
