"""Structured-config schemas (registered in Hydra's ConfigStore), with their rules.

Every YAML file under ``conf/`` is merged into these dataclasses when Hydra composes the
config, so an unknown key, a wrong type or a value outside an enum (:mod:`residual_exp.catalog`)
fails at composition with a message naming the key.  Each field's default is written here
and only here (a YAML file lists what differs), next to the rule its values must satisfy
(:func:`~residual_exp.catalog.fields.rule`); cross-field rules are each schema's ``check``.
:func:`residual_exp.validate.validate` walks them all before anything is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from .catalog import (FAMILIES, SEED_MAX, SPLIT_SEED, TRAINER_PRECISIONS, Accelerator, ActsOn, CacheAction, CacheDtype, CacheKind,
                      CacheLayout, CheckDtype, Classifier, Compat, DatasetSpec, EvrRule, Init, MethodSpec, ModelPrecision,
                      ModelSpec, Others, Prototype, Score, Selection, SimilarityUnweighted, SimilarityWeights, Split,
                      UnitConvention, UnitKind, Verify, rule)
from .errors import ConfigError
from .catalog.specs import CONF_MODULE  # noqa: F401  (re-exported: where the configs live)
from .catalog.fields import fmt

SEED = dict(ge=0, lt=SEED_MAX)


@dataclass
class ModelConfig:
    name: str = MISSING                # preset label (model=NAME), recorded in results
    family: str = MISSING              # backbone family (catalog.FAMILIES, or one registered by spec.module)
    arch: Optional[str] = None         # library architecture name (open_clip / timm / hub id)
    pretrained: Optional[str] = None   # hub tag; null → random weights (tests, checks)
    weights: Optional[str] = rule(None, path="checkpoint",
                                  what="no such file: give the path of a saved checkpoint, or null to use "
                                       "model.pretrained")   # local checkpoint file (overrides `pretrained`)
    image_size: Optional[int] = rule(None, ge=1)   # input resolution (None: the architecture's own)
    precision: ModelPrecision = ModelPrecision.auto   # encoding forward: bf16 autocast on CUDA and fp32 on CPU, or forced
    logit_scale: float = rule(100.0, gt=0)   # classifier temperature for models without a text tower
    cache_dir: Optional[str] = None    # hub cache directory
    params: Dict[str, Any] = rule(factory=dict, free=True)
    spec: ModelSpec = field(default_factory=ModelSpec)

    @staticmethod
    def check(node, root, bad) -> None:
        fam = FAMILIES.get(node.family)
        if fam is None:
            if not node.spec.module:
                bad("family", node.family, f"must be one of {' | '.join(sorted(FAMILIES))} (or a family registered "
                                           f"by the module named in model.spec.module)")
            return
        if fam.arch_example and node.arch is None:
            bad("arch", None, f"model.family={node.family} needs an architecture name "
                              f"(e.g. model.arch={fam.arch_example})")
        if root.get("classifier") == Classifier.text and not fam.text:
            bad("/classifier", Classifier.text, f"model.family={node.family} has no text tower: use "
                                                f"classifier={Classifier.prototype} (or {Classifier.auto})")
        if fam.pretrained and node.weights is None and node.pretrained is not None \
                and node.pretrained not in fam.pretrained:
            bad("pretrained", node.pretrained, f"model.family={node.family} takes model.pretrained="
                                               f"{' | '.join(fam.pretrained)} or null (random weights), or a "
                                               f"checkpoint in model.weights")


@dataclass
class DatasetConfig:
    name: str = rule(MISSING, options="group:dataset")   # dataset=NAME (the config's file name)
    root: str = "${paths.data_dir}"    # where the data lives on disk
    download: bool = False             # download where the source still allows it
    batch_size: int = rule(64, ge=1)   # images per forward when encoding
    num_workers: int = rule(0, ge=0)
    skip_bad_images: bool = False      # skip (and count) unreadable images instead of failing
    content_hash: bool = False         # fingerprint folder data by content (SHA-256), not size + mtime
    params: Dict[str, Any] = rule(factory=dict, free=True, schema_at="spec.params")   # checked against spec.params
    spec: DatasetSpec = field(default_factory=DatasetSpec)


@dataclass
class ImageFolderParams:
    """``dataset.params`` of ``dataset=image_folder`` (:mod:`residual_exp.data.image_folder`)."""
    val_fraction: float = rule(0.1, gt=0, lt=1)     # carved from the images (plain) or from train/ (split without val/)
    test_fraction: float = rule(0.1, gt=0, lt=1)    # plain layout only
    split_seed: int = rule(SPLIT_SEED, **SEED)      # seed of the stratified carving
    drop_empty_classes: bool = False                # leave out class folders without images (recorded) instead of refusing
    classnames: Any = None                          # null: folder names; a list (sorted folder order) or {folder: name}
    templates: Optional[List[str]] = rule(None, min_len=1)   # prompts with one {} each (null: 'a photo of a {}.')
    splits_dir: Optional[str] = rule(None, path="folder")    # where carved splits go (null: outputs/splits)

    @staticmethod
    def check(node, root, bad) -> None:
        if node.val_fraction + node.test_fraction >= 1:
            bad("test_fraction", node.test_fraction, f"val_fraction + test_fraction = "
                f"{node.val_fraction + node.test_fraction:g} leaves no train images: they must sum to < 1")
        for i, t in enumerate(node.templates or []):
            if not isinstance(t, str) or t.count("{}") != 1:
                bad(f"templates[{i}]", t, "must be a prompt with exactly one {} (e.g. 'a photo of a {}.')")
        names = node.classnames
        if names is None:
            return
        values = list(names.values()) if isinstance(names, DictConfig) else names
        if not isinstance(names, (DictConfig, ListConfig)) or not all(isinstance(v, str) and v.strip() for v in values):
            bad("classnames", names, "must be a list of non-empty names (one per class folder, in sorted folder order) "
                                     "or a dict {folder: name}")
        elif len(values) == 0:
            bad("classnames", names, "must not be empty (null: the folder names)")


@dataclass
class PCAConfig:
    """Where the per-unit PCA bases are fitted (how many components a method keeps is the ``rank``
    group's choice)."""
    reference: Optional[DatasetConfig] = None   # dataset node the bases are fitted on (null: the target dataset)
    split: Split = Split.reference     # split of that dataset (train for ImageNet, as in the paper)
    max_samples: Optional[int] = rule(None, ge=2)   # cap on images used for fitting (seeded uniform subsample)


@dataclass
class UnitsConfig:
    """Which residual units a method reweights (``units=NAME``, conf/units/; each method's file picks
    its default): by kind, a layer range, name patterns, or the top heads a coarse-selection analysis
    ranked.  Resolved by :func:`residual_exp.decompose.selection.select`."""
    name: str = rule(MISSING, options="group:units")     # units=NAME (the config's file name)
    by: Selection = Selection.kinds
    kinds: List[UnitKind] = rule(factory=list)          # keep these kinds (empty: any kind)
    layers: Optional[List[int]] = rule(None, item=dict(ge=0))   # [first, last] layer, inclusive
    include: List[str] = rule(factory=list)             # glob patterns over unit names (L11H*, L10.mlp)
    exclude: List[str] = rule(factory=list)             # patterns dropped from the selection
    run_dir: Optional[str] = rule(None, path="dir")     # coarse_top: the run dir of a coarse_selection analysis
    fraction: float = rule(0.05, gt=0, le=1)            # coarse_top: share of the heads kept (rounded, ≥ 1)
    score: Score = Score.zero_shot                      # coarse_top: which of the analysis's rankings

    @staticmethod
    def check(node, root, bad) -> None:
        from .decompose.selection import preset_layout, requirement_problem, select
        problem = requirement_problem(node)
        if problem:
            return bad(*problem)
        layout = preset_layout(root.model.spec, root.conventions.units == UnitConvention.centred)
        if layout is not None:                      # the preset states its shape: resolve it now
            try:
                select(node, layout, root.model.name)
            except ConfigError as e:
                bad("/units", node.name, e.problems[0].split(": ", 1)[1])


@dataclass
class RankConfig:
    """How many principal components of each unit a spectral method keeps (``rank=NAME``, conf/rank/;
    each method's file picks its default): all, the leading ones up to an explained-variance ratio, or
    the first k.  Methods without principal components ignore it."""
    name: str = rule(MISSING, options="group:rank")      # rank=NAME (the config's file name)
    evr: Optional[float] = rule(None, gt=0, le=1)   # keep each unit's leading PCs up to this explained-variance ratio
    k: Optional[int] = rule(None, ge=1)             # or its first k PCs (both null: keep all)

    @staticmethod
    def check(node, root, bad) -> None:
        if node.evr is not None and node.k is not None:
            bad("k", node.k, f"set rank.evr (={node.evr}) or rank.k, not both (the other null; rank=evr | k | all)")


def rank_label(rank) -> str:
    """``all``, ``evr=0.9`` or ``k=16`` (records, tables)."""
    return f"evr={rank.evr:g}" if rank.evr is not None else f"k={rank.k}" if rank.k is not None else "all"


@dataclass
class MethodConfig:
    """One of the methods (DESIGN.md §1, ``conf/method/``) and its knobs (its units and rank are the
    ``units`` and ``rank`` groups)."""
    name: str = rule(MISSING, options="group:method")    # method=NAME (the config's file name)
    others: Others = Others.drop       # units not selected
    dropped_value: float = 0.0         # λ of pruned components (0 removes them, 1 keeps them as is)
    init: Init = Init.normal           # initialisation (the method's spec lists the values it takes)
    lr: float = 0.8                    # Schedule-Free AdamW learning rate (trainer.lr_find replaces it)
    batch_size: int = rule(64, ge=1)   # training batch size
    weight_decay: float = rule(0.0, ge=0)
    grad_clip: Optional[float] = rule(None, gt=0)
    cache: bool = True                 # encode once (true) or run the backbone every step (false)
    spec: MethodSpec = field(default_factory=MethodSpec)

    @staticmethod
    def check(node, root, bad) -> None:
        spec, name, units = node.spec, node.name, root.units
        if spec.trains and not (math.isfinite(node.lr) and node.lr > 0):   # (base trains nothing: lr unused)
            bad("lr", node.lr, "must be a finite number > 0")
        if spec.acts_on == ActsOn.output and units.by != Selection.output:
            bad("/units", units.name, f"method={name} acts on the output feature: takes units=output")
        elif spec.acts_on == ActsOn.units and units.by == Selection.output:
            bad("/units", units.name, f"method={name} reweights residual units: takes units=heads | mlps | "
                                      f"heads_mlps | all | layers | names | coarse_top (conf/units/), not output")
        if node.others not in spec.others:
            what = {Others.mean: "mean (replace the other units by their reference mean) only applies to "
                                 "residual_* methods; "}.get(node.others, "")
            bad("others", node.others, f"{what}method={name} takes {' | '.join(spec.others)}")
        if node.init not in spec.inits:
            bad("init", node.init, f"method={name} takes {' | '.join(spec.inits)}")


@dataclass
class TrainerConfig:
    max_epochs: int = rule(30, ge=1)
    patience: int = rule(5, ge=0)      # early stopping on val accuracy
    lr_find: bool = False              # run Lightning's LR finder first (schedule-free aware)
    accelerator: Accelerator = Accelerator.auto
    devices: int = rule(1, ge=1)
    precision: str = rule("32-true", choices=TRAINER_PRECISIONS,
                          what=f"must be one of {' | '.join(TRAINER_PRECISIONS)} (Lightning's precision values)")
    num_workers: int = rule(0, ge=0)
    progress_bar: bool = True
    cpu_threads: Optional[int] = rule(None, ge=1)   # torch threads while training on CPU (null: 1 for small adapters)


@dataclass
class CacheConfig:
    dir: str = rule("${paths.cache_dir}", path="folder")
    layout: CacheLayout = CacheLayout.lowrank   # lowrank: heads as head_dim activations + norm stats (exact, ~14x smaller)
    dtype: CacheDtype = CacheDtype.auto         # storage dtype (auto: float16 for real backbones, float32 for tiny_clip)
    memory_budget_gb: float = rule(4.0, gt=0)   # larger encodings are streamed from disk (memmap)
    enabled: bool = True
    verify: Verify = Verify.once                # checksums verified when an entry is first loaded in a process


@dataclass
class ConventionsConfig:
    """How units, classifiers and similarities are defined (FIDELITY.md). The defaults are the
    official ResiDual code's; the alternatives are this project's own conventions."""
    units: UnitConvention = UnitConvention.official
    prototype: Prototype = Prototype.mean
    evr_rule: EvrRule = EvrRule.strict
    similarity_weights: SimilarityWeights = SimilarityWeights.eigenvalues
    similarity_unweighted: SimilarityUnweighted = SimilarityUnweighted.diagonal


@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:RESIDUAL_EXP_ROOT,.}"
    data_dir: str = "${paths.root_dir}/data"
    cache_dir: str = "${paths.root_dir}/outputs/cache"
    output_dir: str = "${hydra:runtime.output_dir}"


def require(root, bad, key: str, what: str) -> None:
    """A top-level key a task cannot run without (``/key``: reported at the root)."""
    if root.get(key) is None:
        bad(f"/{key}", None, what)


# --- tasks: one schema each; ``run`` names the function, the docstring is its --help line -----------------
@dataclass
class TaskConfig:
    """Fit bases, encode once, train the method, test on the best-val checkpoint (the default)."""
    run: ClassVar[str] = "residual_exp.tasks.train:train"
    resumable: ClassVar[bool] = True   # wrapped in the results store (a finished job is copied, not rerun)
    name: str = "train"


@dataclass
class CheckDecompositionTask(TaskConfig):
    """Check that Σ units equals the model's feature, and every unit against an independent recomputation."""
    run: ClassVar[str] = "residual_exp.tasks.check_decomposition:check_decomposition"
    resumable: ClassVar[bool] = False
    name: str = "check_decomposition"
    batch_size: int = rule(2, ge=1)
    dtype: CheckDtype = CheckDtype.float32
    tolerance: float = rule(1e-5, gt=0)
    seed: int = rule(0, **SEED)


@dataclass
class InspectDataTask(TaskConfig):
    """Where a dataset is expected on disk, what was found, class counts (task.verify=true: open every image)."""
    run: ClassVar[str] = "residual_exp.tasks.inspect_data:inspect_data"
    resumable: ClassVar[bool] = False
    name: str = "inspect_data"
    verify: bool = False               # open every image; report corrupt files, class counts


def _runs_dir(what: str) -> dict:
    return dict(path="dir", what=f"no such directory ({what})")


@dataclass
class ReportTask(TaskConfig):
    """Collect results.json files (sweep_dir=, task.run_dirs=) into tables, CSV and plots."""
    run: ClassVar[str] = "residual_exp.tasks.report:report"
    resumable: ClassVar[bool] = False
    name: str = "report"
    run_dirs: List[str] = rule(factory=list, item=_runs_dir("a folder holding runs with results.json"))
    out_dir: Optional[str] = None                         # default: <sweep_dir>/report
    lambda_run: Optional[str] = None                      # run dir whose λ spectra to plot


@dataclass
class DashboardTask(TaskConfig):
    """A W&B workspace (saved view) of a sweep (sweep_dir=): saved online, its spec written offline."""
    run: ClassVar[str] = "residual_exp.tasks.dashboard:dashboard"
    resumable: ClassVar[bool] = False
    name: str = "dashboard"
    entity: Optional[str] = None       # W&B entity (default: WANDB_ENTITY, the runs' logger.entity, your default online)
    project: Optional[str] = None      # W&B project (default: the runs' logger.project, WANDB_PROJECT, residual_exp)
    title: Optional[str] = None        # the view's name (default: residual_exp · <sweep folder>)
    out_dir: Optional[str] = None      # where wandb_workspace.json goes (default: <sweep_dir>/report)

    @staticmethod
    def check(node, root, bad) -> None:
        require(root, bad, "sweep_dir", "task=dashboard needs sweep_dir=<a sweep folder holding runs>")


@dataclass
class AnalysisTask(TaskConfig):
    """Run the paper analysis the `analysis` group selects (analysis=NAME)."""
    run: ClassVar[str] = "residual_exp.tasks.analysis:analysis"
    resumable: ClassVar[bool] = False
    name: str = "analysis"


@dataclass
class CacheTask(TaskConfig):
    """List, verify (checksums) or prune the content-keyed caches (encodings, bases, classifiers)."""
    run: ClassVar[str] = "residual_exp.tasks.cache:cache_task"
    resumable: ClassVar[bool] = False
    name: str = "cache"
    action: CacheAction = CacheAction.list
    kinds: List[CacheKind] = rule(factory=lambda: list(CacheKind), min_len=1)
    dry_run: bool = False              # prune: say what would be removed, remove nothing


@dataclass
class PlanGrid:
    """An explicit grid for ``task=plan`` (empty lists: the sweep's hydra.sweeper.params, else the run's own)."""
    model: List[str] = rule(factory=list, item=dict(options="group:model"))
    dataset: List[str] = rule(factory=list, item=dict(options="group:dataset"))
    method: List[str] = rule(factory=list, item=dict(options="group:method"))


@dataclass
class PlanTask(TaskConfig):
    """The cost of a run or a sweep before it starts: images, cache bytes, disk, GPU hours."""
    run: ClassVar[str] = "residual_exp.tasks.plan:plan"
    resumable: ClassVar[bool] = False
    name: str = "plan"
    grid: PlanGrid = field(default_factory=PlanGrid)
    typical_epoch_fraction: float = rule(0.5, gt=0, le=1)   # early stopping: share of max_epochs a job typically runs
    throughput: Dict[str, Any] = rule(factory=dict, free=True)   # see conf/task/plan.yaml

    @staticmethod
    def check(node, root, bad) -> None:
        def walk(key, v):
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{key}.{k}", x)
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
                bad(key, v, "must be a finite number > 0")
        from omegaconf import OmegaConf
        walk("throughput", OmegaConf.to_container(node.throughput, resolve=True))


@dataclass
class ExportTask(TaskConfig):
    """A trained run (run_dir=) as one self-contained adapted encoder (out=)."""
    run: ClassVar[str] = "residual_exp.tasks.export:export"
    resumable: ClassVar[bool] = False
    name: str = "export"
    copy_weights: bool = False         # also copy the backbone's weights into the folder (always for finetune / random init)

    @staticmethod
    def check(node, root, bad) -> None:
        require(root, bad, "run_dir", "task=export needs run_dir=<the folder of a task=train run>")


@dataclass
class PredictTask(TaskConfig):
    """Classify images (inputs= an image, a folder or a glob) with an export (model_dir=)."""
    run: ClassVar[str] = "residual_exp.tasks.predict:predict"
    resumable: ClassVar[bool] = False
    name: str = "predict"
    top_k: int = rule(5, ge=1)
    batch_size: int = rule(64, ge=1)
    grid: int = rule(16, ge=0)         # images shown in predictions.png
    out_dir: Optional[str] = None      # default: the run dir
    verify_export: bool = True         # check the export's files against its manifest.json (false: skip)

    @staticmethod
    def check(node, root, bad) -> None:
        require(root, bad, "model_dir", "task=predict needs model_dir=<an export folder (task=export)>")
        require(root, bad, "inputs", "task=predict needs inputs=<an image, a folder or a glob>")


@dataclass
class EvaluateTask(TaskConfig):
    """Accuracy of an export (model_dir=) on any dataset=; results.json as task=train writes it."""
    run: ClassVar[str] = "residual_exp.tasks.evaluate:evaluate"
    resumable: ClassVar[bool] = False
    name: str = "evaluate"
    batch_size: int = rule(64, ge=1)
    split: Split = Split.test
    verify_export: bool = True         # check the export's files against its manifest.json (false: skip)

    @staticmethod
    def check(node, root, bad) -> None:
        require(root, bad, "model_dir", "task=evaluate needs model_dir=<an export folder (task=export)>")


@dataclass
class PretrainTask(TaskConfig):
    """Contrastive pretraining of the embedded tiny CLIP on synthetic captions (~10 min on 2 cores)."""
    run: ClassVar[str] = "residual_exp.tasks.pretrain_tiny_clip:pretrain_tiny_clip"
    resumable: ClassVar[bool] = False
    name: str = "pretrain_tiny_clip"
    n_images: int = rule(20000, ge=1)
    epochs: int = rule(8, ge=1)
    batch_size: int = rule(256, ge=1)
    lr: float = rule(2e-3, gt=0)
    seed: int = rule(0, **SEED)
    out: Optional[str] = None          # where to write the checkpoint (default: the asset path)


TASKS: dict[str, type[TaskConfig]] = {t.__dataclass_fields__["name"].default: t for t in (
    TaskConfig, CheckDecompositionTask, InspectDataTask, ReportTask, DashboardTask, AnalysisTask, CacheTask, PlanTask,
    ExportTask, PredictTask, EvaluateTask, PretrainTask)}


@dataclass
class Config:
    task: Any = MISSING
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    method: MethodConfig = MISSING
    pca: PCAConfig = MISSING
    units: UnitsConfig = MISSING
    rank: RankConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: Any = rule(None, free=True)
    analysis: Any = None               # `analysis=NAME` (task=analysis)
    sweep_dir: Optional[str] = rule(None, path="dir", what="no such directory (a sweep folder holding runs with "
                                                           "results.json)")   # task=report / dashboard: the runs to collect
    run_dir: Optional[str] = rule(None, path="dir")   # task=export: the trained run
    out: Optional[str] = None          # task=export: the export folder (default: <run_dir>/export)
    model_dir: Optional[str] = rule(None, path="dir")   # task=predict / evaluate: an export folder
    inputs: Optional[str] = None       # task=predict: an image, a folder or a glob
    cache: CacheConfig = field(default_factory=CacheConfig)
    conventions: ConventionsConfig = field(default_factory=ConventionsConfig)
    compat: Compat = Compat.none       # official: also reproduce the official code's bugs (a)-(d) (FIDELITY.md)
    classifier: Classifier = Classifier.auto   # frozen head: the text head when the model has a text tower, else class-mean prototypes
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = rule(0, **SEED)
    device: str = rule("auto", what="must be one of auto | cpu | cuda | cuda:N (N a GPU index ≥ 0)")
    run_name: str = "${run_name:${task.name},${model.name},${dataset.name},${method.name}}"
    resume: bool = True                # task=train: skip jobs already finished for the same config (store.py)

    @staticmethod
    def check(node, root, bad) -> None:
        if unsafe_name(node.run_name):
            bad("run_name", node.run_name, RUN_NAME_RULE)
        d = node.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            bad("device", d, Config.__dataclass_fields__["device"].metadata["what"])
        if node.compat == Compat.official:
            # compat=official reproduces the official run: its conventions, not this project's
            for key, want in (("units", UnitConvention.official), ("evr_rule", EvrRule.strict)):
                v = node.conventions[key]
                if v != want:
                    bad(f"conventions.{key}", v, f"compat=official reproduces the official run, which needs "
                                                 f"conventions.{key}={want} (or use compat=none)")


# --- navigating the schema tree (validation, the override precheck) --------------------------------------
NAMED_NODES = ("task", "analysis")     # nodes whose schema their `name` selects


def named_schemas(path: str) -> dict[str, type]:
    if path == "task":
        return TASKS
    from .analysis.config import ANALYSES
    return ANALYSES


def sub_type(hint) -> tuple[Any, bool]:
    """``(inner type, optional)`` of a field type (``Optional[X]`` → X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return args[0], True
    return hint, False


def node_schema(path: str, task: str | None = None, analysis: str | None = None) -> type | None:
    """The schema dataclass of the node at ``path`` (``""``: the root), or None for a leaf / free node."""
    schema = Config
    for i, part in enumerate(p for p in path.split(".") if p):
        if i == 0 and part in NAMED_NODES:
            schema = named_schemas(part).get(task if part == "task" else analysis)
        else:
            hints = typing.get_type_hints(schema) if schema else {}
            schema = sub_type(hints[part])[0] if part in hints else None
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
            return None
    return schema


# keys that became config groups: where they went (the old spelling is refused with this pointer)
MOVED = {"method.units": "units=NAME (conf/units/: heads, mlps, heads_mlps, all, layers, names, coarse_top)",
         "method.evr": "rank=evr rank.evr=X", "method.k": "rank=k rank.k=N"}


def suggestion(path: str, fields: list[str]) -> str:
    """`` (did you mean …?)`` for an unknown key: where it moved, a close spelling among its node's
    ``fields``, or the same name elsewhere; "" when nothing fits."""
    parent, leaf = path.rpartition(".")[::2] if "." in path else ("", path)
    close = difflib.get_close_matches(leaf, fields, n=1, cutoff=0.6)
    hint = MOVED.get(path) or (f"{parent + '.' if parent else ''}{close[0]}" if close else moved_key(path))
    return f" (did you mean {hint}?)" if hint else ""


def moved_key(path: str) -> str | None:
    """The schema key with ``path``'s last name in another place (the method group first: it owns
    lr, batch_size, evr, k), e.g. ``pca.k`` → ``method.k``; None when there is none."""
    leaf, found = path.rsplit(".", 1)[-1], []

    def walk(schema, prefix):
        for f in dataclasses.fields(schema):
            sub = sub_type(typing.get_type_hints(schema)[f.name])[0]
            if dataclasses.is_dataclass(sub) and f.name != "spec":
                walk(sub, f"{prefix}{f.name}.")
            elif f.name == leaf and prefix + f.name != path:
                found.append(prefix + f.name)
    walk(node_schema(""), "")
    return min(found, key=lambda p: (not p.startswith("method."), p)) if found else None


def _unique_id() -> str:
    import uuid
    return uuid.uuid4().hex[:6]


RUN_NAME_RULE = ("must be a plain folder name (no '/', '\\' or '..'; it is built from task, model.name, "
                 "dataset.name and method.name): runs stay under outputs/runs/")


def unsafe_name(name: str) -> bool:
    """Whether a run folder name could leave its parent folder (a path separator, ``..``, a NUL)."""
    return "/" in name or "\\" in name or "\0" in name or name.strip(".") == ""


def run_name_problem(cfg) -> str | None:
    """``run_name=…: …`` when the composed ``cfg``'s run name is not a plain folder name (checked before
    Hydra creates the run folder: ``python -m residual_exp`` calls it from its override precheck)."""
    try:
        name = OmegaConf.select(cfg, "run_name", throw_on_missing=False)
    except Exception:                          # resolved (and reported) by validate() inside the job
        return None
    return f"run_name={fmt(name)}: {RUN_NAME_RULE}" if isinstance(name, str) and unsafe_name(name) else None


def _run_name(task: str, model: str, dataset: str, method: str) -> str:
    """The run folder's name: ``model-dataset-method`` for training, the task (and what it is
    about) otherwise, so that e.g. ``task=predict`` runs do not land among the default model's runs."""
    if task == "train":
        return f"{model}-{dataset}-{method}"
    about = {"check_decomposition": model, "inspect_data": dataset, "evaluate": dataset}.get(task)
    return f"{task}-{about}" if about else task


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    # ${uid:}: a short random token, resolved once per config (run / sweep folders are never shared)
    OmegaConf.register_new_resolver("uid", _unique_id, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
    # ${auto_workers:}: data-loading workers = min(4, the cores this machine lets the job use)
    from .machine import default_workers
    OmegaConf.register_new_resolver("auto_workers", default_workers, replace=True)

    from .analysis.config import register_analysis_configs
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, node in TASKS.items():
        cs.store(group="task", name=f"{name}_schema", node=node)
    register_analysis_configs()        # the `analysis` group's schemas


def conf_dir() -> Path:
    """The folder of the shipped configs."""
    return Path(__file__).resolve().parent / "conf"
