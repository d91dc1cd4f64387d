"""What a finished job leaves behind, written and read in one place.

* ``results.json`` — a list of records, one for the zero-shot ``base`` and one for the trained
  method, each with at least :data:`RESULT_KEYS` (:func:`write_results`, :func:`read_results`);
* ``lambda.safetensors`` — the trained λ (:func:`save_lambda`, :func:`load_lambda`);
* ``history.csv`` — one row per training epoch (:data:`HISTORY_COLUMNS`; :func:`write_history`,
  :func:`read_history`), rewritten atomically after every epoch;
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
from .catalog import ActsOn, needs_bases, spec_of
from .errors import UserError
from .tables import text_table

log = logging.getLogger(__name__)

RESULT_KEYS = ("model", "dataset", "method", "trainable_params", "val_accuracy", "test_accuracy",
               "zero_shot_val_accuracy", "zero_shot_test_accuracy", "seed", "wall_seconds")
CONVENTION_KEYS = ("units_convention", "classifier", "evr_rule", "compat", "cache_layout")   # FIDELITY.md
# what a trained record says about its setting (besides the method); absent in older records
SETTING_KEYS = ("units", "rank", "pca_reference", "init", "lr", "max_epochs")
BELOW_ZERO_SHOT_MARGIN = 0.02        # a trained method this far below zero-shot on val is flagged
HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy")
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


def setting_of(config: dict) -> dict:
    """The setting (:data:`SETTING_KEYS`) a trained job's resolved config (``config.json``) implies:
    ``units`` (the units option; None for output methods), ``rank`` (``evr=0.9``, ``k=16`` or ``all``
    for methods with principal components, else None), ``pca_reference`` (:func:`pca_reference`;
    None for methods without bases), ``init``, ``lr``, ``max_epochs``.  Configs written before the
    ``units`` / ``rank`` groups existed carry them as ``method.units`` / ``method.evr`` / ``method.k``."""
    m, trainer = config.get("method") or {}, config.get("trainer") or {}
    units_node, rank_node = config.get("units") or {}, config.get("rank") or {"evr": m.get("evr"), "k": m.get("k")}
    spec = method_spec(m)
    units = units_node.get("name") or (str(m["units"]).replace("+", "_") if m.get("units") else None)
    if spec is None or spec.acts_on == ActsOn.output:
        units = None
    rank = None
    if spec is not None and spec.needs_bases:          # λ per principal component: a rank applies
        rank = (f"evr={rank_node['evr']:g}" if rank_node.get("evr") is not None else
                f"k={rank_node['k']}" if rank_node.get("k") is not None else "all")
    uses_bases = spec is not None and needs_bases(m)
    return {"units": units, "rank": rank, "pca_reference": pca_reference(config.get("pca")) if uses_bases else None,
            "init": m.get("init"), "lr": m.get("lr"), "max_epochs": trainer.get("max_epochs")}


def method_spec(method: dict):
    """The spec of a saved ``method`` node (None when neither it nor its option file has one: a plugin
    method whose YAML is not on the search path any more)."""
    try:
        return spec_of("method", method) if method.get("name") else None
    except KeyError:
        return None


def pca_reference(pca: dict | None) -> str | None:
    """Which set the bases are fitted on: the reference dataset's name (``imagenet``; ``:split``
    appended when not its train split), ``reference`` (the target's own reference split),
    ``target`` (its train split) or ``target:<split>``."""
    if not pca:
        return None
    ref, split = pca.get("reference"), pca.get("split")
    if isinstance(ref, dict) and ref.get("name"):
        return ref["name"] if split == "train" else f"{ref['name']}:{split}"
    return {"reference": "reference", "train": "target"}.get(split, f"target:{split}")


def missing_keys(record: dict) -> list[str]:
    return [k for k in RESULT_KEYS if k not in record]


def _fmt(key: str, v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if key == "wall_seconds" else f"{v:.4f}"
    return "" if v is None else str(v)


# --- flags: results that look fine and are not ----------------------------------------------------------


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


# --- history.csv ----------------------------------------------------------------------------
def write_history(rows: list[dict], path: Path) -> Path:
    """``rows`` (dicts keyed by :data:`HISTORY_COLUMNS`; None → empty cell) as CSV, atomically."""
    import csv
    import io
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def read_history(run_dir: Path) -> list[dict] | None:
    """The rows of ``<run_dir>/history.csv`` (numbers as int / float, empty cells None), or None
    when the run has none (runs written before it existed, zero-shot-only jobs)."""
    import csv
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ResultsFileError(f"{path}: unreadable history ({type(e).__name__}: {e})") from e
    if rows and "epoch" not in rows[0]:
        raise ResultsFileError(f"{path}: not a training history (no 'epoch' column)")
    try:
        return [{k: (None if v in ("", None) else int(v) if k == "epoch" else float(v))
                 for k, v in r.items() if isinstance(k, str)} for r in rows]
    except ValueError as e:
        raise ResultsFileError(f"{path}: not a training history ({e})") from e


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


def package_version() -> str:
    """This package's installed version ("unknown" when it is run from a folder without installing)."""
    try:
        from importlib.metadata import version
        return version("residual_exp")
    except Exception:
        return "unknown"


def trained_dir(run_dir: Path) -> Path:
    """Where the run's checkpoint lives (a resumed run points at the run that computed it)."""
    if (run_dir / "checkpoints" / "best.ckpt").is_file():
        return run_dir
    resumed = run_dir / "resumed.json"
    if resumed.is_file():
        origin = Path(json.loads(resumed.read_text()).get("from_run_dir") or "")
        if (origin / "checkpoints" / "best.ckpt").is_file():
            return origin
    raise UserError(f"run_dir={str(run_dir)!r}: no checkpoints/best.ckpt (and no resumed.json pointing at a "
                    "run that has one): export needs a run of task=train with a trained method")


def read_training_run(run_dir: Path) -> tuple[dict, dict, dict]:
    """``(config, classes, the method's record)`` of a ``task=train`` run folder, or a user error saying
    why the folder is not one (empty, another task's, a run that failed before writing its results)."""
    what = f"run_dir={run_dir}"
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{what}: not a run folder of task=train (no config.json; a training run writes "
                        "config.json, classes.json and results.json)")
    try:
        conf = read_run_config(run_dir)
        method = conf["method"]["name"]
        for key in ("model", "dataset", "conventions", "cache", "seed"):
            conf[key]
    except (KeyError, TypeError) as e:
        raise UserError(f"{what}: config.json is not the config of a training run (no {e})") from None
    if conf.get("task", {}).get("name", "train") != "train":
        raise UserError(f"{what}: a run of task={conf['task']['name']}, not a training run")
    if not (run_dir / "results.json").is_file():
        raise UserError(f"{what}: no results.json: the run did not finish (train it again, or export another run)")
    records = read_results(run_dir / "results.json")
    rec = next((r for r in records if r.get("method") == method), None)
    if rec is None:
        raise UserError(f"{what}: results.json has no record of its method {method}")
    return conf, read_classes(run_dir), rec
