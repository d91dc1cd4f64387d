"""A trained run as one self-contained adapted encoder: λ folded into the readout.

Every selected unit's readout ``RD_u = Φ_uᵀ diag(λ_u) Φ_u (x_u − µ_u)`` is linear in that
unit's own lifted input ``x_u`` (:mod:`residual_exp.decompose.readout`), so the adapted image
feature is a fixed linear function of what the decomposed forward already computes at the CLS
token — per head its value mix ``z_h``, per MLP (and the embedding) its projected contribution
``a = Pᵀ(γ ⊙ c)`` and channel mean, and the final norm's σ, µ::

    feature = Σ_h F_h z_h / σ  +  Σ_v (A_v a_v + m_v mean(c_v)) / σ  +  b_inv / σ  +  b_mu µ/σ  +  b  (+ W f)

with one ``D × head_dim`` matrix per head and one ``D × D`` matrix per MLP (:class:`Folded`).
The exported forward never builds the ``[B, U, D]`` unit stack; its cost is the plain forward
plus a few CLS-token matrix products.  An attention-pooled readout (MAP) has no per-unit map to
fold into (its units are stored as such, :mod:`residual_exp.decompose.pooling`): the fold is one
``D × D`` matrix per unit on the units the decomposed forward rebuilds (``units``; ~U·D² numbers,
e.g. 370 MB in float32 for SigLIP B/16 with every unit adapted).  ``base``, ``linear_adapter`` and ``spectral_adapter``
read only the model's feature ``f`` (``W f + b``) and run the plain forward; ``finetune``
exports its tuned image tower.

An export folder holds ``adapted.json`` (everything needed to rebuild the model: backbone
identity and weights reference — or a copy, ``backbone.safetensors`` —, conventions, classifier
kind, class names, preprocessing, provenance) and ``adapted.safetensors`` (the folded tensors and
the classifier weights).  :func:`load_adapted` rebuilds it in a fresh process with nothing else.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decompose.readout import UnitSource
from .errors import UserError, writable_dir

log = logging.getLogger(__name__)
EXPORT_FORMAT = 1
CONFIG_FILE, TENSORS_FILE, BACKBONE_FILE = "adapted.json", "adapted.safetensors", "backbone.safetensors"


@dataclass
class Folded:
    """The adapted feature as a linear function of the decomposed forward's CLS quantities."""
    dim: int
    heads: torch.Tensor | None = None        # [L·H, D, Dh]  on z / σ
    vectors: torch.Tensor | None = None      # [1+L, D, D]   on a / σ (embed, MLPs)
    vec_mean: torch.Tensor | None = None     # [1+L, D]      on mean(c) / σ
    b_inv: torch.Tensor | None = None        # [D]           on 1 / σ
    b_mu: torch.Tensor | None = None         # [D]           on µ / σ
    bias: torch.Tensor | None = None         # [D]
    feature: torch.Tensor | None = None      # [D, D]        on the model's feature f
    units: torch.Tensor | None = None        # [U, D, D]     on every unit (sources without maps: MAP readouts)
    batch_mean: "Folded | None" = None       # compat=official (d): added as the batch mean
    extra: dict = field(default_factory=dict)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}{k}": v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        if self.batch_mean is not None:
            out.update(self.batch_mean.tensors(prefix + "batch_mean."))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, dim: int, prefix: str = "") -> "Folded":
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        bm = prefix + "batch_mean."
        inner = cls.from_tensors(tensors, dim, bm) if any(k.startswith(bm) for k in tensors) else None
        return cls(dim, batch_mean=inner, **own)

    @property
    def needs_units(self) -> bool:
        return any(t is not None for t in (self.heads, self.vectors, self.b_inv, self.b_mu, self.units)) or \
            (self.batch_mean is not None and self.batch_mean.needs_units)

    def apply(self, raw: dict | None, feature: torch.Tensor, source=None) -> torch.Tensor:
        """The adapted feature ``[B, D]`` from :meth:`Backbone.decompose_raw`'s output (or, for
        feature-only folds, from the plain feature); ``source`` reads ``raw`` as units (``units``)."""
        dt = next(v.dtype for v in self.__dict__.values() if isinstance(v, torch.Tensor))
        y = torch.zeros(feature.shape[0], self.dim, dtype=dt, device=feature.device)
        if raw is not None and self.units is not None:
            y = y + torch.einsum("bud,ued->be", source.units(raw).to(dt), self.units)
        if raw is not None and self.needs_units:
            st = raw["stats"].to(dt)
            inv = 1.0 / st[:, 0:1]                                              # [B, 1]
            if self.heads is not None:
                y = y + torch.einsum("bsk,sdk->bd", raw["z"].to(dt) * inv[:, :, None], self.heads)
            if self.vectors is not None:
                y = y + torch.einsum("bvd,ved->be", raw["vec"].to(dt) * inv[:, :, None], self.vectors)
                y = y + (raw["vec_mean"].to(dt) * inv) @ self.vec_mean
            if self.b_inv is not None:
                y = y + inv * self.b_inv + (st[:, 1:2] * inv) * self.b_mu
        if self.feature is not None:
            y = y + feature.to(dt) @ self.feature.T
        if self.bias is not None:
            y = y + self.bias
        if self.batch_mean is not None:
            y = y + self.batch_mean.apply(raw, feature, source).mean(0, keepdim=True)
        return y


class Accumulator:
    """Sums per-unit linear maps ``F_u`` on lifted inputs into the :class:`Folded` layout."""

    def __init__(self, readout: UnitSource) -> None:
        self.r = readout
        D, Dh, L = readout.layout_dim, readout.head_dim, readout.layout.num_layers
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        self.on_units = readout.maps("heads") is None              # units stored as such (MAP readouts)
        if self.on_units:
            self.f = Folded(D, units=z(len(readout.layout), D, D), bias=z(D))
        else:
            self.f = Folded(D, heads=z(L * readout.num_heads, D, Dh), vectors=z(L + 1, D, D), vec_mean=z(L + 1, D),
                            b_inv=z(D), b_mu=z(D), bias=z(D))
        self.pos = {u: (g, p) for g, idx in readout.groups.items() for p, u in enumerate(idx)}

    def add(self, unit: int, F_lift: torch.Tensor) -> None:
        """``F_lift`` ``[D, R]``: the unit's contribution as a map of its lifted input."""
        g, p = self.pos[int(unit)]
        Fl, f = F_lift.double(), self.f
        if self.on_units:                    # x = the unit itself
            f.units[int(unit)] += Fl
        elif g == "heads":                   # x = [z/σ, 1/σ, µ/σ, 1]
            Dh = self.r.head_dim
            f.heads[p] += Fl[:, :Dh]
            f.b_inv += Fl[:, Dh]; f.b_mu += Fl[:, Dh + 1]; f.bias += Fl[:, Dh + 2]
        elif g == "vectors":                 # x = [a/σ, µ/σ, mean(c)/σ, 1]
            D = self.r.layout_dim
            f.vectors[p] += Fl[:, :D]
            f.b_mu += Fl[:, D]; f.vec_mean[p] += Fl[:, D + 1]; f.bias += Fl[:, D + 2]
        else:                                # consts: x = [1/σ, 1]
            f.b_inv += Fl[:, 0]; f.bias += Fl[:, 1]

    def add_unit_map(self, unit: int, M: torch.Tensor) -> None:
        """``M`` ``[D, D]`` acting on the unit itself (``unit = G x``): folded as ``M G``."""
        g, p = self.pos[int(unit)]
        G = self.r.maps(g)
        self.add(unit, M.double() if G is None else M.double() @ G[p].double())


class AdaptedModel(nn.Module):
    """An exported run: ``encode_image(images) -> adapted features`` (open_clip's interface),
    ``forward(images) -> logits``, ``preprocess`` (PIL image → tensor), ``classnames``."""

    def __init__(self, backbone, folded: Folded, classifier_weight: torch.Tensor, scale: float,
                 normalize_weights: bool, classnames: list[str], config: dict, bias: float = 0.0) -> None:
        super().__init__()
        self.bias = float(bias)
        self.backbone = backbone
        self.folded = folded
        for k, v in folded.tensors().items():                 # the dtype given (float32 from an export folder)
            self.register_buffer("folded_" + k.replace(".", "__"), v)
        self.register_buffer("classifier", classifier_weight)
        self.scale, self.normalize_weights = float(scale), bool(normalize_weights)
        self.classnames, self.config = list(classnames), config
        self.preprocess = backbone.transform
        self._sync()

    def _sync(self) -> None:
        """Point the fold at this module's buffers (so ``.to()``/``.double()`` move it too)."""
        tensors = {k[len("folded_"):].replace("__", "."): v for k, v in self.named_buffers() if k.startswith("folded_")}
        self.folded = Folded.from_tensors(tensors, self.folded.dim)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._sync()
        return out

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        bb = self.backbone
        images = images.to(next(bb.parameters()).device, next(bb.parameters()).dtype)
        if self.folded.needs_units:
            raw = bb.decompose_raw(images)
            feats = self.folded.apply(raw, raw["feature"], bb.readout())
        else:
            feats = self.folded.apply(None, bb.encode_image(images))
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.encode_image(images), dim=-1)
        w = F.normalize(self.classifier, dim=-1) if self.normalize_weights else self.classifier
        logits = self.scale * f @ w.to(f.dtype).T
        return logits + self.bias if self.bias else logits


def load_adapted(folder: str | Path, device: str = "cpu", verify: bool = True) -> AdaptedModel:
    """Rebuild an exported run (``task=export``) from its folder alone; with ``verify`` (default) every
    file must match the folder's ``manifest.json`` first (:func:`verify_export`)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from .backbones import build_backbone
    from .config import ModelConfig
    folder = Path(folder).expanduser()
    config = read_export_config(folder)
    if verify:
        verify_export(folder)
    model_cfg = dict(config["backbone"])
    if config.get("weights") == "copy":
        model_cfg["weights"] = str(folder / BACKBONE_FILE)
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
    backbone = build_backbone(node).use_convention(config["conventions"]["units"]).eval()
    backbone.precision = "fp32"
    for p in backbone.parameters():
        p.requires_grad_(False)
    tensors = load_file(str(folder / TENSORS_FILE))
    cls = tensors.pop("classifier")
    folded = Folded.from_tensors(tensors, int(config["output_dim"]))
    c = config["classifier"]
    return AdaptedModel(backbone, folded, cls, c["scale"], c["normalize_weights"], config["classnames"],
                        config, c.get("bias", 0.0)).to(device).eval()


# --- integrity of an export folder ------------------------------------------------------------------------
# ``manifest.json`` records the size and BLAKE2b checksum of every file of the folder (adapted.json — class
# names, scale, backbone reference —, adapted.safetensors and, when copied, backbone.safetensors) and the
# identity of a referenced weights file.  :func:`load_adapted` (so task=predict and task=evaluate) refuses a
# folder whose files no longer match it; ``verify=False`` (``task.verify_export=false``) skips the check.
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
EXPORT_FILES = (CONFIG_FILE, TENSORS_FILE, BACKBONE_FILE)


class ExportError(UserError):
    """An export folder that cannot be used as it is (missing, changed or foreign files): one line, exit 2."""


def write_manifest(folder: Path, referenced_weights: str | None = None) -> Path:
    """Checksum every export file present in ``folder`` (and fingerprint a referenced weights file)."""
    from .cache import file_fingerprint, file_record
    folder = Path(folder)
    files = {name: file_record(folder / name) for name in EXPORT_FILES if (folder / name).is_file()}
    record = {"format": MANIFEST_FORMAT, "files": files}
    if referenced_weights:
        record["weights"] = {"path": str(referenced_weights), "fingerprint": file_fingerprint(referenced_weights)}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(record, indent=1))
    return path


def verify_export(folder: str | Path) -> None:
    """Raise a user error naming the file unless every file of the export matches ``manifest.json``."""
    from .cache import file_fingerprint, file_record
    folder = Path(folder).expanduser()
    skip = "(task.verify_export=false, or load_adapted(..., verify=False), skips this check)"
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST_FILE}: not an export of this version, or a copy without its "
                          f"checksums; export the run again {skip}")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: unreadable export manifest ({type(e).__name__}) {skip}") from None
    for name in (CONFIG_FILE, TENSORS_FILE):
        if name not in files:
            raise ExportError(f"{path}: does not list {name}: not the manifest of an export {skip}")
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise ExportError(f"{p}: missing from the export (its manifest lists it) {skip}")
        have = file_record(p)
        if list(have) != list(want):
            what = "size" if have[0] != want[0] else "checksum"
            raise ExportError(f"{p}: changed since it was exported ({what} differs from {MANIFEST_FILE}): the "
                              f"export is damaged or was edited; export the run again {skip}")
    ref = manifest.get("weights")
    if ref:
        weights = Path(ref["path"])
        if not weights.is_file():
            raise ExportError(f"{weights}: the backbone weights this export references are missing (re-export with "
                              f"task.copy_weights=true to keep a copy in the folder) {skip}")
        if file_fingerprint(weights) != ref.get("fingerprint"):
            raise ExportError(f"{weights}: the backbone weights this export references changed since it was "
                              f"exported {skip}")


def read_export_config(folder: str | Path) -> dict:
    """``adapted.json`` of an export folder, or a user error naming what is wrong."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ExportError(f"{folder}: {'is a file, not' if folder.exists() else 'no such'} export folder (the output "
                          "of `python -m residual_exp task=export`)")
    from .results import read_json_object
    path = folder / CONFIG_FILE
    config = read_json_object(path, "export config", f"{folder}: no {CONFIG_FILE}: not an export folder (the output "
                                                     "of `python -m residual_exp task=export`)", ExportError)
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: export format {config.get('format')!r}, this version reads {EXPORT_FORMAT}")
    return config


def output_folder(out: Path, key: str = "out") -> Path:
    """``out`` as a place for a new export: a new or empty folder, or an earlier export (replaced); anything
    else (a file, a folder with other content, a folder that cannot be written) is refused before work."""
    writable_dir(out, key)
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise UserError(f"{key}={out}: exists and is not an export folder (it holds other files); choose a new "
                        "or empty folder")
    return out
