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


_TABLE = [("model", "model"), ("dataset", "dataset"), ("method", "method"), ("params", "trainable_params"),
          ("zero-shot test", "zero_shot_test_accuracy"), ("val", "val_accuracy"), ("test", "test_accuracy"),
          ("seconds", "wall_seconds")]


def results_table(records: list[dict]) -> str:
    """The aligned console table of a job's records."""
    return text_table(records, [k for _, k in _TABLE], [h for h, _ in _TABLE], fmt=_fmt, right_from=3)


# --- config.json ----------------------------------------------------------------------------
def write_run_config(config: dict, run_dir: Path) -> Path:
    path = Path(run_dir) / RUN_CONFIG_FILE
    atomic_write_text(path, json.dumps(config, indent=1, default=str))
    return path


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RUN_CONFIG_FILE} (a run dir of `python -m residual_exp` "
                                "task=train holds it)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResultsFileError(f"{path}: unreadable run config ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ResultsFileError(f"{path}: not a config object")
    return data


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
    """Write ``adapter``'s trained parameters (:meth:`~residual_exp.methods.base.Adapter.lambda_state`,
    the format of :class:`TrainedLambda`) atomically; None when the method has none to write
    (finetune: the tower is in ``checkpoints/best.ckpt``)."""
    from safetensors.torch import save_file
    state = adapter.lambda_state(layout)
    if state is None:
        return None
    tensors, units = state
    meta = {"method": method}
    if units:
        meta["units"] = json.dumps(units)
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
