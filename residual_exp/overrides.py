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

import re
from contextlib import contextmanager
from typing import Iterator, Sequence

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


def searchpath(argv: Sequence[str]) -> tuple[str, ...]:
    """The folders of a ``hydra.searchpath=[…]`` on the command line (empty: none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    given = [a for a in argv if a.startswith("hydra.searchpath=")]
    return tuple(OverridesParser.create().parse_overrides(given[-1:])[0].value()) if given else ()


def _value(key: str, overrides: Sequence[str]) -> str:
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            return v
    return "?"


def _fields(key: str, task: str | None, analysis: str | None) -> list[str]:
    """The schema keys next to ``key`` (its parent node's fields; [] when no schema is known)."""
    import dataclasses

    from .config import node_schema
    schema = node_schema(key.rsplit(".", 1)[0] if "." in key else "", task, analysis)
    return [f.name for f in dataclasses.fields(schema)] if schema else []


def _unknown_key(key: str, value: str, task: str | None, analysis: str | None = None) -> str:
    from .config import suggestion
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    fields = _fields(key, task, analysis)
    node = {"": "the config", "task": f"task ({task})", "analysis": f"analysis ({analysis})"}.get(parent, parent)
    hint = suggestion(key, fields)
    keys = f"; the keys of {node} are: {', '.join(fields)}" if fields else ""
    return f"unknown key {key}{hint}: got {key}={value}{keys} (a '+' would only add a key nothing reads)"


def explain(e: BaseException, overrides: Sequence[str]) -> str:
    """One line for a Hydra composition error ``e`` of ``overrides``."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from .validate import group_options, one_of
    msg = str(e).strip()
    task = next((v for o in overrides for k, _, v in [o.partition("=")] if k == "task"), None)
    analysis = next((v for o in overrides for k, _, v in [o.partition("=")] if k == "analysis"), None)
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
    if isinstance(e, MissingConfigException) and m:
        group, name = m.groups()
        options = group_options(group)               # plugins' options too
        article = "an" if group[0] in "aeio" else "a"          # "an evr", "a units"
        return f"{group}={name}: not {article} {group} config; {one_of(options)}" if options else msg.splitlines()[0]
    m = re.match(r"In '([^']+)': \w+ raised while composing config:\nKey '[^']+' not in '\w+'\n\s*full_key: (\S+)", msg)
    if m:                                            # a YAML file (a plugin's) with a key no schema has
        from .config import suggestion
        path, key = m.groups()
        return f"{path}.yaml: unknown key {key}{suggestion(key, _fields(key, task, analysis))}"
    m = re.match(r"Could not append to config\. An item is already at '([^']+)'", msg)
    if m:                                            # "+key=v" for a key the config has
        key = m.group(1)
        return f"+{key}={_value(key, overrides)}: {key} is already in the config: set it without '+' ({key}=…)"
    m = re.match(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        return _unknown_key(key, _value(key, overrides), task, analysis)
    m = re.match(r"Error merging override ([^=]+)=(.*)", msg)
    if m:
        key, value = m.groups()
        cause = str(e.__cause__).strip().splitlines()[0] if e.__cause__ else "cannot be merged"
        allowed = re.match(r"Invalid value '.*', expected one of \[(.*)\]", cause)
        if allowed:                                  # an enum field: our wording
            cause = one_of(allowed.group(1).split(", "))
        if "DatasetConfig" in cause:
            cause = (f"a dataset config is expected: select one with dataset@{key}=NAME "
                     f"({one_of(group_options('dataset'))})")
        return f"{key}={value}: {cause}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line ({' '.join(overrides)}): {msg.splitlines()[0]} (Hydra's override grammar)"
    return msg.splitlines()[0] if msg else type(e).__name__


def _culprit(e: BaseException, overrides: Sequence[str]) -> str | None:
    """The override a composition error ``e`` is about (None: not one override's fault)."""
    msg = str(e)
    m = (re.search(r"Could not find '([^']+)/[^'/]+'", msg) or re.match(r"Could not override '([^']+)'", msg)
         or re.match(r"Error merging override ([^=]+)=", msg)
         or re.match(r"Could not append to config\. An item is already at '([^']+)'", msg))
    if not m:
        return None
    key = m.group(1)
    for o in overrides:
        k = o.lstrip("+~").partition("=")[0]            # dataset@pca.reference=NAME: group dataset
        if key in (k, k.split("@")[0]):
            return o
    return None


def problems_of(overrides: Sequence[str]) -> list[str]:
    """Every problem of one override list: each override Hydra cannot compose (our wording; the
    composition is retried without it), then — if any — the validation problems of what remains,
    so that a command line with several mistakes hears of all of them at once."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import open_dict

    from .validate import ConfigError, validate
    from .catalog.specs import SEARCHPATH
    problems, rest = [], list(overrides)
    while True:
        try:
            cfg = compose("config", overrides=rest, return_hydra_config=True)
        except HydraException as e:
            problems.append(explain(e, rest))
            culprit = _culprit(e, rest)
            if culprit is None:
                return problems
            rest.remove(culprit)
            continue
        from .config import run_name_problem       # before Hydra creates a folder named after it
        line = run_name_problem(cfg)
        problems += [line] if line and line not in problems else []
        if problems:
            token = SEARCHPATH.set(tuple(cfg.hydra.searchpath or ()))
            with open_dict(cfg):
                del cfg["hydra"]
            try:
                validate(cfg)
            except ConfigError as e:
                problems += [p for p in e.problems if p not in problems]
            finally:
                SEARCHPATH.reset(token)
        return problems


def precheck(argv: Sequence[str]) -> list[str]:
    """The problems of composing ``argv`` (empty: it composes, or the command line is one that
    Hydra handles itself, e.g. ``--help``)."""
    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in argv):
        return []
    overrides = [a for a in argv if not a.startswith("-") and (a.startswith("hydra.searchpath=")
                                                               or not a.lstrip("+~").startswith("hydra."))]
    if not overrides:
        return []
    from hydra.errors import HydraException

    from .config import register_configs
    register_configs()                               # the schemas the task/model/... configs extend
    try:
        variants = _variants(overrides)
    except HydraException as e:
        return [explain(e, overrides)]
    problems: list[str] = []
    with _fresh_hydra():
        for variant in variants:
            problems += [p for p in problems_of(variant) if p not in problems]
    return problems


@contextmanager
def _fresh_hydra() -> Iterator[None]:
    """Hydra initialised on the package's configs for the checks that run before the app, and
    cleared again (the app initialises its own)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from .config import CONF_MODULE
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONF_MODULE, version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()


def output_dir_problem(argv: Sequence[str]) -> str | None:
    """``key=…: …`` when the folder Hydra will create for this command (``hydra.run.dir``, or
    ``hydra.sweep.dir`` with ``-m``) cannot be created or written: a file in its path, a read-only
    location.  Hydra itself would fail there with a traceback, before any of our code runs."""
    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in argv):
        return None
    multirun = any(a in _HYDRA_FLAGS for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        from hydra import compose
        from omegaconf import OmegaConf

        from .config import register_configs
        register_configs()
        with _fresh_hydra():
            first = _variants([o for o in overrides if not o.lstrip("+~").startswith("hydra/")])[0]
            cfg = compose("config", overrides=first, return_hydra_config=True)
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            folder = OmegaConf.select(cfg, key)
    except Exception:                    # anything else is for precheck / Hydra / validate to report
        return None
    from .errors import UserError, writable_dir
    try:
        writable_dir(str(folder), key)
    except UserError as e:
        return str(e)
    return None
