"""The catalog: every allowed value and every dataset / model / method fact, written once.

Torch-free (imports only omegaconf, and Hydra's config repository when a spec is read):

* :mod:`.values` — the closed sets as ``StrEnum`` types (the config schemas' field types);
* :mod:`.specs`  — :class:`DatasetSpec`, :class:`ModelSpec`, :class:`MethodSpec` (the ``spec:``
  node of each option's YAML file), the backbone :data:`FAMILIES`, :func:`spec` / :func:`options`
  to read other options, :func:`needs_bases`, :func:`load` (import paths named in specs);
* :mod:`.fields` — :func:`rule`, the range and existence rules declared next to schema fields.
"""
from .fields import rule
from .specs import (FAMILIES, SPEC_TYPES, DatasetSpec, FamilySpec, MethodSpec, ModelSpec, grid, load, method_order, needs_bases, option_choices, spec_of,
                    option, options, spec)
from .values import (COARSE_OTHERS, EVAL_SPLITS, OUTPUT_UNITS, RUN_SPLITS, SEED_MAX, SPLIT_SEED, TRAINER_PRECISIONS, UNIT_GROUPS, UNITS_WHAT,
                     Ablation,
                     Accelerator, ActsOn, CacheAction, CacheDtype, CacheKind, CacheLayout, CheckDtype, Classifier, Compat,
                     CrossModel, Estimator, EvrRule, Init, ModelPrecision, Needs, Others, Pooling, Protocol, Prototype, Score, Selection,
                     SimilarityUnweighted, SimilarityWeights, Split, UnitConvention, UnitKind, Variant, Verify, names,
                     unit_selection)

__all__ = ["rule", "FAMILIES", "SPEC_TYPES", "DatasetSpec", "FamilySpec", "MethodSpec", "ModelSpec", "load",
           "needs_bases", "method_order", "grid", "option_choices", "COARSE_OTHERS", "option", "options", "spec", "spec_of", "EVAL_SPLITS", "OUTPUT_UNITS", "RUN_SPLITS", "SEED_MAX", "SPLIT_SEED",
           "TRAINER_PRECISIONS", "UNIT_GROUPS", "UNITS_WHAT", "unit_selection", "Ablation", "Accelerator", "ActsOn", "CacheAction", "CacheDtype",
           "CacheKind", "CacheLayout", "CheckDtype", "Classifier", "Compat", "CrossModel", "Estimator", "EvrRule", "Init",
           "ModelPrecision", "Needs", "Others", "Pooling", "Protocol", "Prototype", "Score", "Selection", "SimilarityUnweighted",
           "SimilarityWeights", "Split", "UnitConvention", "UnitKind", "Variant", "Verify", "names"]
