"""Resumable jobs: a results store keyed by the resolved config.

Re-running a sweep (the same command, a new sweep dir, a requeued SLURM job, …) must skip
the cells that already finished, redo the ones that failed or were killed, and never take a
half-written result for a finished one.  The task registry (:mod:`residual_exp.tasks`) wraps
``task=train`` in :func:`resumable`, which

1. computes the **resume key** of the job (below) and looks for
   ``<paths.root_dir>/outputs/results/<key>.json``;
2. if that entry is complete (it parses, carries the same key, and holds a record with every
   field of :data:`~residual_exp.results.RESULT_KEYS` for ``base`` and for ``method.name``), copies
   it into the new run dir as ``results.json`` (with ``classes.json`` and, when the job has
   them, ``lambda.safetensors`` and ``history.csv``, all kept in ``results/artefacts/``), writes ``resumed.json``
   saying where it came from, prints the table and returns 0 without building a model;
3. otherwise runs the task and, only after it returned 0 and its ``results.json`` is
   complete, writes the store entry: artefacts first, then the JSON by an atomic rename.
   The JSON's presence is what marks a cell finished, so a job killed at any point leaves
   either no entry or a complete one.  (Caches have the same property, see ``cache.py``.)
   The entry records a SHA-256 of its records and the size and BLAKE2b checksum of each
   artefact; an entry that no longer matches them (or has none) is ignored with a warning
   naming it, and the job runs again.

``resume=false`` always recomputes (and refreshes the entry).

**Resume key** = the first 16 hex digits of SHA-1 over the canonical JSON of

* the composed config, resolved, **minus** :data:`EXCLUDED_KEYS` — keys that say *where* or
  *how visibly* a job runs, never *what* it computes:

  ==========================================  ================================================
  ``paths.root_dir``, ``paths.output_dir``,   run location; Hydra's ``hydra.*`` node is not
  ``paths.cache_dir``, ``cache.dir``          part of the job config at all
  ``cache.enabled``, ``cache.memory_budget_gb``  whether encodings are kept / streamed from disk
  ``logger``                                  W&B / CSV / none
  ``trainer.progress_bar``                    console output
  ``trainer.num_workers``, ``dataset.num_workers``,  loader processes (order is seeded, not
  ``trainer.cpu_threads``                     worker-dependent), torch CPU threads
  ``device``, ``trainer.accelerator``         CPU vs GPU (same experiment; float round-off
                                              may differ: use ``resume=false`` to recompute)
  ``run_name``, ``resume``, ``sweep_dir``,    naming, this flag, and other tasks' settings
  ``analysis``
  ==========================================  ================================================

  ``dataset.root`` and ``paths.data_dir`` are kept, as absolute paths (other data folder →
  other key); everything else (model, dataset and its sizes, method, pca, trainer epochs /
  patience / batch / lr, cache dtype, seed, task) is kept;
* ``_model``: the weights identity of :func:`~residual_exp.encode.model_identity` (a
  fingerprint of local weight files and of the embedded tiny CLIP checkpoint, so retrained
  weights give new keys);
* ``_format`` (:data:`RESULTS_FORMAT`) and the package version.

Code changes that do not bump either are *not* in the key: after changing how a method
trains, pass ``resume=false`` (or delete ``outputs/results``).  The key and the exact spec
are written to every fresh run dir as ``result_key.json``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_path, atomic_write_text
from .cache import file_record, spec_hash
from .encode import model_identity
from .results import (CLASSES_FILE, HISTORY_FILE, LAMBDA_FILE, package_version, RESULT_KEYS, ResultsFileError, read_results, results_table,
                      write_results, write_run_config)
from .runtime import run_dir_of

log = logging.getLogger(__name__)

RESULTS_FORMAT = 1
EXCLUDED_KEYS = (
    "paths.root_dir", "paths.output_dir", "paths.cache_dir",
    "cache.dir", "cache.enabled", "cache.memory_budget_gb", "cache.verify",
    "logger",
    "trainer.progress_bar", "trainer.num_workers", "trainer.cpu_threads", "dataset.num_workers",
    "device", "trainer.accelerator",
    "run_name", "resume", "sweep_dir", "analysis", "run_dir", "out", "model_dir", "inputs",
    "pca.reference.num_workers",
    "hydra",
)
ABSOLUTE_PATH_KEYS = ("dataset.root", "paths.data_dir")
ARTEFACT_DIR = "artefacts"                # store/artefacts/<key>.<name>
ARTEFACTS = (LAMBDA_FILE, CLASSES_FILE, HISTORY_FILE)   # small per-run files kept with the entry (λ, classes, curves)


# --- the key ------------------------------------------------------------------------------
def results_dir(cfg) -> Path:
    """Where finished results are stored: ``<paths.root_dir>/outputs/results``."""
    return Path(str(cfg.paths.root_dir)).expanduser().resolve() / "outputs" / "results"


def resume_spec(cfg: DictConfig) -> dict:
    """The resolved config minus :data:`EXCLUDED_KEYS`, plus weights identity and format."""
    raw = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    # run-location values may hold Hydra-only interpolations (${hydra:runtime.output_dir}):
    # blank every excluded key before resolving, keeping those that others interpolate
    for key in ("paths.output_dir", "hydra", "logger", "analysis", "run_name"):
        _pop(raw, key)
    spec = OmegaConf.to_container(raw, resolve=True)
    for key in EXCLUDED_KEYS:
        _pop_dict(spec, key)
    for key in ABSOLUTE_PATH_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = spec.get(parent) if parent else spec
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = str(Path(node[leaf]).expanduser().resolve())
    spec["_model"] = model_identity(cfg.model, cfg.seed)
    data = _data_identity(cfg.dataset)
    if data is not None:                       # a user's folder: what it holds, not only where it is
        spec["_data"] = data
    spec["_format"] = RESULTS_FORMAT
    spec["_version"] = package_version()
    return spec


def _data_identity(ds_cfg) -> str | None:
    """The identity of a dataset whose content is the user's (``image_folder``: a fingerprint of the
    folder), None for the others (their key stays what it was)."""
    from .data.registry import spec_function
    identity = spec_function(ds_cfg, "identity")
    return identity(ds_cfg) if identity is not None else None


def resume_key(cfg: DictConfig) -> str:
    return spec_hash(resume_spec(cfg))


def _pop(node, dotted: str) -> None:
    parent, _, leaf = dotted.rpartition(".")
    target = OmegaConf.select(node, parent) if parent else node
    if target is not None and leaf in target:
        del target[leaf]


def _pop_dict(d: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p) if isinstance(d, dict) else None
        if d is None:
            return
    if isinstance(d, dict):
        d.pop(leaf, None)


# --- the store ----------------------------------------------------------------------------
def _complete(records, method: str) -> str | None:
    """None when ``records`` are a finished result of ``method``, else why not."""
    if not isinstance(records, list) or not records:
        return "no records"
    for r in records:
        missing = [k for k in RESULT_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            return f"record lacks {missing}"
    methods = {r["method"] for r in records}
    for m in {"base", method}:
        if m not in methods:
            return f"no {m} record"
    return None


def load_entry(store: Path, key: str, method: str) -> dict | None:
    """The complete store entry for ``key``, or None (absent, unreadable, or incomplete)."""
    path = store / f"{key}.json"
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("resume: ignoring unreadable results entry %s (%s)", path, e)
        return None
    if not isinstance(entry, dict):
        log.warning("resume: ignoring results entry %s: not a results-store entry (found %s)", path,
                    type(entry).__name__)
        return None
    why = "key mismatch" if entry.get("key") != key else _complete(entry.get("records"), method)
    if why:
        log.warning("resume: ignoring incomplete results entry %s (%s)", path, why)
        return None
    damaged = _damaged(store, entry)
    if damaged:
        log.warning("resume: ignoring damaged results entry %s (%s); the job runs again", path, damaged)
        return None
    return entry


def _records_digest(records) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()


def _damaged(store: Path, entry: dict) -> str | None:
    """Why ``entry`` (or one of its artefacts) does not match the checksums it was written with."""
    if "records_sha256" not in entry or "checksums" not in entry:
        return "no checksums (written by an older version)"
    if _records_digest(entry["records"]) != entry["records_sha256"]:
        return "its records changed after they were stored (checksum mismatch)"
    for name in entry.get("artefacts", []):
        path = _artefact(store, entry["key"], name)
        want = entry["checksums"].get(name)
        try:
            have = file_record(path)
        except OSError as e:
            return f"artefact {path.name} cannot be read ({e.strerror or e})"
        if want != have:
            return f"artefact {path.name} does not match its checksum (size {have[0]}, expected {want and want[0]})"
    return None


def save_entry(store: Path, key: str, spec: dict, run_dir: Path, records: list[dict]) -> Path:
    """Artefacts first, the JSON last (atomically): the JSON marks the cell finished."""
    (store / ARTEFACT_DIR).mkdir(parents=True, exist_ok=True)
    artefacts = []
    for name in ARTEFACTS:
        src = run_dir / name
        if src.is_file():
            _link_or_copy(src, _artefact(store, key, name))
            artefacts.append(name)
    checksums = {name: file_record(_artefact(store, key, name)) for name in artefacts}
    entry = {"key": key, "records": records, "records_sha256": _records_digest(records), "run_dir": str(run_dir),
             "artefacts": artefacts, "checksums": checksums, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "spec": spec}
    path = store / f"{key}.json"
    atomic_write_text(path, json.dumps(entry, indent=1, default=str))
    return path


def _artefact(store: Path, key: str, name: str) -> Path:
    """Where an entry's artefact lives: beside, not among, the entries (``store/*.json`` lists
    finished cells only)."""
    return store / ARTEFACT_DIR / f"{key}.{name}"


def _link_or_copy(src: Path, dst: Path) -> None:
    """Atomically place ``src`` at ``dst``: a hard link where possible (these files are never
    modified in place, only replaced), a copy across filesystems."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def restore(entry: dict, store: Path, run_dir: Path) -> Path:
    """Copy a finished entry into ``run_dir`` (results.json, artefacts, resumed.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = entry["key"]
    for name in entry.get("artefacts", []):
        src = _artefact(store, key, name)
        if src.is_file():
            _link_or_copy(src, run_dir / name)
    atomic_write_text(run_dir / "resumed.json", json.dumps(
        {"key": key, "store_entry": str(store / f"{key}.json"), "from_run_dir": entry.get("run_dir"),
         "finished_at": entry.get("finished_at")}, indent=1))
    return write_results(entry["records"], run_dir)


# --- the wrapper --------------------------------------------------------------------------
def resumable(task: Callable[[DictConfig], int]) -> Callable[[DictConfig], int]:
    """Wrap the ``train`` task: skip finished cells, store results of successful ones."""
    def wrapped(cfg: DictConfig) -> int:
        finish_stray_wandb(0)                     # a run left open by an earlier job of this process
        run_dir = run_dir_of(cfg)
        store = results_dir(cfg)
        spec = resume_spec(cfg)
        key = spec_hash(spec)
        method = cfg.method.name
        if cfg.get("resume", True):
            entry = load_entry(store, key, method)
            if entry is not None:
                path = restore(entry, store, run_dir)
                write_run_config(job_config(cfg), run_dir)
                log.info("resume: %s already finished (key %s, run %s); nothing to do",
                         cfg.get("run_name", method), key, entry.get("run_dir"))
                print(results_table(entry["records"]))
                print(f"results: {path} (resumed: finished {entry.get('finished_at')} in {entry.get('run_dir')})")
                return 0
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("results.json", "resumed.json", *ARTEFACTS):   # an earlier attempt in this same dir
            (run_dir / stale).unlink(missing_ok=True)
        write_run_config(job_config(cfg), run_dir)
        atomic_write_text(run_dir / "result_key.json", json.dumps({"key": key, "spec": spec}, indent=1,
                                                                  default=str))
        code = 1
        with interrupts() as stop:
            try:
                code = int(task(cfg) or 0)
            finally:
                finish_stray_wandb(code if not stop.signum else 1)
        if stop.signum:                           # a signal that a library turned into a normal return
            raise JobInterrupted(stop.signum)
        if code == 0:
            _store_result(store, key, spec, run_dir, method)
        return code
    wrapped.__name__ = getattr(task, "__name__", "task")
    wrapped.__doc__ = task.__doc__
    return wrapped


class JobInterrupted(SystemExit):
    """The job received SIGINT / SIGTERM (Ctrl-C, ``kill``, a launcher's time limit): it stops with exit status
    128 + signal number and stores no result, whatever the training library made of the signal (Lightning
    turns SIGTERM into a ``SystemExit`` with status 0 and Ctrl-C into a graceful stop)."""

    def __init__(self, signum: int):
        import signal
        self.signum = int(signum)
        super().__init__(128 + self.signum)
        self.name = signal.Signals(self.signum).name


class _Stop:
    signum: int = 0


@contextlib.contextmanager
def interrupts():
    """While a job runs: SIGINT and SIGTERM are remembered and raise :class:`JobInterrupted` (after any
    handler already installed has run), so an interrupted job never returns as finished."""
    import signal
    import threading
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():   # handlers can only be set there
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        first = not stop.signum
        stop.signum = stop.signum or signum
        if first:
            log.warning("received %s: stopping the job; no result is stored (a rerun computes it again)",
                        signal.Signals(signum).name)
        raise JobInterrupted(stop.signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def job_config(cfg: DictConfig) -> dict:
    """The job's config, resolved (written to the run dir as ``config.json``)."""
    return OmegaConf.to_container(cfg, resolve=True)


def _store_result(store: Path, key: str, spec: dict, run_dir: Path, method: str) -> None:
    try:
        records = read_results(run_dir / "results.json")
    except ResultsFileError as e:
        log.warning("resume: task succeeded but %s/results.json is unreadable (%s): not stored", run_dir, e)
        return
    why = _complete(records, method)
    if why:
        log.warning("resume: %s/results.json is incomplete (%s): not stored", run_dir, why)
        return
    path = save_entry(store, key, spec, run_dir, records)
    log.info("resume: stored %s", path)


def finish_stray_wandb(exit_code: int = 0) -> None:
    """Close a W&B run still open in this process (never imports wandb itself)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    log.warning("closing a W&B run left open (%s)", getattr(wandb.run, "name", "?"))
    try:
        wandb.finish(exit_code=exit_code)
    except Exception as e:  # never let logging teardown mask the job's own outcome
        log.warning("wandb.finish failed: %s", e)
