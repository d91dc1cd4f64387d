"""Config nodes of *other* group options (``model=NAME``, ``dataset=NAME``), composed by Hydra.

Analyses compare several models or datasets in one job (``analysis.models``,
``analysis.datasets``, ``analysis.reference``).  Their nodes are composed with Hydra's compose
API from the configs shipped in :data:`~residual_exp.config.CONF_MODULE` — exactly what
``model=NAME`` on the command line would give, schema-validated — then resolved against the
current job's ``paths`` and ``dataset`` (so ``${paths.data_dir}`` and ``${dataset.root}``
mean what they mean in the job).  Nothing here reads a YAML file itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from .config import CONF_MODULE


@contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's global state: the running app's, or one initialised on the package's configs."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_module(CONF_MODULE, version_base="1.3"):
            yield


def group_options(group: str) -> list[str]:
    """The option names of a config group (e.g. ``analysis`` → the four analyses)."""
    from hydra.core.global_hydra import GlobalHydra
    with _hydra():
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def group_node(group: str, name: str, cfg, overrides: dict | None = None) -> DictConfig:
    """The resolved ``group=name`` node (+ ``overrides``), as the command line would compose it."""
    from hydra import compose
    valid = group_options(group)
    if name not in valid:
        raise KeyError(f"{group}={name!r} is not a {group} config; valid: {', '.join(valid)}")
    with _hydra():
        node = compose("config", overrides=[f"{group}={name}"])[group]
    if overrides:
        node = OmegaConf.merge(node, overrides)
    paths = {k: v for k, v in OmegaConf.to_container(cfg.paths, resolve=False).items() if k != "output_dir"}
    scope = {"paths": paths, "dataset": OmegaConf.to_container(cfg.dataset, resolve=False)}
    scope[group] = OmegaConf.to_container(node, resolve=False)      # (replaces `dataset` for that group)
    scope = OmegaConf.create(scope)
    return OmegaConf.create(OmegaConf.to_container(scope, resolve=True)[group])


def entry_node(entry, group: str, cfg) -> tuple[str, DictConfig]:
    """``(label, node)`` of an analysis entry: a config name, or a dict ``{name: NAME,
    label: …, <keys of that group>…}`` overriding that config.  The current job's own node
    (with its command-line overrides) is used when the name is the current choice."""
    current = cfg[group]
    if isinstance(entry, (DictConfig, dict)):
        d = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        if "name" not in d:
            raise ValueError(f"analysis {group} entry {d} needs a 'name'")
        label = d.pop("label", None)
        extra = {k: v for k, v in d.items() if k != "name"}
        if d["name"] == current.name:
            node = OmegaConf.merge(current, extra)
        else:
            node = group_node(group, d["name"], cfg, extra)
        if label is None:
            label = d["name"] + (f"({','.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")
        return str(label), node
    name = str(entry)
    return name, (current if name == current.name else group_node(group, name, cfg))


def entry_nodes(entries, group: str, cfg) -> list[tuple[str, DictConfig]]:
    """:func:`entry_node` for every entry (the current node when there are none), labels made unique."""
    items = [entry_node(e, group, cfg) for e in (entries or [])] or [(cfg[group].name, cfg[group])]
    labels: list[str] = []
    for label, _ in items:
        n, cand = 2, label
        while cand in labels:
            cand, n = f"{label}#{n}", n + 1
        labels.append(cand)
    return list(zip(labels, [node for _, node in items]))
