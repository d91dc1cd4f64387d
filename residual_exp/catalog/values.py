"""Every closed set of allowed values, once: ``StrEnum`` types.

They are the field types of the config schemas (:mod:`residual_exp.config`,
:mod:`residual_exp.analysis.config`), so OmegaConf refuses a value outside the set when the
config is composed (``method.others=bogus``), and every module that needs the set imports it
from here (``tuple(Others)``, ``Others.mean``).  A member's name is its value (OmegaConf
matches enum values by name), and a ``StrEnum`` member *is* that string: it compares, hashes,
formats and serialises (JSON, cache keys, W&B) exactly like it.

Open sets — the options of a config group (models, datasets, methods, tasks, analyses) and
the registered backbone families — are not enums: they grow with a YAML file or a plugin.
"""
from __future__ import annotations

from enum import StrEnum


def names(enum: type[StrEnum]) -> tuple[str, ...]:
    """The allowed values of ``enum``, in declaration order."""
    return tuple(m.value for m in enum)


class Split(StrEnum):
    """A dataset split; ``reference`` is the one the PCA bases are fitted on."""
    train = "train"
    val = "val"
    test = "test"
    reference = "reference"


EVAL_SPLITS = (Split.val.value, Split.test.value)                   # the splits a trained method is scored on
RUN_SPLITS = (Split.train.value, Split.val.value, Split.test.value)  # the splits task=train encodes


class Protocol(StrEnum):
    """How a dataset's train / val / test come from its files (DESIGN.md §1)."""
    carve_val = "carve_val"        # val carved (stratified, seed 42) from the official train split
    three_way = "three_way"        # one pool split 80 / 10 / 10
    official = "official"          # the official train / val / test lists
    synthetic = "synthetic"        # generated on the fly (sizes from dataset.params)
    folder = "folder"              # a user's folder (image_folder)


class ActsOn(StrEnum):
    """What a method's adapter reads: the model's output feature or its residual units."""
    output = "output"
    units = "units"


class Needs(StrEnum):
    """What an adapter's ``prepare`` takes: the stored feature, the stored units, or images."""
    feature = "feature"
    units = "units"
    images = "images"


class Others(StrEnum):
    """The units a residual method does not select: dropped, replaced by their reference mean,
    or added unchanged."""
    drop = "drop"
    mean = "mean"
    add = "add"


COARSE_OTHERS = (Others.drop, Others.add)      # the non-head units of the coarse-selection analysis


class Init(StrEnum):
    """Initialisation of the trained parameters (each method's spec lists the ones it takes)."""
    normal = "normal"              # λ ~ N(1, 1) (the paper's)
    ones = "ones"
    eigenvalues = "eigenvalues"    # each PC's eigenvalue / the unit's largest kept one
    default = "default"            # linear_adapter: nn.Linear's own init
    identity = "identity"          # linear_adapter: W = I, b = 0


class UnitKind(StrEnum):
    """The kinds of residual unit (decompose/units.py); ``pool`` is an attention pool's MLP branch
    (``pool.mlp``), ``const`` the bias / centring terms of the centred convention."""
    embed = "embed"
    head = "head"
    mlp = "mlp"
    pool = "pool"
    const = "const"


class Selection(StrEnum):
    """How a ``units`` option picks the units a method reweights (conf/units/)."""
    kinds = "kinds"                # every unit of the given kinds
    layers = "layers"              # the given kinds within a layer range
    names = "names"                # glob patterns over the unit names (L11H*, L10.mlp)
    coarse_top = "coarse_top"      # the top heads a coarse_selection analysis ranked
    output = "output"              # none: output methods read the model's feature


# Named unit selections of the analyses' ``units`` keys (unit kinds may also be joined with '+': head+const);
# output methods read the model's feature instead of units.
UNIT_GROUPS = ("heads", "mlps", "heads+mlps", "all")
OUTPUT_UNITS = "output"
UNITS_WHAT = (f"must be one of {' | '.join(UNIT_GROUPS)}, or unit kinds joined by '+' "
              f"({' | '.join(m.value for m in UnitKind)}, e.g. head+const)")


def unit_selection(value) -> bool:
    """Whether ``value`` names residual units: a group of :data:`UNIT_GROUPS` or kinds joined by '+'."""
    return isinstance(value, str) and (value in UNIT_GROUPS or all(k in UnitKind.__members__ for k in value.split("+")))


class Classifier(StrEnum):
    """The frozen head every method trains against."""
    auto = "auto"                  # the text head when the model has a text tower, else prototypes
    text = "text"                  # zero-shot text centroids (the model's own logit scale and bias)
    prototype = "prototype"        # class-mean image prototypes (conventions.prototype says which kind)


class Pooling(StrEnum):
    """How a tower reads its feature out of the residual stream (decompose/pooling.py)."""
    token = "token"                # the CLS token
    avg = "avg"                    # the token mean (from a start token)
    map = "map"                    # a learned-query attention pool (MAP) with its MLP branch


class ModelPrecision(StrEnum):
    """The encoding forward: bf16 autocast on CUDA and fp32 on CPU (auto), or forced."""
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Accelerator(StrEnum):
    """Lightning's ``Trainer(accelerator=)``."""
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    mps = "mps"
    tpu = "tpu"


# Lightning's ``Trainer(precision=)`` values (not identifiers, so a checked list, not an enum)
TRAINER_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "64-true", "16-true", "bf16-true",
                      "32", "16", "bf16", "64")


class CacheLayout(StrEnum):
    """How encodings are stored: exact low-rank (head_dim per head + norm stats) or ``[N, U, D]``."""
    lowrank = "lowrank"
    dense = "dense"


class CacheDtype(StrEnum):
    auto = "auto"                  # float16 for real backbones, float32 for the tiny CLIP
    float16 = "float16"
    float32 = "float32"
    float64 = "float64"


class Verify(StrEnum):
    """When a cache entry's checksums are verified on load."""
    once = "once"
    always = "always"
    size = "size"


class CacheAction(StrEnum):
    list = "list"
    verify = "verify"
    prune = "prune"


class CacheKind(StrEnum):
    encodings = "encodings"
    bases = "bases"
    classifiers = "classifiers"


class UnitConvention(StrEnum):
    """How the final norm's centring and bias are shared among units (DESIGN.md §2)."""
    official = "official"
    centred = "centred"


class Prototype(StrEnum):
    """Classifier of models without a text tower."""
    mean = "mean"                  # raw class means · normalize(x) (official)
    cosine = "cosine"              # scale · cos


class EvrRule(StrEnum):
    strict = "strict"              # smallest k with cumulative EVR > evr (official)
    inclusive = "inclusive"        # ... ≥ evr


class SimilarityWeights(StrEnum):
    eigenvalues = "eigenvalues"
    sqrt_eigenvalues = "sqrt_eigenvalues"


class SimilarityUnweighted(StrEnum):
    diagonal = "diagonal"          # component i vs i (official)
    matched = "matched"            # greedy matching


class Compat(StrEnum):
    none = "none"
    official = "official"          # also reproduce the official code's bugs (a)-(d)


class CheckDtype(StrEnum):
    float32 = "float32"
    float64 = "float64"


class Score(StrEnum):
    """Head rankings of the coarse-selection analysis."""
    zero_shot = "zero_shot"
    text_alignment = "text_alignment"
    output_correlation = "output_correlation"


class Ablation(StrEnum):
    zero = "zero"
    mean = "mean"


class Variant(StrEnum):
    """Spectral cosine variants."""
    weighted = "weighted"
    unweighted = "unweighted"


class CrossModel(StrEnum):
    profile = "profile"
    raw = "raw"
    none = "none"


class Estimator(StrEnum):
    """TwoNN fit."""
    linear = "linear"
    mle = "mle"


SEED_MAX = 2 ** 32          # seeds are in [0, 2³²)
SPLIT_SEED = 42             # the seed of every carved split (the paper's protocol)
