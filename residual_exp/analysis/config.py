"""Structured-config schemas of the ``analysis`` group (``task=analysis analysis=NAME``).

Every ``conf/analysis/NAME.yaml`` starts with ``defaults: [NAME_schema, _self_]`` so that
Hydra validates it against the dataclass below at compose time (unknown key or wrong type →
an error naming the key).  :func:`register_analysis_configs` stores the schemas in Hydra's
ConfigStore under group ``analysis``; ``residual_exp.config.register_configs`` calls it.

Shared keys (:class:`AnalysisConfig`):

``models``       model config names (``conf/model/NAME.yaml``) to analyse; an entry may also be
                 a dict ``{name: NAME, label: ..., <ModelConfig keys>}`` overriding that
                 file (e.g. ``{name: tiny_clip, pretrained: null, label: random}``).  Empty →
                 the current ``model`` node (with its command-line overrides).
``split``        split of the dataset(s) the units are read from.
``max_samples``  cap on the images of that split (seeded uniform subsample; null: all).
``batch_size``   images per forward (null: ``dataset.batch_size``).
``progress``     tqdm progress bars.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

ANALYSES = ("intrinsic_dimension", "spectral_similarity", "coarse_selection", "text_spans")


@dataclass
class AnalysisConfig:
    name: str = MISSING
    models: List[Any] = field(default_factory=list)
    split: str = "test"
    max_samples: Optional[int] = 2000
    batch_size: Optional[int] = None
    progress: bool = True


@dataclass
class IntrinsicDimensionAnalysis(AnalysisConfig):
    """Per unit: PCs for ``variance_threshold`` of the variance, TwoNN, their ratio."""
    name: str = "intrinsic_dimension"
    units: str = "heads+mlps"          # heads | mlps | heads+mlps | all (constant units give NaN)
    variance_threshold: float = 0.99   # linear dimension = #PCs reaching this EVR
    discard_fraction: float = 0.1      # TwoNN: largest μ = r2/r1 left out of the fit
    estimator: str = "linear"          # TwoNN fit: linear (Facco et al.) | mle
    chunk_size: Optional[int] = None   # TwoNN distance chunk (rows); null: ≈256 MiB per chunk


@dataclass
class SpectralSimilarityAnalysis(AnalysisConfig):
    """Spectral cosine of each unit's PCA basis: reference vs each dataset, and across models."""
    name: str = "spectral_similarity"
    datasets: List[Any] = field(default_factory=list)   # dataset names or {name:, params:} dicts; [] → current
    reference: Optional[str] = None    # dataset of the reference bases (null: pca.reference / target)
    reference_split: Optional[str] = None   # null: pca.split
    reference_max_samples: Optional[int] = None   # null: pca.max_samples
    units: str = "heads"               # heads | heads+mlps | mlps | all
    evr: Optional[float] = 0.9         # prune each basis to this EVR before comparing (null: all PCs)
    variants: List[str] = field(default_factory=lambda: ["weighted", "unweighted"])
    cross_model: str = "profile"       # profile | raw | none  (see analysis/similarity.py)


@dataclass
class CoarseSelectionAnalysis(AnalysisConfig):
    """Rank heads by a score, keep the top ones, ablate the rest, evaluate."""
    name: str = "coarse_selection"
    score_split: str = "val"           # split the scores are computed on
    split: str = "test"                # split the kept-head classifiers are evaluated on
    scores: List[str] = field(default_factory=lambda: ["zero_shot", "text_alignment", "output_correlation"])
    random_seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    keep_top: List[int] = field(default_factory=lambda: [1])               # absolute head counts
    keep_fractions: List[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0])
    ablations: List[str] = field(default_factory=lambda: ["zero", "mean"])   # zero | mean (reference mean)
    others: str = "drop"               # non-head units (embed, MLPs, biases): drop | add
    evr: Optional[float] = 0.9         # head bases pruning for the text_alignment score


@dataclass
class TextSpansAnalysis(AnalysisConfig):
    """TextSpan/SOMP descriptions of each head's principal components (+ a trained λ run)."""
    name: str = "text_spans"
    dictionary: Optional[str] = None   # text file, one description per line; null: generated default
    units: str = "heads"               # units whose PCs are described
    n_components: int = 5             # PCs listed per unit
    n_descriptions: int = 5            # descriptions per PC (OMP) and per unit (SOMP)
    evr: Optional[float] = 0.99        # PCs entering the per-unit SOMP (null: all)
    center_dictionary: bool = True     # subtract the dictionary's mean embedding, renormalise
    run_dir: Optional[str] = None      # a trained residual_* run (lambda.safetensors + .hydra/config.yaml)
    n_lambda: int = 10                 # most amplified / suppressed components listed


SCHEMAS = {
    "intrinsic_dimension_schema": IntrinsicDimensionAnalysis,
    "spectral_similarity_schema": SpectralSimilarityAnalysis,
    "coarse_selection_schema": CoarseSelectionAnalysis,
    "text_spans_schema": TextSpansAnalysis,
}


def register_analysis_configs() -> None:
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group="analysis", name=name, node=node)
