"""What each dataset, model and method *is*: the spec node of its YAML file, typed here.

A config group option carries its facts in a ``spec:`` node (``conf/dataset/cifar10.yaml``,
``conf/model/clip_b.yaml``, ``conf/method/residual_full.yaml``), validated against the
dataclasses below when the config is composed.  That node is the single place a fact is
written: the loaders, ``task=plan``, validation, export, ``--help`` and the README tables
read it, and adding a dataset, a method or a model is one YAML file (plus its code, named by
an import path in the spec).  Backbone *families* (code, not config) are listed in
:data:`FAMILIES`; a family outside the package names the module that registers it
(``model.spec.module``).

:func:`spec` reads one option's spec without composing the whole config (Hydra's config
repository, a few ms), for the tasks that look at other options than the job's own
(``task=plan``, ``--help``, the preset generator).
"""
from __future__ import annotations

import contextvars
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from .fields import rule
from .values import ActsOn, Init, Others, Protocol


@dataclass
class DatasetSpec:
    """A dataset's protocol and provenance (``dataset.spec``)."""
    description: str = ""
    builder: str = MISSING             # import path of ``builder(dataset_cfg, split, transform) -> ClassificationSplit``
    labels: Optional[str] = None       # import path of ``labels(dataset_cfg, split)`` (no image decoded), if cheaper
    identity: Optional[str] = None     # import path of ``identity(dataset_cfg) -> str``: its name in results if not NAME
    splits_dir: Optional[str] = None   # import path of ``splits_dir(dataset_cfg) -> Path``: where carved splits go
    params: Optional[str] = None       # import path of the schema ``dataset.params`` is checked against (null: free)
    protocol: Protocol = Protocol.carve_val
    sizes: Dict[str, int] = field(default_factory=dict)   # official split sizes (train/test, all, or train/val/test)
    val_fraction: float = rule(0.0, ge=0, lt=1)            # carve_val / three_way: share carved for val
    test_fraction: float = rule(0.0, ge=0, lt=1)           # three_way: share carved for test
    large_images: bool = False         # full-size files: decoding-bound (task=plan's loader rate)
    can_download: bool = False         # dataset.download=true fetches it (torchvision)
    classnames: str = ""               # where the class names come from
    templates: str = ""                # where the prompt templates come from
    grid: Optional[str] = None         # the preset grid it belongs to (paper | synthetic: gen_experiments.py)
    order: int = 100                   # position in that grid and in tables

    @staticmethod
    def check(node, root, bad) -> None:
        if node.protocol == Protocol.three_way and node.val_fraction + node.test_fraction >= 1:
            bad("test_fraction", node.test_fraction, f"val_fraction + test_fraction must be < 1 "
                                                     f"(val_fraction={node.val_fraction})")


@dataclass
class ModelSpec:
    """A model preset's shape (``model.spec``; null where only the built model knows it, e.g.
    the generic ``model=open_clip`` / ``model=timm`` presets)."""
    description: str = ""
    layers: Optional[int] = rule(None, ge=1)
    heads: Optional[int] = rule(None, ge=1)
    head_dim: Optional[int] = rule(None, ge=1)
    width: Optional[int] = rule(None, ge=1)
    output_dim: Optional[int] = rule(None, ge=1)
    image_size: Optional[int] = rule(None, ge=1)
    patch: Optional[int] = rule(None, ge=1)
    pool_heads: int = rule(0, ge=0)    # J, the heads of an attention-pooled (MAP) readout; 0: CLS or average
    module: Optional[str] = None       # a module outside the package whose import registers model.family
    grid: Optional[str] = None         # the preset grid it belongs to (paper: gen_experiments.py)
    order: int = 100                   # position in that grid and in tables


@dataclass
class MethodSpec:
    """What a method trains and reads (``method.spec``); its code is ``adapter``."""
    description: str = ""
    adapter: str = MISSING             # import path of its Adapter class (residual_exp.methods.base)
    acts_on: ActsOn = ActsOn.units
    needs_bases: bool = False          # reads PCA bases (a residual method with others=mean always does)
    inits: List[Init] = field(default_factory=lambda: [Init.normal])     # allowed method.init values
    others: List[Others] = field(default_factory=lambda: [Others.drop])  # allowed method.others values
    trains: bool = True                # False: nothing is trained (zero-shot; no checkpoint, no λ)
    backbone_in_loop: bool = False     # the backbone runs forward and backward every step (finetune)
    trained: str = ""                  # what is trained (tables)
    params: str = ""                   # trainable-parameter count (tables)
    order: int = 100                   # position in tables and reports (the paper's methods: 0-6)


@dataclass(frozen=True)
class FamilySpec:
    """A backbone family: the module that registers it, and what its presets must give."""
    module: str
    description: str
    arch_example: Optional[str] = None     # model.arch is required (an example value), or None
    pretrained: Optional[tuple] = None     # the only model.pretrained values it takes (None: any hub tag)
    text: bool = True                      # its models have a text tower (else classifier=prototype only)


FAMILIES: dict[str, FamilySpec] = {
    "open_clip": FamilySpec("residual_exp.backbones.open_clip_backbone",
                            "open_clip CLIP models (ViT and timm towers)", arch_example="ViT-B-16"),
    "timm": FamilySpec("residual_exp.backbones.timm_backbone",
                       "timm ViT / Eva / BEiT / CaiT / NaFlexVit image models", arch_example="vit_large_patch16_224",
                       text=False),
    "blip": FamilySpec("residual_exp.backbones.blip_backbone",
                       "BLIP ITC retrieval models (transformers)", arch_example="blip-itm-large"),
    "tiny_clip": FamilySpec("residual_exp.backbones.tiny_clip",
                            "the embedded 4-layer CLIP (32 px)", pretrained=("embedded",)),
}


def method_order() -> list[str]:
    """Every method option, in table order (``spec.order``, then name)."""
    return sorted(options("method"), key=lambda m: (spec("method", m).order, m))


def grid(group: str, name: str) -> list[str]:
    """The ``group`` options (model | dataset) of preset grid ``name``, in their ``spec.order``."""
    specs = {o: spec(group, o) for o in options(group)}
    return sorted((o for o, s in specs.items() if s.grid == name), key=lambda o: (specs[o].order, o))


def needs_bases(method_cfg) -> bool:
    """Whether ``method_cfg``'s adapter reads PCA bases: its spec says so, or it replaces the
    units it does not select by their reference mean (``others=mean``)."""
    spec = spec_of("method", method_cfg)
    others = method_cfg.get("others", Others.drop) if isinstance(method_cfg, (dict, DictConfig)) else method_cfg.others
    return bool(spec.needs_bases) or (spec.acts_on == ActsOn.units and others == Others.mean)


def load(path: str) -> Any:
    """The object an import path names: ``package.module.attr`` (or ``package.module:attr``)."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ImportError(f"cannot import {path!r}: {type(e).__name__}: {e}") from e
    return obj


SPEC_TYPES = {"dataset": DatasetSpec, "model": ModelSpec, "method": MethodSpec}


def spec(group: str, name: str):
    """The typed spec of option ``name`` of ``group`` (dataset | model | method), read through
    Hydra's config repository (the package's configs and any search path of the running app)."""
    node = option(group, name)
    return OmegaConf.merge(OmegaConf.structured(SPEC_TYPES[group]), node.get("spec") or {})


CONF_MODULE = "residual_exp.conf"      # the Hydra configs shipped inside the package


SEARCHPATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("searchpath", default=())


def _searchpath() -> tuple[str, ...]:
    """Extra config folders (``hydra.searchpath=[file://…]``): the running job's, or the ones set
    in :data:`SEARCHPATH` (the command-line precheck)."""
    from hydra.core.hydra_config import HydraConfig
    if SEARCHPATH.get():
        return SEARCHPATH.get()
    try:
        return tuple(HydraConfig.get().searchpath or ())
    except ValueError:                   # not inside a Hydra job
        return ()


def _repository():
    """The configs Hydra composes from: the package's (with the plugins') plus the search path."""
    return _cached_repository(_searchpath())


@functools.lru_cache(maxsize=8)
def _cached_repository(extra: tuple[str, ...]):
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path
    csp = create_config_search_path(f"pkg://{CONF_MODULE}")
    for path in extra:
        csp.append(provider="hydra.searchpath", path=path)
    return ConfigRepository(config_search_path=csp)


def options(group: str) -> list[str]:
    """The option names of a config group (plugins' and search-path options included; not the
    schema nodes of residual_exp.config, which the group's files extend)."""
    from hydra.core.object_type import ObjectType
    return sorted(o for o in _repository().get_group_options(group, results_filter=ObjectType.CONFIG)
                  if not o.endswith("_schema"))


def spec_of(group: str, node):
    """The typed spec of a ``group`` node (a config node or a plain dict, e.g. a run's config.json):
    its own ``spec``, or — for a node without one, e.g. ``{name: residual_full, units: …}`` built
    by hand or saved by an older version — its option file's."""
    own = node.get("spec", None) if isinstance(node, (dict, DictConfig)) else getattr(node, "spec", None)
    required = {"dataset": "builder", "method": "adapter"}.get(group)
    if own is not None and (required is None or OmegaConf.select(OmegaConf.create(own), required, default=None)):
        return OmegaConf.merge(OmegaConf.structured(SPEC_TYPES[group]), own)
    return spec(group, node["name"] if isinstance(node, dict) else node.name)


def option_choices(group: str, name: str) -> dict[str, str]:
    """The other groups' options that ``group=name`` chooses in its defaults list (e.g. a method's
    ``units`` and ``rank``; ``group=""``: the primary config ``name``'s, i.e. the command line's defaults)."""
    result = _repository().load_config(f"{group}/{name}" if group else name)      # "": the primary config
    return {d.group.lstrip("/"): str(d.value) for d in (result.defaults_list or []) if hasattr(d, "group")}


def option(group: str, name: str):
    """The raw node of ``group=name`` as its file declares it (unresolved, no defaults merged)."""
    result = _repository().load_config(f"{group}/{name}" if group else name)      # "": the primary config
    if result is None:
        raise KeyError(f"{group}={name}: no such config; options: {', '.join(options(group))}")
    return result.config
