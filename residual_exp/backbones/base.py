"""The backbone interface and registry (``model=NAME``).

A :class:`Backbone` wraps one pretrained model and gives the rest of the code everything
it needs, whatever the family (open_clip, timm, BLIP, …):

* ``transform``            PIL image → tensor (the model's own preprocessing)
* ``encode_image(x)``      the model's image feature ``[B, D]`` (unnormalised)
* ``encode_text(tokens)``  text feature ``[B, D]`` (``has_text`` models only)
* ``tokenize(texts)``      tokens for ``encode_text``
* ``decompose(x)``         ``(units [B, U, D], feature [B, D])`` with ``units.sum(1) == feature``
* ``decompose_raw(x)``     what the cache stores (low-rank: per-head z, projected embedding/MLPs,
                           the final norm's statistics); ``readout()`` turns it into units
* ``pooling()``            the readout: CLS token, average or attention pooling
                           (:mod:`residual_exp.decompose.pooling`)
* ``layout``               the :class:`~residual_exp.decompose.units.UnitLayout` of those units
                           (``use_convention`` picks the official or the centred definition)
* ``vision``               the ``nn.Module`` holding the image tower (what ``finetune`` trains)
* ``logit_scale``          the temperature of the zero-shot classifier (float)
* ``logit_bias``           its bias (SigLIP's sigmoid-loss bias; 0 for the others)

Builders are registered per *family* with :func:`register_backbone` and receive the ``model``
config node (``name, family, arch, pretrained, weights, image_size, logit_scale, cache_dir,
params``).  A model preset (``conf/model/NAME.yaml``) is the one source of truth for a
model: its family, architecture, weights tag and family options (e.g. ``params.quick_gelu``).
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..decompose.pooling import TOKEN, Pool, avg_raw, build_readout
from ..decompose.readout import CONVENTIONS, Lens, UnitSource, raw_units
from ..decompose.units import UnitLayout


class UnsupportedArchitecture(ValueError):
    """The readout is not linear in the residual units (attention pooling, ResNets, …)."""


class UnknownArchitecture(UnsupportedArchitecture):
    """``model.arch`` names no architecture of its family (the message lists where to look)."""


class Backbone(nn.Module, abc.ABC):
    family: str = "?"

    def __init__(self, name: str, output_dim: int, num_layers: int, num_heads: int, transform: Callable,
                 image_size: int, has_text: bool, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.name = name
        self.output_dim = int(output_dim)
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.transform = transform
        self.image_size = int(image_size)
        self.has_text = bool(has_text)
        self._logit_scale = float(logit_scale)
        self.logit_bias = 0.0                 # zero-shot logit bias (SigLIP-style models set theirs)
        self.convention = "official"          # conventions.units: how units are defined (decompose/readout.py)
        self.precision = "fp32"               # the encoding forward: fp32 | bf16 (autocast on CUDA)
        self._readouts: dict = {}

    # --- towers -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vision(self) -> nn.Module: ...

    @abc.abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no text tower; use the prototype classifier")

    def tokenize(self, texts: list[str]) -> Any:
        raise NotImplementedError(f"{self.name} has no text tower")

    @property
    def logit_scale(self) -> float:
        return self._logit_scale

    # --- decomposition ------------------------------------------------------------------
    @abc.abstractmethod
    def _install(self, hs, store: dict) -> None:
        """Install hooks/instance forwards on ``hs`` that fill ``store`` during a forward:
        ``embed`` ``[B, W]``, ``heads`` (per layer ``[B, H, Dh]``), ``mlps`` (per layer ``[B, W]``)
        and ``final_in`` ``[B, W]``, the row entering the final norm — each read by
        ``self.pooling().rows`` (CLS row, token mean, or every token ``[B, N, …]`` for a deferred
        pool); attention pools add ``pool_weights`` ``[B, J, n]`` and ``pool_mlp`` ``[B, D0]``."""

    @abc.abstractmethod
    def lens(self) -> Lens:
        """The readout parameters (out-projections, final norm, projection) of the current weights."""

    def use_convention(self, convention: str) -> "Backbone":
        if convention not in CONVENTIONS:
            raise ValueError(f"conventions.units={convention!r}; valid: {', '.join(CONVENTIONS)}")
        self.convention = convention
        return self

    @abc.abstractmethod
    def final(self) -> tuple[nn.Module | None, torch.Tensor | None, torch.Tensor | None]:
        """``(final norm, output projection [W, D] or None, its bias or None)``."""

    def pooling(self) -> Pool:
        """How the feature is read off the token stream (:class:`~residual_exp.decompose.pooling.Pool`):
        the CLS token unless the family says otherwise."""
        return TOKEN

    def readout(self, convention: str | None = None) -> UnitSource:
        """The exact unit readout under ``convention`` (default: the backbone's), built from the
        current weights (rebuilt whenever a parameter moves or is modified in place)."""
        convention = convention or self.convention
        key = (convention, tuple((p.data_ptr(), p.dtype, p._version) for p in self.parameters()))
        if self._readouts.get(convention, (None,))[0] != key:
            self._readouts[convention] = (key, build_readout(self.lens(), convention))
        return self._readouts[convention][1]

    @property
    def layout(self) -> UnitLayout:
        return self.readout().layout

    @contextmanager
    def decomposing(self) -> Iterator[dict]:
        """Hooks are live inside the block and always removed after it."""
        from ..decompose.hooks import hooks
        store: dict = {}
        with hooks() as hs:
            self._install(hs, store)
            yield store

    def decompose_raw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the cache stores of ``images`` (:func:`~residual_exp.decompose.readout.raw_units`):
        the forward in ``self.precision`` (bf16 autocast on CUDA), the unit algebra in the weights'
        dtype."""
        autocast = self.precision == "bf16" and images.is_cuda
        pool = self.pooling()
        dt = next(self.parameters()).dtype
        with self.decomposing() as store:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                feature = self.encode_image(images)
            assert len(store["heads"]) == len(store["mlps"]) == self.num_layers, "hooks did not fire once per block"
            norm, proj, _ = self.final()
            if pool.kind == "map":
                return self.readout().raw(store, feature)
            if pool.deferred:
                return avg_raw(norm, proj, store, pool.start, feature, dt)
            return raw_units(norm, proj, store["final_in"], store["embed"], store["heads"], store["mlps"], feature, dt)

    def decompose(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(units [B, U, D], feature [B, D])``; ``units.sum(1)`` equals ``feature``."""
        raw = self.decompose_raw(images)
        units = self.readout().units(raw)
        assert units.shape == (images.shape[0], len(self.layout), self.output_dim), units.shape
        return units, raw["feature"]


# --- registry ---------------------------------------------------------------------------
@dataclass
class BackboneEntry:
    family: str
    builder: Callable[..., Backbone]
    description: str = ""
    reference: Callable | None = None     # (backbone, images) -> decompose.references.Reference


REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(family: str, description: str = "", reference: Callable | None = None):
    """Register ``builder(model_cfg) -> Backbone`` for ``model.family=FAMILY``, and the family's
    independent recomputation ``reference(backbone, images)`` (:mod:`residual_exp.decompose.references`;
    None: the family has none) that ``task=check_decomposition`` compares every unit with.  The
    family modules register themselves when :mod:`residual_exp.backbones` is imported."""
    def deco(fn):
        if family in REGISTRY:
            raise ValueError(f"backbone family {family!r} registered twice")
        REGISTRY[family] = BackboneEntry(family, fn, description, reference)
        return fn
    return deco
