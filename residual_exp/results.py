"""What a finished job leaves behind, written and read in one place.

* ``results.json`` — a list of records, one for the zero-shot ``base`` and one for the trained
  method, each with at least :data:`RESULT_KEYS` (:func:`write_results`, :func:`read_results`);
* ``lambda.safetensors`` — the trained λ (:func:`save_lambda`, :func:`load_lambda`);
* ``config.json`` — the job's resolved config (:func:`write_run_config`, :func:`read_run_config`),
  which later tasks (``text_spans`` with ``analysis.run_dir``, export) read instead of Hydra's
  YAML files;
* the console table of the records (:func:`results_table`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path, atomic_write_text
from .tables import text_table

log = logging.getLogger(__name__)

RESULT_KEYS = ("model", "dataset", "method", "trainable_params", "val_accuracy", "test_accuracy",
               "zero_shot_val_accuracy", "zero_shot_test_accuracy", "seed", "wall_seconds")
CONVENTION_KEYS = ("units_convention", "classifier", "evr_rule", "compat", "cache_layout")   # FIDELITY.md
LAMBDA_FILE = "lambda.safetensors"
RUN_CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"


class ResultsFileError(ValueError):
    """A results file that is not a list of result records (names the file)."""


# --- results.json -------------------------------------------------------------------------
def write_results(records: list[dict], run_dir: Path) -> Path:
    path = Path(run_dir) / "results.json"
    atomic_write_text(path, json.dumps(records, indent=2))
    return path


def read_results(path: Path) -> list[dict]:
    """The records of a ``results.json``; :class:`ResultsFileError` naming the file when it is
    unreadable, not JSON, or not a list of records (``[]``, ``null``, a foreign JSON file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ResultsFileError(f"{path}: unreadable results file ({type(e).__name__}: {e})") from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ResultsFileError(f"{path}: not a list of result records (found {type(data).__name__}"
                               f"{' (empty)' if data == [] else ''})")
    return data


def missing_keys(record: dict) -> list[str]:
    return [k for k in RESULT_KEYS if k not in record]


def _fmt(key: str, v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if key == "wall_seconds" else f"{v:.4f}"
    return "" if v is None else str(v)


# --- flags: results that look fine and are not ----------------------------------------------------------
BELOW_ZERO_SHOT_MARGIN = 0.02     # a trained method this far below zero-shot on val did not train


def result_flags(rec: dict, num_classes: int | None = None, margin: float = BELOW_ZERO_SHOT_MARGIN) -> list[str]:
    """Why a record should be checked before it is believed (``flags`` of results.json, the results table and
    the report read them): a trained method below zero-shot on val, any accuracy at or below chance
    (1 / ``num_classes``), an LR finder pick that was not used.  Empty when nothing is suspicious."""
    flags = []
    val, zs_val = rec.get("val_accuracy"), rec.get("zero_shot_val_accuracy")
    if rec.get("method") != "base" and _num(val) and _num(zs_val) and val < zs_val - margin:
        flags.append(f"below zero-shot: val {val:.4f} < zero-shot {zs_val:.4f} (best epoch {rec.get('best_epoch')} of "
                     f"{rec.get('epochs')}); check method.lr, method.init and trainer.max_epochs")
    if num_classes and num_classes > 1:
        chance = 1.0 / num_classes
        for key, what in (("test_accuracy", "test"), ("zero_shot_test_accuracy", "zero-shot test")):
            acc = rec.get(key)
            if (key == "zero_shot_test_accuracy") != (rec.get("method") == "base"):
                continue                          # zero-shot said once, on the base record (whose test is zero-shot)
            if _num(acc) and acc <= chance:
                flags.append(f"at or below chance: {what} {acc:.4f} ≤ 1/{num_classes} = {chance:.4f}; "
                             + ("the frozen model does not separate these classes (check the class names and "
                                "prompts)" if what.startswith("zero") else "the method did not learn"))
    kept = (rec.get("lr_finder") or {}).get("kept_preset")
    if kept:
        flags.append(f"LR finder not used: {kept}")
    return flags


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TABLE = [("model", "model"), ("dataset", "dataset"), ("method", "method"), ("params", "trainable_params"),
          ("zero-shot test", "zero_shot_test_accuracy"), ("val", "val_accuracy"), ("test", "test_accuracy"),
          ("seconds", "wall_seconds")]


def results_table(records: list[dict]) -> str:
    """The aligned console table of a job's records; a flagged record (:func:`result_flags`) is marked ``!``
    in a last column and its reasons follow the table."""
    flagged = [r for r in records if r.get("flags")]
    rows = [dict(r, _check="!" if r.get("flags") else "") for r in records] if flagged else records
    cols = _TABLE + ([("check", "_check")] if flagged else [])
    table = text_table(rows, [k for _, k in cols], [h for h, _ in cols], fmt=_fmt, right_from=3)
    notes = [f"! {r.get('method')} ({r.get('model')}, {r.get('dataset')}): {f}" for r in flagged for f in r["flags"]]
    return "\n".join([table, *notes])


# --- config.json ----------------------------------------------------------------------------
def write_run_config(config: dict, run_dir: Path) -> Path:
    path = Path(run_dir) / RUN_CONFIG_FILE
    atomic_write_text(path, json.dumps(config, indent=1, default=str))
    return path


def read_json_object(path: Path, what: str, missing: str, error: type = None) -> dict:
    """The JSON object in ``path``, or ``error`` (default :class:`ResultsFileError`, a user error) saying
    ``missing`` when there is no such file, or that it is not a readable ``what``."""
    error = error or ResultsFileError
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a {what} (a JSON {type(data).__name__}, not an object)")
    return data


def read_run_config(run_dir: Path) -> dict:
    return read_json_object(Path(run_dir) / RUN_CONFIG_FILE, "run config",
                            f"{run_dir}: not a run folder (no {RUN_CONFIG_FILE}; a run dir of "
                            "`python -m residual_exp` task=train holds it)")


def write_classes(classnames, templates, run_dir: Path) -> Path:
    """The class names (label order) and prompt templates the run's classifier was built from."""
    path = Path(run_dir) / CLASSES_FILE
    atomic_write_text(path, json.dumps({"classnames": list(classnames), "templates": list(templates)}, indent=1))
    return path


def read_classes(run_dir: Path) -> dict:
    path = Path(run_dir) / CLASSES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResultsFileError(f"{path}: unreadable class list ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("classnames"), list):
        raise ResultsFileError(f"{path}: not a class list")
    return data


# --- lambda.safetensors ---------------------------------------------------------------------
@dataclass
class TrainedLambda:
    """The trained parameters of one run.

    ``lam``: ``[S, K]`` for the spectral methods (pruned / untrained entries hold
    ``dropped_value``; ``mask`` ``[S, K]`` says which were trained), ``[S]`` for
    ``residual_coarse`` (``mask`` None); ``units``: the S unit names (``["output"]`` for
    ``spectral_adapter``); ``tensors``: everything in the file (``linear_adapter`` keeps its
    weight and bias here, with ``lam`` None).
    """
    method: str
    units: list[str]
    lam: torch.Tensor | None
    mask: torch.Tensor | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def save_lambda(adapter, layout, path: Path, method: str) -> Path | None:
    """Write ``adapter``'s trained parameters (the format of :class:`TrainedLambda`) atomically.

    ``finetune`` writes nothing here (the tower is in ``checkpoints/best.ckpt``).
    """
    from safetensors.torch import save_file
    if method == "finetune":
        return None
    meta = {"method": method}
    if hasattr(adapter, "lambdas"):
        tensors = {"lambda": adapter.lambdas(), "mask": adapter.mask}
        meta["units"] = json.dumps(["output"] if adapter.from_feature
                                   else [layout.names[i] for i in adapter.selected.tolist()])
    elif hasattr(adapter, "selected"):
        tensors = {"lambda": adapter.lam}
        meta["units"] = json.dumps([layout.names[i] for i in adapter.selected.tolist()])
    else:
        tensors = dict(adapter.state_dict())
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_lambda(path: Path) -> TrainedLambda:
    """Read a file written by :func:`save_lambda` (a run dir is accepted too)."""
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        path = path / LAMBDA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {LAMBDA_FILE} at {path} (only runs of the spectral / residual "
                                "methods and linear_adapter write one)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ResultsFileError(f"{path}: unreadable λ file ({type(e).__name__}: {e})") from e
    lam = tensors.get("lambda")
    units = json.loads(meta.get("units", "[]"))
    if lam is not None and len(units) != lam.shape[0]:
        units = [f"unit {i}" for i in range(lam.shape[0])]
    mask = tensors.get("mask")
    return TrainedLambda(meta.get("method", "?"), units, lam, mask.bool() if mask is not None else None,
                         tensors, meta)
