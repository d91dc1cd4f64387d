"""Rules declared next to the schema fields they govern.

A schema field is written ``x: int = rule(30, ge=1)``: the default and what a value must
satisfy, side by side.  :func:`residual_exp.validate.validate` walks the schemas and applies
them; nothing else spells a range.  Keys of a rule (all optional):

``ge gt le lt``   numeric bounds (also on every item of a list with ``item=``)
``min_len``       a list needs at least that many items
``path``          ``"dir"`` / ``"file"``: a non-null value must name an existing one; ``"checkpoint"``:
                  an existing, non-empty file; ``"folder"``: a folder, or a path not there yet (created)
                  — not a file
``options``       an open set a string must belong to: ``"group:<name>"`` (a config group's
                  options, e.g. ``group:model``) or ``"families"`` (registered backbone families)
``choices``       a fixed tuple of strings (for values that cannot be an enum, e.g. Lightning's
                  ``32-true``)
``item``          a dict of these keys applied to every item of a list
``free``          ``True``: a free dict (anything goes inside: ``params``)
``schema_at``     with ``free``: the sibling key (e.g. ``spec.params``) that may name, as an import
                  path, a schema the dict is checked against (a dataset's own ``params``)
``entry``         ``"model"`` / ``"dataset"``: a list item may also be a dict ``{name: NAME, label: …,
                  <keys of that group's schema>}`` (the analyses' ``models`` / ``datasets``)
``what``          the wording of the requirement, replacing the generated one

Cross-field rules are a ``check(node, root, bad)`` static method of the schema class, declared
right after its fields: ``node`` is the resolved node, ``root`` the whole config, and
``bad(key, value, what)`` reports one problem (``key`` relative to the node).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

from omegaconf import DictConfig, ListConfig

RULE_KEYS = frozenset({"ge", "gt", "le", "lt", "min_len", "path", "options", "choices", "item", "free", "what",
                       "entry", "schema_at"})


def rule(default: Any = dataclasses.MISSING, *, factory=None, **rules) -> Any:
    """A dataclass field with a default (or ``factory``) and the rules of :mod:`this module`."""
    unknown = set(rules) - RULE_KEYS
    if unknown:
        raise TypeError(f"unknown rule key(s) {sorted(unknown)}; known: {sorted(RULE_KEYS)}")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


def rules_of(f: dataclasses.Field) -> dict:
    return dict(f.metadata)


def fmt(v: Any) -> str:
    """A value as it would be written on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return str(v) if v and v.strip() == v else repr(str(v))
    if isinstance(v, (list, tuple, ListConfig)):
        return "[" + ",".join(fmt(x) for x in v) + "]"
    if isinstance(v, (dict, DictConfig)):
        return "{" + ",".join(f"{k}:{fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def one_of(allowed, null: bool = False) -> str:
    return "must be " + ("null or " if null else "") + "one of " + " | ".join(map(str, allowed))


BOUNDS = {"ge": ("≥", operator.ge), "gt": (">", operator.gt), "le": ("≤", operator.le), "lt": ("<", operator.lt)}


def bounds_text(rules: dict, t: type) -> str:
    """`` ≥ 1``, `` in (0, 1]`` (numbers), `` ≥ 0 and < 2**32`` (integers)."""
    lo = next(((k, rules[k]) for k in ("ge", "gt") if k in rules), None)
    hi = next(((k, rules[k]) for k in ("le", "lt") if k in rules), None)
    text = lambda kv: f"{BOUNDS[kv[0]][0]} {'2**32' if kv[1] == 2 ** 32 else kv[1]}"
    if lo and hi:
        if t is int:
            return f" {text(lo)} and {text(hi)}"
        return f" in {'[' if lo[0] == 'ge' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == 'le' else ')'}"
    return "".join(f" {text(b)}" for b in (lo, hi) if b)
