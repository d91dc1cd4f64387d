"""Command-line overrides that Hydra cannot compose, reported as our errors (exit status 2).

Hydra refuses some overrides while composing — before any of our code runs — with its own
wording, which can mislead: ``pca.k=0`` (the key moved to ``method.k``) answers "To append to
your config use +pca.k=0", a misspelt option lists the search path.  :func:`precheck` composes
the command line's overrides once with Hydra's compose API (≈ 0.1 s; for a multirun, each swept
value once) and turns a failure into one ``error: key=value: …`` line that names the key, the
value and what is allowed, with a did-you-mean for keys that live elsewhere.  Everything that
composes is then checked by :func:`residual_exp.validate.validate` inside the job.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Sequence

# flags after which the command line is Hydra's business (help, info, config printing, paths)
_HYDRA_FLAGS = {"-m", "--multirun"}
MAX_COMPOSITIONS = 64


def _variants(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists to compose: the first value of every sweep, then each other swept
    value once (a bad value anywhere in a sweep is found before the sweep is launched)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            values.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            values.append([o.input_line])
    first = [v[0] for v in values]
    out = [first]
    for i, vs in enumerate(values):
        for v in vs[1:]:
            out.append(first[:i] + [v] + first[i + 1:])
    return out[:MAX_COMPOSITIONS]


def _value(key: str, overrides: Sequence[str]) -> str:
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            return v
    return "?"


def _schema_fields(key: str, composed_task: str | None, composed_analysis: str | None = None) -> tuple[str, list[str]]:
    """``(node name, its keys)`` of the node that should hold ``key``."""
    import dataclasses
    import typing

    from .config import Config
    from .validate import _analysis_schemas, _field_schema, _task_schemas
    parts = key.split(".")[:-1]
    schema, name = Config, "the config"
    for i, p in enumerate(parts):
        if p == "task" and i == 0 and composed_task in _task_schemas():
            schema, name = _task_schemas()[composed_task], f"task ({composed_task})"
            continue
        if p == "analysis" and i == 0 and composed_analysis in _analysis_schemas():
            schema, name = _analysis_schemas()[composed_analysis], f"analysis ({composed_analysis})"
            continue
        hints = typing.get_type_hints(schema)
        sub = _field_schema(hints[p]) if p in hints else None
        if not isinstance(sub, type):
            return ".".join(parts[: i + 1]), []
        schema, name = sub, ".".join(parts[: i + 1])
    return name, [f.name for f in dataclasses.fields(schema)]


def _unknown_key(key: str, value: str, task: str | None, analysis: str | None = None) -> str:
    from .validate import moved_key
    node, fields = _schema_fields(key, task, analysis)
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, fields, n=1, cutoff=0.6)
    if close:
        hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?)"
    else:
        moved = moved_key(key)
        hint = f" (did you mean {moved}?)" if moved else ""
    keys = f"; the keys of {node} are: {', '.join(fields)}" if fields else ""
    return f"unknown key {key}{hint}: got {key}={value}{keys} (a '+' would only add a key nothing reads)"


def explain(e: BaseException, overrides: Sequence[str]) -> str:
    """One line for a Hydra composition error ``e`` of ``overrides``."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from .validate import _group_options, _one_of
    msg = str(e).strip()
    task = next((v for o in overrides for k, _, v in [o.partition("=")] if k == "task"), None)
    analysis = next((v for o in overrides for k, _, v in [o.partition("=")] if k == "analysis"), None)
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
    if isinstance(e, MissingConfigException) and m:
        group, name = m.groups()
        try:                                         # Hydra's own listing: also plugins' options (hydra/launcher)
            from hydra.core.global_hydra import GlobalHydra
            options = sorted(GlobalHydra.instance().config_loader().get_group_options(group))
        except Exception:
            options = _group_options(group) if (Path(__file__).parent / "conf" / group).is_dir() else []
        article = "an" if group[0] in "aeiou" else "a"
        return f"{group}={name}: not {article} {group} config; {_one_of(options)}" if options else msg.splitlines()[0]
    m = re.match(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        return _unknown_key(key, _value(key, overrides), task, analysis)
    m = re.match(r"Error merging override ([^=]+)=(.*)", msg)
    if m:
        key, value = m.groups()
        cause = str(e.__cause__).strip().splitlines()[0] if e.__cause__ else "cannot be merged"
        if "DatasetConfig" in cause:
            cause = (f"a dataset config is expected: select one with dataset@{key}=NAME "
                     f"({_one_of(_group_options('dataset'))})")
        return f"{key}={value}: {cause}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line ({' '.join(overrides)}): {msg.splitlines()[0]} (Hydra's override grammar)"
    return msg.splitlines()[0] if msg else type(e).__name__


def precheck(argv: Sequence[str]) -> list[str]:
    """The problems of composing ``argv`` (empty: it composes, or the command line is one that
    Hydra handles itself, e.g. ``--help``)."""
    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in argv):
        return []
    overrides = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith("hydra.")]
    if not overrides:
        return []
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from .config import CONF_MODULE, register_configs
    register_configs()                               # the schemas the task/model/... configs extend
    try:
        variants = _variants(overrides)
    except HydraException as e:
        return [explain(e, overrides)]
    problems: list[str] = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONF_MODULE, version_base="1.3"):
            for variant in variants:
                try:
                    cfg = compose("config", overrides=variant)
                except HydraException as e:
                    line = explain(e, variant)
                    if line not in problems:
                        problems.append(line)
                    continue
                from .validate import run_name_problem     # before Hydra creates a folder named after it
                line = run_name_problem(cfg)
                if line and line not in problems:
                    problems.append(line)
    finally:
        GlobalHydra.instance().clear()
    return problems


def output_dir_problem(argv: Sequence[str]) -> str | None:
    """``key=…: …`` when the folder Hydra will create for this command (``hydra.run.dir``, or
    ``hydra.sweep.dir`` with ``-m``) cannot be created or written: a file in its path, a read-only
    location.  Hydra itself would fail there with a traceback, before any of our code runs."""
    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in argv):
        return None
    multirun = any(a in _HYDRA_FLAGS for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf

        from .config import CONF_MODULE, register_configs
        register_configs()
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(CONF_MODULE, version_base="1.3"):
                first = _variants([o for o in overrides if not o.lstrip("+~").startswith("hydra/")])[0]
                cfg = compose("config", overrides=first, return_hydra_config=True)
                key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
                folder = OmegaConf.select(cfg, key)
        finally:
            GlobalHydra.instance().clear()
    except Exception:                    # anything else is for precheck / Hydra / validate to report
        return None
    from .errors import UserError, writable_dir
    try:
        writable_dir(str(folder), key)
    except UserError as e:
        return str(e)
    return None
