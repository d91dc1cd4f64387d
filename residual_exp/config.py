"""Structured-config schemas (registered in Hydra's ConfigStore).

Every YAML file under ``conf/`` is validated against these dataclasses at compose time, so
an unknown key or a wrong type fails with a message that names the key.  Per-family or
per-dataset extras go under ``params`` (a free dict).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

CONF_MODULE = "residual_exp.conf"      # the Hydra configs shipped inside the package


@dataclass
class ModelConfig:
    name: str = MISSING                # preset label (model=NAME), recorded in results
    family: str = MISSING              # backbone family: open_clip | tiny_clip | timm | blip
    arch: Optional[str] = None         # library architecture name (open_clip / timm / hub id)
    pretrained: Optional[str] = None   # hub tag; null → random weights (tests, checks)
    weights: Optional[str] = None      # local checkpoint file (overrides `pretrained`)
    image_size: Optional[int] = None   # input resolution (None: the architecture's own)
    precision: str = "auto"            # backbone forward when encoding: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    logit_scale: float = 100.0         # classifier temperature for models without a text tower
    cache_dir: Optional[str] = None    # hub cache directory
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    name: str = MISSING                # registry key (dataset=NAME)
    root: str = "data"                 # where the data lives on disk
    download: bool = False             # download where the source still allows it
    batch_size: int = 64               # images per forward when encoding
    num_workers: int = 0
    skip_bad_images: bool = False      # skip (and count) unreadable images instead of failing
    content_hash: bool = False         # fingerprint folder data by content (SHA-256), not size + mtime
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PCAConfig:
    """Where the per-unit PCA bases are fitted (how many components a method keeps is the
    method's choice: ``method.evr`` / ``method.k``)."""
    reference: Optional[DatasetConfig] = None   # dataset node the bases are fitted on (null: the target dataset)
    split: str = "reference"           # split of that dataset (train for ImageNet, as in the paper)
    max_samples: Optional[int] = None  # cap on images used for fitting (seeded uniform subsample)


@dataclass
class MethodConfig:
    """One of the seven variants (DESIGN.md §1) and its knobs."""
    name: str = MISSING                # base | finetune | linear_adapter | spectral_adapter | residual_*
    units: str = "heads"               # heads | mlps | heads+mlps | all | output
    others: str = "drop"               # units not selected: drop | mean | add
    evr: Optional[float] = None        # keep each unit's leading PCs up to this explained-variance ratio
    k: Optional[int] = None            # or its first k PCs (null + null: keep all)
    dropped_value: float = 0.0         # λ of pruned components (0 removes them, 1 keeps them as is)
    init: str = "normal"               # λ init: normal (N(1,1)) | ones | eigenvalues; linear_adapter: default (nn.Linear's) | identity
    lr: float = 0.8                    # Schedule-Free AdamW learning rate (trainer.lr_find replaces it)
    batch_size: int = 64               # training batch size
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    cache: bool = True                 # encode once (true) or run the backbone every step (false)


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    patience: int = 5                  # early stopping on val accuracy
    lr_find: bool = False              # run Lightning's LR finder first (schedule-free aware)
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "32-true"
    num_workers: int = 0
    progress_bar: bool = True
    cpu_threads: Optional[int] = None  # torch threads while training on CPU (null: 1 for small adapters)


@dataclass
class CacheConfig:
    dir: str = "${paths.cache_dir}"
    layout: str = "lowrank"            # lowrank (heads as head_dim activations + LayerNorm stats) | dense ([N, U, D] units)
    dtype: str = "auto"                # storage dtype: auto (float16 for real backbones, float32 for tiny_clip) | float16 | float32 | float64
    memory_budget_gb: float = 4.0      # larger encodings are streamed from disk (memmap)
    enabled: bool = True
    verify: str = "once"               # checksum check when an entry is loaded: once (per process) | always | size


@dataclass
class ConventionsConfig:
    """How units, classifiers and similarities are defined (FIDELITY.md). The defaults are the
    official ResiDual code's; the alternatives are this project's own conventions."""
    units: str = "official"            # official (each unit an equal share of the final LN's centring and bias) | centred
    prototype: str = "mean"            # no-text-tower classifier: mean (raw class means · normalize(x)) | cosine (scale · cos)
    evr_rule: str = "strict"           # method.evr keeps the smallest k with cumulative EVR > evr (strict) | >= (inclusive)
    similarity_weights: str = "eigenvalues"    # weighted spectral cosine: eigenvalues | sqrt_eigenvalues
    similarity_unweighted: str = "diagonal"    # unweighted spectral cosine: diagonal (component i vs i) | matched (greedy)


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "${paths.root_dir}/data"
    cache_dir: str = "${paths.root_dir}/outputs/cache"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TaskConfig:
    name: str = "train"


@dataclass
class CheckDecompositionTask(TaskConfig):
    name: str = "check_decomposition"
    batch_size: int = 2
    dtype: str = "float32"
    tolerance: float = 1e-5
    seed: int = 0


@dataclass
class InspectDataTask(TaskConfig):
    name: str = "inspect_data"
    verify: bool = False               # open every image; report corrupt files, class counts


@dataclass
class ReportTask(TaskConfig):
    """Collect results.json files into a paper-style table, CSV and plots."""
    name: str = "report"
    run_dirs: List[str] = field(default_factory=list)   # extra run dirs besides `sweep_dir`
    out_dir: Optional[str] = None                         # default: <sweep_dir>/report
    lambda_run: Optional[str] = None                      # run dir whose λ spectra to plot


@dataclass
class AnalysisTask(TaskConfig):
    """Run the analysis selected by the `analysis` group."""
    name: str = "analysis"


@dataclass
class CacheTask(TaskConfig):
    """Inspect and maintain the content-keyed caches (encodings, bases, classifiers)."""
    name: str = "cache"
    action: str = "list"               # list | verify | prune
    kinds: List[str] = field(default_factory=lambda: ["encodings", "bases", "classifiers"])
    dry_run: bool = False              # prune: say what would be removed, remove nothing


@dataclass
class PlanGrid:
    """An explicit grid for ``task=plan`` (empty lists: the sweep's hydra.sweeper.params, else the run's own)."""
    model: List[str] = field(default_factory=list)
    dataset: List[str] = field(default_factory=list)
    method: List[str] = field(default_factory=list)


@dataclass
class PlanTask(TaskConfig):
    """Cost of a run or a sweep before it starts (images, cache bytes, disk, GPU hours)."""
    name: str = "plan"
    grid: PlanGrid = field(default_factory=PlanGrid)
    typical_epoch_fraction: float = 0.5                    # early stopping: share of max_epochs a job typically runs
    throughput: Dict[str, Any] = field(default_factory=dict)   # see conf/task/plan.yaml


@dataclass
class ExportTask(TaskConfig):
    """A trained run (``run_dir=``) as one self-contained adapted encoder (``out=``)."""
    name: str = "export"
    copy_weights: bool = False         # also copy the backbone's weights into the folder (always for finetune / random init)


@dataclass
class PredictTask(TaskConfig):
    """Classify images (``inputs=`` an image, a folder or a glob) with an export (``model_dir=``)."""
    name: str = "predict"
    top_k: int = 5
    batch_size: int = 64
    grid: int = 16                     # images shown in predictions.png
    out_dir: Optional[str] = None      # default: the run dir
    verify_export: bool = True         # check the export's files against its manifest.json (false: skip)


@dataclass
class EvaluateTask(TaskConfig):
    """Accuracy of an export (``model_dir=``) on any ``dataset=``; results.json as task=train writes it."""
    name: str = "evaluate"
    batch_size: int = 64
    split: str = "test"
    verify_export: bool = True         # check the export's files against its manifest.json (false: skip)


@dataclass
class PretrainTask(TaskConfig):
    """Contrastive pretraining of the embedded tiny CLIP on synthetic captions."""
    name: str = "pretrain_tiny_clip"
    n_images: int = 20000
    epochs: int = 8
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0
    out: Optional[str] = None          # where to write the checkpoint (default: the asset path)


@dataclass
class Config:
    task: Any = MISSING
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    method: MethodConfig = MISSING
    pca: PCAConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: Any = None
    analysis: Any = None               # `analysis=NAME` (task=analysis)
    sweep_dir: Optional[str] = None    # task=report: the sweep (or any folder of runs) to collect
    run_dir: Optional[str] = None      # task=export: the trained run
    out: Optional[str] = None          # task=export: the export folder (default: <run_dir>/export)
    model_dir: Optional[str] = None    # task=predict / evaluate: an export folder
    inputs: Optional[str] = None       # task=predict: an image, a folder or a glob
    cache: CacheConfig = field(default_factory=CacheConfig)
    conventions: ConventionsConfig = field(default_factory=ConventionsConfig)
    compat: str = "none"               # none | official: also reproduce the official code's bugs (a)-(d) (FIDELITY.md)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    run_name: str = "${run_name:${task.name},${model.name},${dataset.name},${method.name}}"
    resume: bool = True                # task=train: skip jobs already finished for the same config (sweep.py)


def _unique_id() -> str:
    import uuid
    return uuid.uuid4().hex[:6]


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
    for name, node in [("train_schema", TaskConfig), ("check_decomposition_schema", CheckDecompositionTask),
                       ("inspect_data_schema", InspectDataTask), ("pretrain_schema", PretrainTask),
                       ("report_schema", ReportTask), ("analysis_schema", AnalysisTask),
                       ("cache_schema", CacheTask), ("plan_schema", PlanTask), ("export_schema", ExportTask),
                       ("predict_schema", PredictTask), ("evaluate_schema", EvaluateTask)]:
        cs.store(group="task", name=name, node=node)
    register_analysis_configs()        # the `analysis` group's schemas
