"""``validate(cfg)``: refuse a bad config right after composition, before anything is built.

:func:`residual_exp.run.run` calls :func:`validate` first; every problem found is collected
and raised as one :class:`ConfigError` (a ``ValueError``), one line per problem::

    trainer.max_epochs=0: must be an integer ≥ 1
    unknown key method.lrr (did you mean method.lr?) = 1; the keys of method are: name, units, …

``python -m residual_exp`` prints each line as ``error: …`` on stderr and exits with status 2.

What is checked (see the ``_check_*`` functions):

* **keys** — every key of the composed config is a field of the schema of its node (the
  dataclasses of :mod:`residual_exp.config` and :mod:`residual_exp.analysis.config`; ``task``
  and ``analysis`` by their ``name``).  Keys added with ``+`` are refused with a suggestion.
  ``model.params``, ``dataset.params``, ``task.throughput`` and ``logger`` are free dicts.
* **types and ranges** of every number (seeds in [0, 2³²), sizes ≥ 1, rates > 0 and finite, …);
* **enums** (device, method, units, caches, conventions, precisions, splits, analyses, …);
* **combinations** (a method and its units / others / init, compat=official and the
  conventions it reproduces, CUDA requested where there is none — checked last: the only
  check that imports torch, and only when CUDA is asked for).

The module imports no torch, no model and no data code: the lists of registered backbone
families, datasets and methods are spelt out here (tests/integration/test_validation.py
checks that they equal the registries).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

# --- what is allowed (kept equal to the registries by tests/integration/test_validation.py) ----------
FAMILIES = ("blip", "open_clip", "timm", "tiny_clip")                   # backbones.list_families()
DATASETS = ("cifar10", "cifar100", "dtd", "eurosat", "gtsrb", "image_folder", "imagenet", "mnist",
            "resisc45", "shapes_background", "shapes_color", "shapes_position", "shapes_shape",
            "shapes_size", "stanford_cars", "sun397", "svhn")              # data.registry.list_datasets()
METHODS = ("base", "finetune", "linear_adapter", "spectral_adapter",
           "residual_coarse", "residual_fine", "residual_full")           # methods.METHODS
OUTPUT_METHODS = ("base", "finetune", "linear_adapter", "spectral_adapter")   # act on the output feature
RESIDUAL_METHODS = ("residual_coarse", "residual_fine", "residual_full")      # act on residual units
UNIT_KINDS = ("embed", "head", "mlp", "const")                            # decompose.units.KINDS
UNIT_GROUPS = ("heads", "mlps", "heads+mlps", "all")
SPLITS = ("train", "val", "test", "reference")                            # data.registry.SPLITS
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "64-true", "16-true", "bf16-true",
              "32", "16", "bf16", "64")                                    # Lightning's Trainer(precision=)
LAMBDA_INITS = ("normal", "ones", "eigenvalues")                          # methods.init_lambda
LINEAR_INITS = ("default", "identity")                                    # methods.LinearAdapter
OTHERS = ("drop", "mean", "add")
MODEL_PRECISIONS = ("auto", "fp32", "bf16")
CACHE_LAYOUTS = ("lowrank", "dense")                                      # encode.LAYOUTS
CACHE_DTYPES = ("auto", "float16", "float32", "float64")                  # "auto" + encode.DTYPES
CACHE_VERIFY = ("once", "always", "size")
CACHE_ACTIONS = ("list", "verify", "prune")
CACHE_KINDS = ("encodings", "bases", "classifiers")
CONVENTIONS = {"units": ("official", "centred"), "prototype": ("mean", "cosine"),
               "evr_rule": ("strict", "inclusive"),
               "similarity_weights": ("eigenvalues", "sqrt_eigenvalues"),
               "similarity_unweighted": ("diagonal", "matched")}
COMPAT = ("none", "official")
CHECK_DTYPES = ("float32", "float64")                                     # tasks.check_decomposition.DTYPES
SCORES = ("zero_shot", "text_alignment", "output_correlation")            # analysis.coarse_selection.SCORES
ABLATIONS = ("zero", "mean")
ANALYSIS_OTHERS = ("drop", "add")
VARIANTS = ("weighted", "unweighted")
CROSS_MODEL = ("profile", "raw", "none")
ESTIMATORS = ("linear", "mle")
SEED_MAX = 2 ** 32
# dataset.params of dataset=image_folder (data/image_folder.py reads these keys)
IMAGE_FOLDER_PARAMS = ("val_fraction", "test_fraction", "split_seed", "templates", "classnames",
                       "drop_empty_classes", "splits_dir")

FREE_NODES = ("logger", "model.params", "dataset.params", "task.throughput")   # anything goes inside
CONF_DIR = Path(__file__).resolve().parent / "conf"

__all__ = ["ConfigError", "JobFailed", "validate"]


class ConfigError(ValueError):
    """Every problem of a config, one ``key=value: what is allowed`` line each."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):                                # survives pickling (submitit jobs)
        return (type(self), (self.problems,))


class JobFailed(CompactHydraException):
    """Raised in a multirun job instead of a user error, so that Hydra records the job as failed
    and prints this message alone (no traceback).  ``seen`` tells the entry point to exit 2."""
    seen = False

    def __init__(self, *args):
        super().__init__(*args)
        JobFailed.seen = True                            # also when unpickled from a launcher job


# --- formatting ------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    """A value as it would be written on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v and v.strip() == v else repr(v)
    if isinstance(v, (list, tuple, ListConfig)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, (dict, DictConfig)):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _one_of(allowed: Iterable[str]) -> str:
    return "must be one of " + " | ".join(allowed)


_ABSENT = object()


def _bound(x) -> str:
    return "2**32" if x == SEED_MAX else str(x)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _raw(cfg, key: str):
    """The unresolved value at ``key`` (an interpolation string as written)."""
    node = cfg
    try:
        for part in key.split("."):
            node = node._get_node(part)
        return node._value()
    except Exception:
        return "?"


# --- schemas ---------------------------------------------------------------------------------------------
_FREE = "free"


def _task_schemas() -> dict[str, type]:
    from . import config
    out = {}
    for obj in vars(config).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and issubclass(obj, config.TaskConfig):
            name = {f.name: f for f in dataclasses.fields(obj)}["name"].default
            out.setdefault(name, obj)
    return out


def _analysis_schemas() -> dict[str, type]:
    from .analysis.config import SCHEMAS
    return {{f.name: f for f in dataclasses.fields(s)}["name"].default: s for s in SCHEMAS.values()}


def _field_schema(hint) -> Any:
    """The dataclass of a field (also inside Optional), _FREE for dicts and Any, else None (a leaf)."""
    if hint is Any:
        return _FREE
    if dataclasses.is_dataclass(hint):
        return hint
    origin = typing.get_origin(hint)
    if origin in (dict, typing.Dict):
        return _FREE
    if origin is typing.Union:
        for arg in typing.get_args(hint):
            sub = _field_schema(arg)
            if sub is not None and arg is not type(None):
                return sub
    return None


def _group_options(group: str) -> list[str]:
    """The options of a config group: its file names (listing them reads no YAML, and keeps the
    validation pass free of torch and Hydra's config loader)."""
    return sorted(p.stem for p in (CONF_DIR / group).iterdir() if p.suffix == _CONFIG_SUFFIX)


_CONFIG_SUFFIX = ".yaml"


# --- the checker -----------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.problems: list[str] = []
        self._seen_bad: set[str] = set()

    # reporting
    def bad(self, key: str, value: Any, allowed: str) -> None:
        if key in self._seen_bad:
            return
        self._seen_bad.add(key)
        self.problems.append(f"{key}={_fmt(value)}: {allowed}")

    def get(self, key: str, default=_ABSENT):
        """The resolved value at ``key`` (``_ABSENT`` when the key is absent or unusable: a
        missing mandatory value or an interpolation that does not resolve is reported)."""
        from omegaconf.errors import MissingMandatoryValue
        try:
            return OmegaConf.select(self.cfg, key, default=default, throw_on_missing=True)
        except MissingMandatoryValue:
            self.bad(key, "???", "a value is required")
        except Exception as e:       # interpolation that cannot be resolved, …
            self.bad(key, _raw(self.cfg, key), f"cannot be resolved ({type(e).__name__}: "
                                               f"{(str(e).splitlines() or [''])[0]})")
        return _ABSENT

    # typed rules (each skips an absent key, and one already reported)
    def integer(self, key, lo=None, hi=None, null=False, value=_ABSENT):
        v = self.get(key) if value is _ABSENT else value
        if v is _ABSENT or (v is None and null):
            return v
        what = ("null or " if null else "") + "an integer" + (f" ≥ {lo}" if lo is not None else "") + \
            (f" and < {_bound(hi)}" if hi is not None and lo is not None else (f" < {_bound(hi)}" if hi is not None else ""))
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v >= hi):
            self.bad(key, v, f"must be {what}")
            return _ABSENT
        return v

    def number(self, key, gt=None, ge=None, le=None, lt=None, null=False, value=_ABSENT):
        v = self.get(key) if value is _ABSENT else value
        if v is _ABSENT or (v is None and null):
            return v
        bounds = []
        if gt is not None or ge is not None:
            lo_b, lo = ("(", gt) if gt is not None else ("[", ge)
            if le is not None or lt is not None:
                hi_b, hi = ("]", le) if le is not None else (")", lt)
                bounds.append(f"in {lo_b}{lo}, {hi}{hi_b}")
            else:
                bounds.append(f"> {gt}" if gt is not None else f"≥ {ge}")
        elif le is not None or lt is not None:
            bounds.append(f"≤ {le}" if le is not None else f"< {lt}")
        what = ("null or " if null else "") + "a finite number" + (" " + bounds[0] if bounds else "")
        ok = _is_num(v) and math.isfinite(v) and not (
            (gt is not None and v <= gt) or (ge is not None and v < ge) or
            (le is not None and v > le) or (lt is not None and v >= lt))
        if not ok:
            self.bad(key, v, f"must be {what}")
            return _ABSENT
        return v

    def choice(self, key, allowed: Sequence[str], null=False, value=_ABSENT, what: str | None = None):
        v = self.get(key) if value is _ABSENT else value
        if v is _ABSENT or (v is None and null):
            return v
        if not isinstance(v, str) or v not in allowed:
            self.bad(key, v, what or ("must be null or one of " + " | ".join(allowed) if null else _one_of(allowed)))
            return _ABSENT
        return v

    def boolean(self, key):
        v = self.get(key)
        if v is not _ABSENT and not isinstance(v, bool):
            self.bad(key, v, "must be true or false")

    def string(self, key, null=False, nonempty=True, value=_ABSENT):
        v = self.get(key) if value is _ABSENT else value
        if v is _ABSENT or (v is None and null):
            return v
        if not isinstance(v, str) or (nonempty and not v.strip()):
            self.bad(key, v, "must be " + ("null or " if null else "") + "a non-empty string")
            return _ABSENT
        return v

    def items(self, key, check, *, nonempty=False, what_empty="must not be empty"):
        """Run ``check(item_key, value)`` on every entry of the list at ``key``."""
        v = self.get(key)
        if v is _ABSENT or v is None:
            return v
        if not isinstance(v, (list, tuple, ListConfig)):
            self.bad(key, v, "must be a list")
            return _ABSENT
        if nonempty and len(v) == 0:
            self.bad(key, list(v), what_empty)
        for i, x in enumerate(v):
            check(f"{key}[{i}]", x)
        return v

    def unit_spec(self, key, allow_output: bool):
        v = self.get(key)
        if v is _ABSENT:
            return v
        groups = UNIT_GROUPS + (("output",) if allow_output else ())
        what = (f"must be one of {' | '.join(groups)}, or unit kinds joined by '+' "
                f"({' | '.join(UNIT_KINDS)}, e.g. head+const)")
        if not isinstance(v, str) or not (v in groups or all(k in UNIT_KINDS for k in v.split("+"))):
            self.bad(key, v, what)
            return _ABSENT
        return v

    # --- unknown keys ------------------------------------------------------------------------------------
    def unknown_keys(self) -> None:
        from .config import Config
        tree = OmegaConf.to_container(self.cfg, resolve=False, throw_on_missing=False)
        self._walk(tree, Config, "")

    def _walk(self, tree: dict, schema: type, prefix: str) -> None:
        fields = [f.name for f in dataclasses.fields(schema)]
        hints = typing.get_type_hints(schema)
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if not prefix and key == "hydra":
                continue
            if key not in fields:
                self._unknown(path, value, fields, prefix)
                continue
            if path in FREE_NODES:
                continue
            sub = _field_schema(hints[key])
            if path == "task":
                sub = _task_schemas().get(value.get("name")) if isinstance(value, dict) else None
            elif path == "analysis":
                sub = _analysis_schemas().get(value.get("name")) if isinstance(value, dict) else None
            if isinstance(sub, type) and isinstance(value, dict):
                self._walk(value, sub, path + ".")

    def _unknown(self, path: str, value, fields: list[str], prefix: str) -> None:
        key = path[len(prefix):]
        node = prefix[:-1] or "the config"
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        if close:
            hint = f" (did you mean {prefix}{close[0]}?)"
        else:                                      # `+lr=1`, `+pca.k=0`: a key that lives in another group?
            moved = moved_key(path)
            hint = f" (did you mean {moved}?)" if moved else ""
        self.problems.append(f"unknown key {path}{hint}: got {path}={_fmt(value)}; the keys of {node} are: "
                             f"{', '.join(fields)}")


def moved_key(path: str) -> str | None:
    """The schema key with ``path``'s last name in another place (the method group first: it owns
    lr, batch_size, evr, k), e.g. ``pca.k`` → ``method.k``; None when there is none."""
    leaf = path.rsplit(".", 1)[-1]
    moved = sorted((p for p in _all_leaf_paths() if p.rsplit(".", 1)[-1] == leaf and p != path),
                   key=lambda p: (not p.startswith("method."), p))
    return moved[0] if moved else None


def _all_leaf_paths() -> list[str]:
    from .config import Config
    out: list[str] = []

    def walk(schema, prefix):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            sub = _field_schema(hints[f.name])
            if isinstance(sub, type):
                walk(sub, f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)
    walk(Config, "")
    return out


# --- the rules, node by node -------------------------------------------------------------------------------
def _check_top(c: _Checker) -> None:
    c.integer("seed", lo=0, hi=SEED_MAX)
    device = c.get("device")
    if device is not _ABSENT and not (isinstance(device, str) and (
            device in ("auto", "cpu", "cuda") or
            (device.startswith("cuda:") and device[5:].isdigit()))):
        c.bad("device", device, _one_of(DEVICES) + " (N a GPU index ≥ 0)")
    compat = c.choice("compat", COMPAT)
    c.boolean("resume")
    name = c.string("run_name")
    if isinstance(name, str) and unsafe_name(name):
        c.bad("run_name", name, RUN_NAME_RULE)
    for key in ("sweep_dir", "run_dir", "out", "model_dir", "inputs"):     # checked by the task using them
        c.string(key, null=True)
    for key, allowed in CONVENTIONS.items():
        c.choice(f"conventions.{key}", allowed)
    if compat == "official":
        # compat=official reproduces the official run: its conventions, not this project's
        for key, want in (("units", "official"), ("evr_rule", "strict")):
            v = c.get(f"conventions.{key}")
            if v is not _ABSENT and v != want and v in CONVENTIONS[key]:
                c.bad(f"conventions.{key}", v, f"compat=official reproduces the official run, which needs "
                                               f"conventions.{key}={want} (or use compat=none)")


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
    if isinstance(name, str) and unsafe_name(name):
        return f"run_name={_fmt(name)}: {RUN_NAME_RULE}"
    return None


def _check_model(c: _Checker) -> None:
    c.string("model.name")
    family = c.choice("model.family", FAMILIES)
    c.integer("model.image_size", lo=1, null=True)
    c.choice("model.precision", MODEL_PRECISIONS)
    c.number("model.logit_scale", gt=0)
    arch = c.string("model.arch", null=True)
    c.string("model.pretrained", null=True)
    weights = c.string("model.weights", null=True)
    c.string("model.cache_dir", null=True)
    if family in ("open_clip", "timm", "blip") and arch is None:
        c.bad("model.arch", None, f"model.family={family} needs an architecture name "
                                  f"(e.g. {_ARCH_EXAMPLE[family]})")
    if isinstance(weights, str):
        import os
        p = Path(os.path.expanduser(weights))
        if not p.is_file():
            c.bad("model.weights", weights, "no such file: give the path of a saved checkpoint, or null to use "
                                            "model.pretrained")
        elif p.stat().st_size == 0:
            c.bad("model.weights", weights, "empty file (0 bytes): give the path of a saved checkpoint")
    if family == "tiny_clip" and weights is None:
        c.choice("model.pretrained", ("embedded",), null=True,
                 what="model.family=tiny_clip takes model.pretrained=embedded or null (random weights), "
                      "or a checkpoint in model.weights")


_ARCH_EXAMPLE = {"open_clip": "model.arch=ViT-B-16", "timm": "model.arch=vit_large_patch16_224",
                 "blip": "model.arch=blip-itm-large"}


def _check_dataset_node(c: _Checker, prefix: str) -> None:
    c.choice(f"{prefix}.name", DATASETS)
    c.string(f"{prefix}.root")
    c.integer(f"{prefix}.batch_size", lo=1)
    c.integer(f"{prefix}.num_workers", lo=0)
    for key in ("download", "skip_bad_images", "content_hash"):
        c.boolean(f"{prefix}.{key}")
    params = c.get(f"{prefix}.params")
    if params is not _ABSENT and not isinstance(params, DictConfig):
        c.bad(f"{prefix}.params", params, "must be a dict (key: value, …)")
    elif params is not _ABSENT and c.get(f"{prefix}.name") == "image_folder":
        _check_image_folder_params(c, f"{prefix}.params", params)


def _check_image_folder_params(c: _Checker, key: str, params) -> None:
    """``dataset.params`` of ``image_folder``: known keys, fractions in (0, 1) that leave train images,
    a seed, class names and templates as lists of strings."""
    for k in params:
        if k not in IMAGE_FOLDER_PARAMS:
            close = difflib.get_close_matches(str(k), IMAGE_FOLDER_PARAMS, n=1, cutoff=0.6)
            c.problems.append(f"unknown key {key}.{k}" + (f" (did you mean {key}.{close[0]}?)" if close else "")
                              + f": dataset=image_folder takes {', '.join(IMAGE_FOLDER_PARAMS)}")
    fracs = [c.number(f"{key}.{k}", gt=0, lt=1) for k in ("val_fraction", "test_fraction") if k in params]
    if len(fracs) == 2 and all(_is_num(f) for f in fracs) and sum(fracs) >= 1:
        c.bad(f"{key}.test_fraction", fracs[1], f"val_fraction + test_fraction = {sum(fracs):g} leaves no train "
                                                "images: they must sum to < 1")
    if "split_seed" in params:
        c.integer(f"{key}.split_seed", lo=0, hi=SEED_MAX)
    if "drop_empty_classes" in params:
        c.boolean(f"{key}.drop_empty_classes")
    if "splits_dir" in params:
        c.string(f"{key}.splits_dir", null=True)
    if params.get("templates") is not None:
        c.items(f"{key}.templates", lambda k, v: (
            c.bad(k, v, "must be a prompt with exactly one {} (e.g. 'a photo of a {}.')")
            if not isinstance(v, str) or v.count("{}") != 1 else None), nonempty=True,
            what_empty="must list at least one prompt template")
    names = c.get(f"{key}.classnames")
    if names is _ABSENT or names is None:
        return
    values = list(names.values()) if isinstance(names, DictConfig) else names
    if not isinstance(names, (DictConfig, ListConfig)) or not all(isinstance(v, str) and v.strip() for v in values):
        c.bad(f"{key}.classnames", names, "must be a list of non-empty names (one per class folder, in sorted "
                                          "folder order) or a dict {folder: name}")
    elif len(values) == 0:
        c.bad(f"{key}.classnames", names, "must not be empty (null: the folder names)")


def _check_pca(c: _Checker) -> None:
    ref = c.get("pca.reference")
    if ref is not _ABSENT and ref is not None:
        if isinstance(ref, DictConfig):
            _check_dataset_node(c, "pca.reference")
        else:
            c.bad("pca.reference", ref, "must be null (the target dataset) or a dataset node "
                                        "(pca=imagenet, dataset@pca.reference=NAME)")
    c.choice("pca.split", SPLITS)
    c.integer("pca.max_samples", lo=2, null=True)


def _check_method(c: _Checker) -> None:
    name = c.choice("method.name", METHODS)
    units = c.unit_spec("method.units", allow_output=True)
    others = c.choice("method.others", OTHERS)
    init = c.get("method.init")
    evr = c.number("method.evr", gt=0, le=1, null=True)
    k = c.integer("method.k", lo=1, null=True)
    c.number("method.dropped_value")
    c.integer("method.batch_size", lo=1)
    c.number("method.weight_decay", ge=0)
    c.number("method.grad_clip", gt=0, null=True)
    c.boolean("method.cache")
    if name != "base":                                  # base trains nothing: its lr is unused
        c.number("method.lr", gt=0)
    if evr not in (None, _ABSENT) and k not in (None, _ABSENT):
        c.bad("method.k", k, f"set method.evr (={_fmt(evr)}) or method.k, not both (the other null)")
    if name is _ABSENT:
        return
    if units is not _ABSENT:
        if name in OUTPUT_METHODS and units != "output":
            c.bad("method.units", units, f"method={name} acts on the output feature: must be output")
        elif name in RESIDUAL_METHODS and units == "output":
            c.bad("method.units", units, f"method={name} reweights residual units: must be one of "
                                         f"{' | '.join(UNIT_GROUPS)} or unit kinds joined by '+' "
                                         f"({' | '.join(UNIT_KINDS)}), not output")
    if others == "mean" and name not in RESIDUAL_METHODS:
        c.bad("method.others", others, f"mean (replace the other units by their reference mean) only applies to "
                                       f"residual_* methods; method={name} takes drop")
    if init is _ABSENT:
        return
    if name == "linear_adapter":
        c.choice("method.init", LINEAR_INITS, value=init,
                 what="method=linear_adapter takes default (nn.Linear's init) | identity")
    elif name == "residual_coarse":
        c.choice("method.init", ("normal", "ones"), value=init,
                 what="method=residual_coarse takes normal | ones (eigenvalues needs principal components, "
                      "which residual_coarse has none of)")
    else:
        c.choice("method.init", LAMBDA_INITS, value=init)


def _check_trainer(c: _Checker) -> None:
    c.integer("trainer.max_epochs", lo=1)
    c.integer("trainer.patience", lo=0)
    c.integer("trainer.devices", lo=1)
    c.integer("trainer.num_workers", lo=0)
    c.integer("trainer.cpu_threads", lo=1, null=True)
    c.choice("trainer.precision", PRECISIONS, what=f"{_one_of(PRECISIONS)} (Lightning's precision values)")
    c.choice("trainer.accelerator", ACCELERATORS)
    c.boolean("trainer.lr_find")
    c.boolean("trainer.progress_bar")


def _check_cache(c: _Checker) -> None:
    folder = c.string("cache.dir")
    if isinstance(folder, str) and Path(folder).expanduser().exists() and not Path(folder).expanduser().is_dir():
        c.bad("cache.dir", folder, "is a file, not a folder")
    c.choice("cache.layout", CACHE_LAYOUTS)
    c.choice("cache.dtype", CACHE_DTYPES)
    c.number("cache.memory_budget_gb", gt=0)
    c.boolean("cache.enabled")
    c.choice("cache.verify", CACHE_VERIFY)


def _check_task(c: _Checker) -> None:
    name = c.get("task.name")
    if name is _ABSENT:
        return
    schemas = _task_schemas()
    known = sorted(set(schemas) | set(_group_options("task")))
    if name not in known:
        c.bad("task.name", name, _one_of(known))
        return
    if name == "check_decomposition":
        c.integer("task.batch_size", lo=1)
        c.choice("task.dtype", CHECK_DTYPES)
        c.number("task.tolerance", gt=0)
        c.integer("task.seed", lo=0, hi=SEED_MAX)
    elif name == "inspect_data":
        c.boolean("task.verify")
    elif name == "pretrain_tiny_clip":
        for key in ("n_images", "epochs", "batch_size"):
            c.integer(f"task.{key}", lo=1)
        c.number("task.lr", gt=0)
        c.integer("task.seed", lo=0, hi=SEED_MAX)
        c.string("task.out", null=True)
    elif name == "report":
        c.items("task.run_dirs", lambda k, v: _existing_dir(
            c, k, value=v, what="no such directory (a folder holding runs with results.json)"))
        _existing_dir(c, "sweep_dir", what="no such directory (a sweep folder holding runs with results.json)")
        c.string("task.out_dir", null=True)
        c.string("task.lambda_run", null=True)
    elif name == "cache":
        c.choice("task.action", CACHE_ACTIONS)
        c.items("task.kinds", lambda k, v: c.choice(k, CACHE_KINDS, value=v), nonempty=True,
                what_empty=f"must name at least one of {' | '.join(CACHE_KINDS)}")
        c.boolean("task.dry_run")
    elif name == "export":
        c.boolean("task.copy_weights")
        _existing_dir(c, "run_dir", required="task=export needs run_dir=<the folder of a task=train run>")
        c.string("out", null=True)
    elif name == "predict":
        c.integer("task.top_k", lo=1)
        c.integer("task.batch_size", lo=1)
        c.integer("task.grid", lo=0)
        c.string("task.out_dir", null=True)
        c.boolean("task.verify_export")
        _existing_dir(c, "model_dir", required="task=predict needs model_dir=<an export folder (task=export)>")
        inputs = c.string("inputs", null=True)
        if inputs is None:
            c.bad("inputs", None, "task=predict needs inputs=<an image, a folder or a glob>")
    elif name == "evaluate":
        c.integer("task.batch_size", lo=1)
        c.choice("task.split", SPLITS)
        c.boolean("task.verify_export")
        _existing_dir(c, "model_dir", required="task=evaluate needs model_dir=<an export folder (task=export)>")
    elif name == "plan":
        models = _group_options("model")
        c.items("task.grid.model", lambda k, v: c.choice(k, models, value=v,
                                                         what=f"not a model config; {_one_of(models)}"))
        c.items("task.grid.dataset", lambda k, v: c.choice(k, DATASETS, value=v))
        c.items("task.grid.method", lambda k, v: c.choice(k, METHODS, value=v))
        c.number("task.typical_epoch_fraction", gt=0, le=1)
        throughput = c.get("task.throughput")
        if isinstance(throughput, DictConfig):
            _positive_leaves(c, "task.throughput", throughput)


def _existing_dir(c: _Checker, key: str, required: str | None = None, value=_ABSENT,
                  what: str = "no such directory") -> None:
    """``key`` (or ``value``) names an existing folder; null is refused with ``required`` when given."""
    v = c.string(key, null=True, value=value)
    if v is None:
        if required:
            c.bad(key, None, required)
    elif isinstance(v, str) and not Path(v).expanduser().is_dir():
        c.bad(key, v, what)


def _positive_leaves(c: _Checker, key: str, node) -> None:
    if isinstance(node, DictConfig):
        for k in node:
            _positive_leaves(c, f"{key}.{k}", c.get(f"{key}.{k}"))
    elif node is not _ABSENT:
        c.number(key, gt=0, value=node)


def _check_analysis(c: _Checker) -> None:
    a = c.get("analysis", default=None)
    if a is _ABSENT or a is None:                # task=analysis alone: the task lists the analyses
        return
    if not isinstance(a, DictConfig):
        c.bad("analysis", a, "must be chosen with analysis=NAME; " + _one_of(sorted(_analysis_schemas())))
        return
    name = c.choice("analysis.name", sorted(_analysis_schemas()))
    if name is _ABSENT:
        return
    from .config import DatasetConfig, ModelConfig
    models = _group_options("model")
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)} | {"label"}
    dataset_keys = {f.name for f in dataclasses.fields(DatasetConfig)} | {"label"}
    c.items("analysis.models", lambda k, v: _entry(c, k, v, models, model_keys, "model"))
    c.choice("analysis.split", SPLITS)
    c.integer("analysis.max_samples", lo=2, null=True)
    c.integer("analysis.batch_size", lo=1, null=True)
    c.boolean("analysis.progress")
    if name == "intrinsic_dimension":
        c.unit_spec("analysis.units", allow_output=False)
        c.number("analysis.variance_threshold", gt=0, le=1)
        c.number("analysis.discard_fraction", ge=0, lt=1)
        c.choice("analysis.estimator", ESTIMATORS)
        c.integer("analysis.chunk_size", lo=1, null=True)
    elif name == "spectral_similarity":
        c.items("analysis.datasets", lambda k, v: _entry(c, k, v, DATASETS, dataset_keys, "dataset"))
        c.choice("analysis.reference", DATASETS, null=True)
        c.choice("analysis.reference_split", SPLITS, null=True)
        c.integer("analysis.reference_max_samples", lo=2, null=True)
        c.unit_spec("analysis.units", allow_output=False)
        c.number("analysis.evr", gt=0, le=1, null=True)
        c.items("analysis.variants", lambda k, v: c.choice(k, VARIANTS, value=v), nonempty=True,
                what_empty=f"must name at least one of {' | '.join(VARIANTS)}")
        c.choice("analysis.cross_model", CROSS_MODEL)
    elif name == "coarse_selection":
        c.choice("analysis.score_split", SPLITS)
        c.items("analysis.scores", lambda k, v: c.choice(k, SCORES, value=v))
        c.items("analysis.random_seeds", lambda k, v: c.integer(k, lo=0, hi=SEED_MAX, value=v))
        c.items("analysis.keep_top", lambda k, v: c.integer(k, lo=1, value=v))
        c.items("analysis.keep_fractions", lambda k, v: c.number(k, gt=0, le=1, value=v))
        c.items("analysis.ablations", lambda k, v: c.choice(k, ABLATIONS, value=v), nonempty=True,
                what_empty=f"must name at least one of {' | '.join(ABLATIONS)}")
        c.choice("analysis.others", ANALYSIS_OTHERS)
        c.number("analysis.evr", gt=0, le=1, null=True)
        scores, seeds = c.get("analysis.scores"), c.get("analysis.random_seeds")
        if isinstance(scores, ListConfig) and isinstance(seeds, ListConfig) and not scores and not seeds:
            c.bad("analysis.scores", [], "no head ranking to evaluate: name a score "
                                         f"({' | '.join(SCORES)}) or give analysis.random_seeds")
    elif name == "text_spans":
        dictionary = c.string("analysis.dictionary", null=True)
        if isinstance(dictionary, str) and not Path(dictionary).expanduser().is_file():
            c.bad("analysis.dictionary", dictionary, "no such file (a text file, one description per line; "
                                                     "null: the generated default)")
        c.unit_spec("analysis.units", allow_output=False)
        for key in ("n_components", "n_descriptions", "n_lambda"):
            c.integer(f"analysis.{key}", lo=1)
        c.number("analysis.evr", gt=0, le=1, null=True)
        c.boolean("analysis.center_dictionary")
        run_dir = c.string("analysis.run_dir", null=True)
        if isinstance(run_dir, str) and not Path(run_dir).expanduser().is_dir():
            c.bad("analysis.run_dir", run_dir, "no such directory (the folder of a trained residual_* run)")


def _entry(c: _Checker, key: str, v, names: Sequence[str], keys: set[str], group: str) -> None:
    """An ``analysis.models`` / ``analysis.datasets`` entry: a NAME, or {name: NAME, label: …, <keys>}."""
    if isinstance(v, str):
        c.choice(key, names, value=v, what=f"not a {group} config; {_one_of(names)}")
    elif isinstance(v, DictConfig):
        if "name" not in v:
            c.bad(key, v, f"a dict entry needs name: NAME ({_one_of(names)})")
        else:
            c.choice(f"{key}.name", names, value=v.get("name"), what=f"not a {group} config; {_one_of(names)}")
        for extra in v:
            if extra not in keys:
                close = difflib.get_close_matches(str(extra), sorted(keys), n=1, cutoff=0.6)
                c.problems.append(f"unknown key {key}.{extra}" + (f" (did you mean {close[0]}?)" if close else "")
                                  + f"; an entry takes: {', '.join(sorted(keys))}")
    else:
        c.bad(key, v, f"must be a {group} name or a dict {{name: NAME, label: …}}")


def _check_cuda(c: _Checker) -> None:
    """Last: the only check that imports torch, and only when CUDA is asked for."""
    device, accelerator = c.get("device"), c.get("trainer.accelerator")
    wants = [("device", device)] if isinstance(device, str) and device.startswith("cuda") else []
    if accelerator in ("gpu", "cuda"):
        wants.append(("trainer.accelerator", accelerator))
    wants = [(k, v) for k, v in wants if k not in c._seen_bad]
    if not wants:
        return
    import torch
    if not torch.cuda.is_available():
        for key, value in wants:
            c.bad(key, value, "CUDA is not available on this machine: use device=cpu or device=auto"
                  + (" and trainer.accelerator=auto (or cpu)" if key == "trainer.accelerator" else ""))
        return
    if isinstance(device, str) and device.startswith("cuda:"):
        n = torch.cuda.device_count()
        if int(device[5:]) >= n:
            c.bad("device", device, f"this machine has {n} CUDA device{'s' if n != 1 else ''}: "
                                    f"use cuda:0 … cuda:{n - 1}, cuda or auto")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (nothing is built or read)."""
    if not isinstance(cfg, DictConfig):
        raise ConfigError([f"config={type(cfg).__name__}: must be a composed DictConfig"])
    c = _Checker(cfg)
    c.unknown_keys()
    _check_top(c)
    _check_task(c)
    _check_model(c)
    _check_dataset_node(c, "dataset")
    _check_pca(c)
    _check_method(c)
    _check_trainer(c)
    _check_cache(c)
    _check_analysis(c)
    _check_cuda(c)
    if c.problems:
        raise ConfigError(c.problems)
