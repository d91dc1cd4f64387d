"""``validate(cfg)``: refuse a bad config right after composition, before anything is built.

A generic walk over the schemas (:mod:`residual_exp.config`, :mod:`residual_exp.analysis.config`):
every key must be a field of its node's schema (``task`` and ``analysis`` by their ``name``),
every value must have the field's type and satisfy the field's rules (declared next to it with
:func:`~residual_exp.catalog.fields.rule`), and each schema's ``check`` cross-field rules run
once its own fields are sound.  Every problem is collected and raised as one
:class:`ConfigError`, one ``key=value: what is allowed`` line each::

    trainer.max_epochs=0: must be an integer ≥ 1
    unknown key method.lrr (did you mean method.lr?): got method.lrr=1; the keys of method are: …

``python -m residual_exp`` prints each line as ``error: …`` and exits with status 2.  Only a
request for CUDA imports torch (checked last).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .catalog import options as group_options
from .catalog.fields import BOUNDS, bounds_text, fmt, one_of
from .config import NAMED_NODES, Config, named_schemas, node_schema, sub_type, suggestion
from .errors import ConfigError, JobFailed

__all__ = ["ConfigError", "JobFailed", "validate", "fmt", "one_of", "group_options"]
_ABSENT = object()
EMPTY_FILE = "empty file (0 bytes): give the path of a saved checkpoint"


# --- the walk ---------------------------------------------------------------------------------------------
class _Walk:
    def __init__(self, cfg: DictConfig):
        self.cfg, self.problems, self.seen = cfg, [], set()

    def bad(self, key: str, value: Any, what: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.problems.append(f"{key}={fmt(value)}: {what}")

    def get(self, key: str):
        from omegaconf.errors import MissingMandatoryValue
        try:
            return OmegaConf.select(self.cfg, key, default=_ABSENT, throw_on_missing=True)
        except MissingMandatoryValue:
            self.bad(key, "???", "a value is required")
        except Exception as e:                           # an interpolation that cannot be resolved, …
            if "HydraConfig was not set" in str(e):      # ${hydra:…} outside a Hydra app (tests)
                return _ABSENT
            raw = OmegaConf.select(self.cfg, key, default="?", throw_on_resolution_failure=False)
            self.bad(key, raw, f"cannot be resolved ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
        return _ABSENT

    def node(self, schema: type, prefix: str, raw: dict) -> None:
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for key, value in raw.items():
            if key not in fields and not (not prefix and key == "hydra"):
                self.unknown(prefix + key, value, list(fields), prefix)
        hints = typing.get_type_hints(schema)
        for name, f in fields.items():
            if name in raw:     # a field whose default is "" may stay empty
                self.field(prefix + name, hints[name], dict(f.metadata, empty_ok=f.default == ""), raw[name])
        check = getattr(schema, "check", None)
        node = self.get(prefix[:-1]) if prefix else self.cfg
        if check and isinstance(node, DictConfig):
            def bad(key, value, what):
                self.bad(key[1:] if key.startswith("/") else prefix + key, value, what)
            try:
                check(node, self.cfg, bad)
            except Exception:            # a field the rule reads is itself bad (reported above)
                pass

    def field(self, path: str, hint, rules: dict, raw) -> None:
        if rules.get("free"):
            v = self.get(path)
            if v is not _ABSENT and v is not None and not isinstance(v, DictConfig):
                self.bad(path, v, "must be a dict (key: value, …)")
            elif isinstance(v, DictConfig) and rules.get("schema_at"):     # a schema the node's spec names
                named = self.get(f"{path.rpartition('.')[0]}.{rules['schema_at']}".lstrip("."))
                if isinstance(named, str) and named:
                    from .catalog import load
                    self.node(load(named), path + ".", raw if isinstance(raw, dict) else {})
            return
        inner, optional = sub_type(hint)
        if path in NAMED_NODES:
            return self.named(path, raw)
        if dataclasses.is_dataclass(inner):
            v = self.get(path)
            if v is None and optional or v is _ABSENT:
                return
            if not isinstance(v, DictConfig):
                return self.bad(path, v, "must be null (the target dataset) or a dataset node (pca=imagenet, "
                                         "dataset@pca.reference=NAME)" if optional else "must be a node")
            return self.node(inner, path + ".", raw if isinstance(raw, dict) else {})
        v = self.get(path)
        if v is not _ABSENT:
            self.leaf(path, v, hint, rules)

    def named(self, path: str, raw) -> None:
        """``task`` / ``analysis``: a node whose schema its ``name`` selects."""
        schemas, group = named_schemas(path), path
        name = raw.get("name") if isinstance(raw, dict) else None
        if raw is None and path == "analysis":
            return
        known = sorted(set(schemas) | set(group_options(group)))
        if name not in schemas:
            hint = one_of(known) if path == "task" else "must be chosen with analysis=NAME; " + one_of(known)
            return self.bad(f"{path}.name" if isinstance(raw, dict) else path, name or raw, hint)
        self.node(schemas[name], path + ".", raw)

    def leaf(self, path: str, v, hint, rules: dict) -> None:
        inner, optional = sub_type(hint)
        if v is None:
            if not optional and inner is not Any:
                self.bad(path, v, rules.get("what") or "a value is required")
            return
        origin = typing.get_origin(inner)
        if origin in (list, typing.List):
            if not isinstance(v, (list, ListConfig)):
                return self.bad(path, v, "must be a list")
            item = typing.get_args(inner)[0] if typing.get_args(inner) else Any
            if len(v) < rules.get("min_len", 0):
                self.bad(path, list(v), "must name at least one of " + " | ".join(item) if isinstance(item, type)
                         and issubclass(item, Enum) else "must not be empty")
            for i, x in enumerate(v):
                self.item(f"{path}[{i}]", x, item, dict(rules.get("item") or {}))
            return
        what = self.problem(v, inner, rules, optional)
        if what:                             # a rule's own wording replaces the generic one
            self.bad(path, v, what if what == EMPTY_FILE else rules.get("what") or what)

    def item(self, path: str, x, hint, rules: dict) -> None:
        if rules.get("entry") and isinstance(x, DictConfig):
            keys = [f.name for f in dataclasses.fields(typing.get_type_hints(Config)[rules["entry"]])] + ["label"]
            if "name" not in x:
                return self.bad(path, x, f"a dict entry needs name: NAME ({one_of(self.options(rules))})")
            for extra in x:
                if extra not in keys:
                    close = difflib.get_close_matches(str(extra), keys, n=1, cutoff=0.6)
                    self.problems.append(f"unknown key {path}.{extra}" + (f" (did you mean {close[0]}?)" if close
                                         else "") + f"; an entry takes: {', '.join(sorted(keys))}")
            path, x = f"{path}.name", x.name
        self.leaf(path, x, hint, rules)

    def options(self, rules: dict) -> list[str]:
        return group_options(rules["options"].removeprefix("group:"))

    def problem(self, v, t, rules: dict, optional: bool) -> str | None:
        """What is wrong with a leaf value ``v`` of type ``t`` (None: nothing)."""
        null = "null or " if optional else ""
        if isinstance(t, type) and issubclass(t, Enum):
            return None if v in set(t) else one_of(list(t), optional)
        if t is bool:
            return None if isinstance(v, bool) else "must be true or false"
        if t in (int, float):
            ok = (isinstance(v, int) if t is int else isinstance(v, (int, float)) and math.isfinite(v)) \
                and not isinstance(v, bool) and all(op(v, rules[k]) for k, (_, op) in BOUNDS.items() if k in rules)
            return None if ok else f"must be {null}{'an integer' if t is int else 'a finite number'}{bounds_text(rules, t)}"
        if t is str or (t is Any and isinstance(v, str)):
            if not isinstance(v, str) or not (v.strip() or rules.get("empty_ok")):
                return f"must be {null}a non-empty string"
            if "choices" in rules and v not in rules["choices"]:
                return one_of(rules["choices"])
            if "options" in rules and v not in self.options(rules):
                return f"not a {rules['options'].removeprefix('group:')} config; {one_of(self.options(rules))}"
            p, where = rules.get("path"), Path(v).expanduser()
            if p == "folder" and where.exists() and not where.is_dir():
                return "is a file, not a folder"
            if p and p != "folder" and not (where.is_dir() if p == "dir" else where.is_file()):
                return f"no such {'directory' if p == 'dir' else 'file'}"
            if p == "checkpoint" and where.stat().st_size == 0:
                return EMPTY_FILE
        return None

    def unknown(self, path: str, value, fields: list[str], prefix: str) -> None:
        hint = suggestion(path, fields)
        self.problems.append(f"unknown key {path}{hint}: got {path}={fmt(value)}; the keys of "
                             f"{prefix[:-1] or 'the config'} are: {', '.join(fields)}")

    def cuda(self) -> None:
        """Last: the only check that imports torch, and only when CUDA is asked for."""
        device, accelerator = self.get("device"), self.get("trainer.accelerator")
        wants = [("device", device)] if isinstance(device, str) and device.startswith("cuda") else []
        wants += [("trainer.accelerator", accelerator)] if accelerator in ("gpu", "cuda") else []
        wants = [(k, v) for k, v in wants if k not in self.seen]
        if wants:
            from .runtime import cuda_problems
            for key, value, what in cuda_problems(wants):
                self.bad(key, value, what)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (nothing is built or read)."""
    if not isinstance(cfg, DictConfig):
        raise ConfigError([f"config={type(cfg).__name__}: must be a composed DictConfig"])
    w = _Walk(cfg)
    w.node(node_schema(""), "", OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False))
    w.cuda()
    if w.problems:
        raise ConfigError(w.problems)
