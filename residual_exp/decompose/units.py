"""The labelled unit stack.

Unit order (documented, stable; TransformerLens style)::

    embed                         the CLS residual entering block 0 (after ln_pre, if any)
    L0H0 … L0H{H-1}, L0.mlp       layer 0: every attention head, then the MLP
    L1H0 … L1.mlp                 layer 1 …
    …
    pool.mlp                      (attention-pooled readouts only) the pooling block's MLP branch
    attn_bias                     (centred convention only) Σ_l attention out-projection biases
    out_bias                      (centred convention only) final-norm β through the projection (+ its bias)

Every unit is a vector in the model's *output* space; their sum is the image feature
(see :mod:`.readout`).  ``kind`` is one of ``embed | head | mlp | pool | const``: ``pool`` is
a unit of the readout itself (the MLP branch of an attention pool, MAP), after the last layer.  Under the official
convention (the default) the biases and the final norm's centring are shared out among the
units, so there are no constant units: ``U = 1 + L·(H + 1)``; the centred convention adds the
two constant units: ``U = 1 + L·(H + 1) + 2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..catalog import UnitKind, names

KINDS = names(UnitKind)


@dataclass(frozen=True)
class UnitLayout:
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int, ...]   # -1 for embed / const units
    heads: tuple[int, ...]    # -1 unless kind == "head"

    @classmethod
    def vit(cls, num_layers: int, num_heads: int, constants: bool = True,
            pool: tuple[str, ...] = ()) -> "UnitLayout":
        """The layout of a ViT; ``pool``: the readout's own units (e.g. ``("pool.mlp",)``);
        ``constants``: append the ``attn_bias`` / ``out_bias`` units."""
        names, kinds, layers, heads = ["embed"], ["embed"], [-1], [-1]
        for l in range(num_layers):
            for h in range(num_heads):
                names.append(f"L{l}H{h}"); kinds.append("head"); layers.append(l); heads.append(h)
            names.append(f"L{l}.mlp"); kinds.append("mlp"); layers.append(l); heads.append(-1)
        for name in pool:
            names.append(name); kinds.append("pool"); layers.append(-1); heads.append(-1)
        for c in ("attn_bias", "out_bias") if constants else ():
            names.append(c); kinds.append("const"); layers.append(-1); heads.append(-1)
        return cls(tuple(names), tuple(kinds), tuple(layers), tuple(heads))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1

    @property
    def num_heads(self) -> int:
        return max(self.heads) + 1

    def indices(self, kinds: str | Iterable[str]) -> list[int]:
        """Indices of the units whose kind is in ``kinds`` (a kind, or several, or ``all``).

        Group names: ``heads`` → head, ``mlps`` → mlp, ``heads+mlps``; ``all`` → every unit.
        """
        if isinstance(kinds, str):
            alias = {"heads": ("head",), "mlps": ("mlp",), "heads+mlps": ("head", "mlp"),
                     "all": KINDS, "output": ()}
            kinds = alias.get(kinds, tuple(kinds.split("+")))
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown unit kind(s) {bad}; valid: {KINDS} or heads/mlps/heads+mlps/all")
        return [i for i, k in enumerate(self.kinds) if k in kinds]

    def counts(self) -> dict[str, int]:
        """Units per kind (``pool`` only when the readout has pool units)."""
        n = {k: sum(1 for x in self.kinds if x == k) for k in KINDS}
        return {k: v for k, v in n.items() if k != "pool" or v}

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no unit named {name!r} (have {self.names[0]} … {self.names[-1]})") from None
