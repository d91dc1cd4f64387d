"""Which residual units a method reweights: the ``units`` config group resolved on a unit layout.

A selection starts from every unit of the layout (:class:`~.units.UnitLayout`, in its documented
order) and keeps, in turn, the units of ``units.kinds`` (when given), those in the layer range
``units.layers = [first, last]`` (when given), those whose name matches a pattern of
``units.include`` (glob, e.g. ``L11H*``, ``L10.mlp``; when given), then drops those matching
``units.exclude``.  ``units=coarse_top`` instead keeps the top ``units.fraction`` of the heads that a
``task=analysis analysis=coarse_selection`` run ranked by ``units.score`` (its ``head_scores.csv``),
with the analysis's own rounding (:func:`keep_count`).  Output methods take ``units=output``: no unit.

Torch-free: validation resolves a selection before anything is built whenever the model preset
states its shape (``model.spec``); otherwise the train task resolves it right after building the
backbone, before any encoding.  Either way a selection that matches nothing is a
:class:`~residual_exp.errors.ConfigError` naming the key and what the layout holds.
"""
from __future__ import annotations

import csv
import math
from fnmatch import fnmatchcase
from pathlib import Path

from ..catalog import Selection, UnitKind
from ..catalog.fields import fmt
from ..errors import ConfigError
from .units import UnitLayout

SCORES_FILE = "head_scores.csv"          # written by task=analysis analysis=coarse_selection


def keep_count(num_heads: int, fraction: float) -> int:
    """Heads kept for ``fraction`` of ``num_heads``: rounded half up, at least 1, at most all."""
    return min(num_heads, max(1, int(math.floor(float(fraction) * num_heads + 0.5))))


def ranking_problem(run_dir: str | Path, score: str) -> str | None:
    """Why ``run_dir`` cannot feed ``units=coarse_top`` with ``score`` (None: it can)."""
    path = Path(run_dir).expanduser() / SCORES_FILE
    if not path.is_file():
        return (f"not the run dir of a coarse_selection analysis (no {SCORES_FILE}; run "
                "python -m residual_exp task=analysis analysis=coarse_selection and pass its run dir)")
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if f"{score}_rank" not in header:
        ranked = sorted(c[:-len("_rank")] for c in header if c.endswith("_rank"))
        return (f"that analysis did not rank heads by {score} (it ranked by {' | '.join(ranked) or 'nothing'}): "
                f"set units.score to one of those or rerun the analysis with analysis.scores=[{score}]")
    return None


def coarse_top(run_dir: str | Path, score: str, fraction: float, model: str | None) -> list[str]:
    """The names of the top heads of the analysis's ``score`` ranking for ``model`` (its label there;
    None: the analysis's only model)."""
    with open(Path(run_dir).expanduser() / SCORES_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    models = sorted({r["model"] for r in rows})
    if model is None and len(models) == 1:
        model = models[0]
    if model not in models:
        raise ConfigError([f"units.run_dir={run_dir}: that analysis ranked the heads of {' | '.join(models) or 'no model'}, "
                           f"not of model={model}"])
    ranked = sorted((r for r in rows if r["model"] == model), key=lambda r: int(r[f"{score}_rank"]))
    return [r["unit"] for r in ranked[:keep_count(len(ranked), fraction)]]


def select(units, layout: UnitLayout, model: str | None = None) -> list[int]:
    """Indices (in layout order) of the units ``units`` (a ``units`` config node) selects."""
    by = units.by
    if by == Selection.output:
        return []
    if by == Selection.coarse_top:
        wanted = set(coarse_top(units.run_dir, units.score, units.fraction, model))
        missing = sorted(wanted - set(layout.names))
        if missing:
            raise ConfigError([f"units.run_dir={units.run_dir}: ranked heads {', '.join(missing[:4])} are not units of "
                               f"this model ({_describe(layout)}): the analysis was run on another model"])
        idx = [i for i, n in enumerate(layout.names) if n in wanted]
    else:
        idx = list(range(len(layout)))
        if units.kinds:
            idx = [i for i in idx if layout.kinds[i] in set(units.kinds)]
        if units.layers is not None:
            lo, hi = units.layers
            idx = [i for i in idx if lo <= layout.layers[i] <= hi]
        if units.include:
            idx = [i for i in idx if any(fnmatchcase(layout.names[i], p) for p in units.include)]
    idx = [i for i in idx if not any(fnmatchcase(layout.names[i], p) for p in units.exclude)]
    if not idx:
        raise ConfigError([f"units={units.name}: {_what(units)} selects no unit of this model ({_describe(layout)})"])
    return idx


def _what(units) -> str:
    parts = [f"units.{k}={fmt(units[k])}" for k in ("kinds", "layers", "include", "exclude")
             if units[k] not in (None, []) and len(units[k])]
    return ", ".join(parts) or "it"


def _describe(layout: UnitLayout) -> str:
    counts = layout.counts()
    return (f"{layout.num_layers} layers × {layout.num_heads} heads; units {layout.names[0]}, {layout.names[1]} … "
            f"{layout.names[-1]}; kinds " + ", ".join(f"{k} {n}" for k, n in counts.items() if n))


def preset_layout(model_spec, centred: bool) -> UnitLayout | None:
    """The layout of a preset that states its shape (None: only the built model knows it)."""
    if model_spec is None or model_spec.layers is None or model_spec.heads is None:
        return None
    return UnitLayout.vit(int(model_spec.layers), int(model_spec.heads), constants=centred)


def requirement_problem(units) -> tuple[str, object, str] | None:
    """``(key, value, what)`` when a ``units`` node lacks what its ``by`` needs (None: complete)."""
    by = units.by
    if by == Selection.output:
        return ("kinds", list(units.kinds), "units=output selects no unit: leave kinds empty") if units.kinds else None
    if by == Selection.layers and units.layers is None:
        return ("layers", None, "units=layers needs the layer range: units.layers=[first,last] (e.g. [8,11])")
    if units.layers is not None and (len(units.layers) != 2 or units.layers[0] > units.layers[1]):
        return ("layers", list(units.layers), "must be [first, last] with first ≤ last (layers count from 0)")
    if by == Selection.names and not units.include:
        return ("include", [], "units=names needs glob patterns over unit names: units.include=[L11H*,L10.mlp]")
    if by == Selection.coarse_top:
        if not units.run_dir:
            return ("run_dir", None, "units=coarse_top needs units.run_dir=<the run dir of a coarse_selection analysis>")
        why = ranking_problem(units.run_dir, units.score)
        if why:
            return ("run_dir", units.run_dir, why)
    bad = [k for k in units.kinds if k not in set(UnitKind)]
    return ("kinds", bad, f"must be unit kinds ({' | '.join(UnitKind)})") if bad else None
