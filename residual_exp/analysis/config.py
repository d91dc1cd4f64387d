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

from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from omegaconf import MISSING

from ..catalog import (COARSE_OTHERS, SEED_MAX, UNITS_WHAT, Ablation, CrossModel, Estimator, Others, Score, Split, Variant, rule,
                       unit_selection)


def _units_check(node, root, bad) -> None:
    if not unit_selection(node.units):
        bad("units", node.units, UNITS_WHAT)


def _entries(group: str) -> dict:
    """Rules of an ``analysis.models`` / ``analysis.datasets`` entry: a NAME or {name: NAME, label: …, <keys>}."""
    return dict(options=f"group:{group}", entry=group)


@dataclass
class AnalysisConfig:
    run: ClassVar[str] = ""            # import path of the analysis' entry point (tasks/analysis.py dispatches)
    name: str = MISSING
    models: List[Any] = rule(factory=list, item=_entries("model"))
    split: Split = Split.test
    max_samples: Optional[int] = rule(2000, ge=2)
    batch_size: Optional[int] = rule(None, ge=1)
    progress: bool = True


@dataclass
class IntrinsicDimensionAnalysis(AnalysisConfig):
    """Per unit: PCs for ``variance_threshold`` of the variance, TwoNN, their ratio."""
    name: str = "intrinsic_dimension"
    units: str = "heads+mlps"          # a unit selection (constant units give NaN)
    variance_threshold: float = rule(0.99, gt=0, le=1)   # linear dimension = #PCs reaching this EVR
    discard_fraction: float = rule(0.1, ge=0, lt=1)      # TwoNN: largest μ = r2/r1 left out of the fit
    estimator: Estimator = Estimator.linear              # TwoNN fit (linear: Facco et al.)
    chunk_size: Optional[int] = rule(None, ge=1)         # TwoNN distance chunk (rows); null: ≈256 MiB per chunk
    check = staticmethod(_units_check)


@dataclass
class SpectralSimilarityAnalysis(AnalysisConfig):
    """Spectral cosine of each unit's PCA basis: reference vs each dataset, and across models."""
    name: str = "spectral_similarity"
    datasets: List[Any] = rule(factory=list, item=_entries("dataset"))   # dataset names or {name:, params:} dicts; [] → current
    reference: Optional[str] = rule(None, options="group:dataset")   # dataset of the reference bases (null: pca.reference / target)
    reference_split: Optional[Split] = None   # null: pca.split
    reference_max_samples: Optional[int] = rule(None, ge=2)   # null: pca.max_samples
    units: str = "heads"               # a unit selection
    evr: Optional[float] = rule(0.9, gt=0, le=1)   # prune each basis to this EVR before comparing (null: all PCs)
    variants: List[Variant] = rule(factory=lambda: list(Variant), min_len=1)
    cross_model: CrossModel = CrossModel.profile   # see analysis/similarity.py
    check = staticmethod(_units_check)


@dataclass
class CoarseSelectionAnalysis(AnalysisConfig):
    """Rank heads by a score, keep the top ones, ablate the rest, evaluate."""
    name: str = "coarse_selection"
    score_split: Split = Split.val     # split the scores are computed on
    split: Split = Split.test          # split the kept-head classifiers are evaluated on
    scores: List[Score] = rule(factory=lambda: list(Score))
    random_seeds: List[int] = rule(factory=lambda: [0, 1, 2, 3, 4], item=dict(ge=0, lt=SEED_MAX))
    keep_top: List[int] = rule(factory=lambda: [1], item=dict(ge=1))               # absolute head counts
    keep_fractions: List[float] = rule(factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0],
                                       item=dict(gt=0, le=1))
    ablations: List[Ablation] = rule(factory=lambda: list(Ablation), min_len=1)   # mean: the reference mean
    others: Others = Others.drop       # non-head units (embed, MLPs, biases): drop or add
    evr: Optional[float] = rule(0.9, gt=0, le=1)   # head bases pruning for the text_alignment score

    @staticmethod
    def check(node, root, bad) -> None:
        if node.others not in COARSE_OTHERS:
            bad("others", node.others, f"must be one of {' | '.join(COARSE_OTHERS)}")
        if not node.scores and not node.random_seeds:
            bad("scores", [], f"no head ranking to evaluate: name a score ({' | '.join(Score)}) or give "
                              f"analysis.random_seeds")


@dataclass
class TextSpansAnalysis(AnalysisConfig):
    """TextSpan/SOMP descriptions of each head's principal components (+ a trained λ run)."""
    name: str = "text_spans"
    dictionary: Optional[str] = rule(None, path="file", what="no such file (a text file, one description per "
                                                              "line; null: the generated default)")
    units: str = "heads"               # units whose PCs are described
    n_components: int = rule(5, ge=1)  # PCs listed per unit
    n_descriptions: int = rule(5, ge=1)   # descriptions per PC (OMP) and per unit (SOMP)
    evr: Optional[float] = rule(0.99, gt=0, le=1)   # PCs entering the per-unit SOMP (null: all)
    center_dictionary: bool = True     # subtract the dictionary's mean embedding, renormalise
    run_dir: Optional[str] = rule(None, path="dir", what="no such directory (the folder of a trained "
                                                         "residual_* run)")
    n_lambda: int = rule(10, ge=1)     # most amplified / suppressed components listed
    check = staticmethod(_units_check)


ANALYSES: dict[str, type[AnalysisConfig]] = {a.__dataclass_fields__["name"].default: a for a in (
    IntrinsicDimensionAnalysis, SpectralSimilarityAnalysis, CoarseSelectionAnalysis, TextSpansAnalysis)}


def register_analysis_configs() -> None:
    from hydra.core.config_store import ConfigStore
    cs = ConfigStore.instance()
    for name, node in ANALYSES.items():
        cs.store(group="analysis", name=f"{name}_schema", node=node)
