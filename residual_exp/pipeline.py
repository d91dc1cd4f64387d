"""The stages every task shares, around one frozen backbone: encode a split once (cached), fit
the per-unit PCA bases on a reference set (cached), build the frozen classifier (cached).

:class:`Session` holds what the stages need — the job config, the backbone and its weights
identity, the content-keyed cache, the device — so that ``task=train`` and the analyses call
the same code with the same cache keys::

    s = Session.open(cfg, cfg.model)
    enc, ds = s.encode(cfg.dataset, "train")            # Encoded units / features / labels
    unit_basis, output_basis = s.reference_bases()       # cfg.pca: reference dataset, split, size
    head = s.classifier(cfg.dataset, ds.classnames, ds.templates)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cache import Cache
from .classifiers import ClassifierHead, frozen_classifier
from .data.registry import build_split
from .encode import Encoded, dataset_identity, encode_split, fit_bases, model_identity, source_for, subsample_split
from .runtime import frozen_backbone, resolve_device, seed_everything


def reference_dataset(pca_cfg, dataset_cfg):
    """The dataset node the bases are fitted on: ``pca.reference``, or the target dataset when null."""
    return dataset_cfg if pca_cfg.reference is None else pca_cfg.reference


@dataclass
class Session:
    cfg: Any                     # the job's config
    model_cfg: Any               # the backbone's model node (cfg.model, or another model of an analysis)
    backbone: Any                # frozen Backbone
    model_id: dict               # weights identity (part of every cache key)
    cache: Cache
    device: str
    progress: bool = True
    batch_size: int | None = None   # images per forward (None: each dataset's own batch_size)

    @classmethod
    def open(cls, cfg, model_cfg=None, progress: bool | None = None, batch_size: int | None = None) -> "Session":
        """Seed (random-init weights depend on the seed only, as the cache key says), resolve the
        device, build the frozen backbone of ``model_cfg`` (default ``cfg.model``)."""
        model_cfg = cfg.model if model_cfg is None else model_cfg
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        backbone = frozen_backbone(model_cfg, device).use_convention(cfg.conventions.units)
        precision = model_cfg.get("precision", "auto")
        backbone.precision = ("bf16" if device.startswith("cuda") else "fp32") if precision == "auto" else precision
        cache = Cache(cfg.cache.dir, enabled=cfg.cache.enabled, verify=cfg.cache.verify)
        return cls(cfg, model_cfg, backbone, model_identity(model_cfg, cfg.seed), cache, device,
                   cfg.trainer.progress_bar if progress is None else bool(progress), batch_size)

    @staticmethod
    def data(ds_cfg, names) -> dict:
        """``{name: dataset}`` of the splits ``names`` of ``ds_cfg`` (guarded:
        :func:`~residual_exp.data.registry.build_split`), before any model exists — bad data is refused
        before a backbone is built; :meth:`preprocess` then gives them the backbone's preprocessing."""
        return {name: build_split(ds_cfg, name) for name in names}

    def preprocess(self, splits: dict) -> dict:
        for d in splits.values():
            d.transform = self.backbone.transform
        return splits

    def split(self, ds_cfg, split: str, max_samples: int | None = None):
        """``(dataset, identity)`` of ``split``, uniformly subsampled to ``max_samples`` (seeded)."""
        return subsample_split(build_split(ds_cfg, split, self.backbone.transform), ds_cfg, split,
                               self.backbone.transform, max_samples, self.cfg.seed)

    def encode(self, ds_cfg, split: str, max_samples: int | None = None) -> tuple[Encoded, Any]:
        """Every image of ``split`` decomposed once (cached): ``(Encoded, dataset)``."""
        ds, ident = self.split(ds_cfg, split, max_samples)
        return self._encode(ds, ident, ds_cfg), ds

    def encode_dataset(self, ds, ds_cfg) -> Encoded:
        """Like :meth:`encode`, for an already built split (no subsampling)."""
        return self._encode(ds, dataset_identity(ds_cfg, ds, self.backbone.transform), ds_cfg)

    @property
    def storage_dtype(self) -> str:
        """``cache.dtype``; ``auto`` is float32 for the tiny CLIP and float16 for real backbones."""
        dtype = self.cfg.cache.dtype
        if dtype == "auto":
            return "float32" if self.model_cfg.family == "tiny_clip" else "float16"
        return dtype

    @property
    def layout(self) -> str:
        return self.cfg.cache.layout

    @property
    def source(self):
        """How this session's cached encodings are read as units (its layout and convention)."""
        return source_for(self.backbone, self.layout)

    def _encode(self, ds, ident: dict, ds_cfg) -> Encoded:
        return encode_split(self.backbone, ds, self.cache, {"model": self.model_id, "dataset": ident}, self.device,
                            self.batch_size or ds_cfg.batch_size, ds_cfg.num_workers, self.storage_dtype,
                            self.cfg.cache.memory_budget_gb, self.progress, self.layout)

    def bases(self, ref_cfg, split: str, max_samples: int | None = None):
        """``(unit_basis, output_basis)``: per-unit PCA on ``ref_cfg``'s ``split`` (cached)."""
        ds, ident = self.split(ref_cfg, split, max_samples)
        return fit_bases(self.backbone, ds, self.cache, {"model": self.model_id, "dataset": ident}, self.device,
                         self.batch_size or ref_cfg.batch_size, ref_cfg.num_workers, self.progress, self.layout)

    def reference_bases(self, pca_cfg=None):
        """The bases ``pca`` (default ``cfg.pca``) describes: ``pca.reference`` / ``split`` / ``max_samples``."""
        pca = self.cfg.pca if pca_cfg is None else pca_cfg
        return self.bases(reference_dataset(pca, self.cfg.dataset), pca.split, pca.max_samples)

    def classifier(self, ds_cfg, classnames, templates, train_encoding=None) -> ClassifierHead:
        """The frozen head every method trains against (``classifier``: text centroids, or train-split
        prototypes — ``train_encoding()`` or the cached train encoding)."""
        train = train_encoding or (lambda: self.encode(ds_cfg, "train")[0])
        return frozen_classifier(self.backbone, classnames, templates, self.cache, self.model_id, train,
                                 self.device, self.progress, self.cfg.conventions.prototype,
                                 self.cfg.get("classifier", "auto"))
