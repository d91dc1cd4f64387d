"""Multirun glue: check what every job of a sweep needs before launching it, and end with one table.

:class:`SweepCallback` is a Hydra callback (``hydra.callbacks.sweep`` in ``conf/config.yaml``):

* ``on_multirun_start`` expands the sweep into its jobs (the sweeper's own parameters and the command
  line's, as Hydra's basic sweeper does) and, before any job is launched, checks what they need
  (:func:`sweep_problems`): the launcher (``hydra/launcher=slurm`` needs SLURM's ``sbatch``), every model's
  weights (a local file, the embedded tiny CLIP, or the hub's files in the local cache, or a reachable
  hub) and every dataset's files (and the PCA reference set's, for the methods that fit bases).  Missing
  pieces are listed in one message, exit status 2, within seconds, instead of every job failing in turn.
* ``on_multirun_end`` (and, when a job failed and Hydra stopped the sweep, at exit) prints the records of
  every finished job as one table and writes ``<sweep dir>/results_table.{csv,md}``.

Results of finished jobs are resumed, not recomputed (:mod:`residual_exp.store`).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .errors import EXIT_USER_ERROR

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 3.0
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")      # open_clip's hub files
SWEEP_TABLE = "results_table"


# --- the jobs of a sweep ------------------------------------------------------------------------------------
def sweep_jobs(cfg: DictConfig) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands them (sweeper params, then the command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items()]
    args += list(OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    overrides = OverridesParser.create().parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _matters(override: str, prefixes: tuple[str, ...]) -> bool:
    k = _key(override)
    return any(k == p or k.startswith(p + ".") or k.startswith(p + "@") for p in prefixes)


# --- what a job needs -----------------------------------------------------------------------------------------
def launcher_problem(cfg: DictConfig) -> str | None:
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if "SlurmLauncher" in target and shutil.which("sbatch") is None:
        return ("hydra/launcher=slurm: SLURM is not available on this machine (no sbatch on PATH): run the sweep on "
                "the cluster's login node, or drop hydra/launcher=slurm to run it here (or hydra/launcher="
                "submitit_local)")
    return None


def _hub_cached(repo: str, files: tuple[str, ...], cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache
    for f in files:
        try:
            hit = try_to_load_from_cache(repo, f, cache_dir=cache_dir)
        except Exception:                      # a malformed repo id: not cached
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


def _hub_sources(model: DictConfig) -> list[tuple[str, tuple[str, ...]]] | None:
    """``[(repo, candidate files)]`` the weights of a hub-tagged model come from (None: not a hub download)."""
    from .backbones.weights import HF_WEIGHT_FILES
    family, arch, tag = model.get("family"), model.get("arch"), model.get("pretrained")
    if tag is None or model.get("weights") or family == "tiny_clip":
        return None
    if family == "open_clip":
        import open_clip
        pcfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        hub = pcfg.get("hf_hub", "")
        if not hub:
            return [("url", (pcfg.get("url", ""),))] if pcfg.get("url") else None
        repo, fname = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        return [(repo, (fname,) if fname else OPEN_CLIP_FILES)]
    if family == "timm" and "/" not in str(tag):
        import timm
        pcfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}")
        if pcfg is None or not pcfg.hf_hub_id:
            return None
        return [(pcfg.hf_hub_id, (pcfg.hf_hub_filename,) if pcfg.hf_hub_filename else HF_WEIGHT_FILES)]
    return [(str(tag), HF_WEIGHT_FILES)]        # a transformers repo (BLIP, the paper's ViT-L/16)


_HUB_UP: list[bool] = []


def hub_reachable() -> bool:
    """Whether the model hub answers (once per process; never with ``HF_HUB_OFFLINE=1``)."""
    if not _HUB_UP:
        from huggingface_hub import constants
        up = False
        if not constants.HF_HUB_OFFLINE:
            import urllib.request
            try:
                urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                                       timeout=HUB_TIMEOUT_S)
                up = True
            except Exception as e:        # HTTP errors mean it answered
                up = getattr(e, "code", None) is not None
        _HUB_UP.append(up)
    return _HUB_UP[0]


def weights_problem(model: DictConfig) -> str | None:
    """Why the weights of ``model`` cannot be had here (None: a local file, cached, random, or downloadable)."""
    name = model.get("name")
    if model.get("weights"):
        p = Path(os.path.expanduser(str(model.weights)))
        return None if p.is_file() and p.stat().st_size > 0 else \
            f"model={name}: model.weights={model.weights}: {'empty file' if p.is_file() else 'no such file'}"
    try:
        sources = _hub_sources(model)
    except Exception as e:          # an unknown tag: the job itself says which
        return f"model={name}: model.pretrained={model.get('pretrained')}: {type(e).__name__}: {e}"
    if not sources:
        return None
    cache_dir = model.get("cache_dir")
    missing = [repo for repo, files in sources if repo != "url" and not _hub_cached(repo, files, cache_dir)]
    if not missing or hub_reachable():
        return None
    return (f"model={name}: the weights ({', '.join(missing)}) are not in the local hub cache and the hub cannot be "
            "reached: download them once where there is internet (the cache can be copied here), or pass "
            "model.weights=/path/to/file")


def data_problem(ds: DictConfig, what: str = "dataset") -> str | None:
    """Why the data of dataset node ``ds`` is not usable here (None: present, or generated)."""
    from .catalog import RUN_SPLITS, spec_of
    from .data.errors import DatasetError
    from .data.registry import spec_function
    name = str(ds.name)
    identity = spec_function(ds, "identity")
    if identity is not None:                            # a user's folder: list it (no image is decoded)
        try:
            identity(ds)
        except DatasetError as e:
            return f"{what}={name}: {str(e).splitlines()[0]}"
        return None
    from .data.vision import LOADERS, check_available
    if name not in LOADERS:                             # generated (shapes), or a plugin's: its job checks
        return None
    spec = spec_of("dataset", ds)
    if bool(ds.get("download")) and spec.can_download and hub_reachable():
        return None
    root = Path(str(ds.root)).expanduser().absolute()
    missing = sorted({m for split in RUN_SPLITS for m in check_available(ds, root, split)})
    if not missing:
        return None
    return (f"{what}={name}: not found under {what}.root={root} (missing {', '.join(missing[:3])}"
            f"{', …' if len(missing) > 3 else ''}; `python -m residual_exp task=inspect_data dataset={name}` says how "
            "to get it)")


def sweep_problems(cfg: DictConfig, jobs: list[list[str]]) -> list[str]:
    """Everything the sweep's jobs need and this machine lacks, one line each (composing each distinct model
    and dataset once)."""
    from hydra import compose

    from .catalog import needs_bases
    problems = [p for p in [launcher_problem(cfg)] if p]
    common = ("experiment", "paths", "seed")
    seen_models: dict[tuple, DictConfig] = {}
    seen_data: dict[tuple, tuple] = {}
    seen_methods: dict[tuple, DictConfig] = {}
    for job in jobs:
        job = [o for o in job if not _key(o).startswith("hydra")]
        mkey = tuple(o for o in job if _matters(o, ("model",) + common))
        dkey = tuple(o for o in job if _matters(o, ("dataset", "pca") + common))
        tkey = tuple(o for o in job if _matters(o, ("method", "units", "rank") + common))
        if tkey not in seen_methods:
            seen_methods[tkey] = compose(config_name="config", overrides=list(tkey)).method
        if mkey not in seen_models:
            seen_models[mkey] = compose(config_name="config", overrides=list(mkey)).model
        if dkey not in seen_data:
            c = compose(config_name="config", overrides=list(dkey))
            seen_data[dkey] = (c.dataset, c.pca.reference, set())
        seen_data[dkey][2].add(needs_bases(seen_methods[tkey]))
    for model in seen_models.values():
        p = weights_problem(model)
        if p and p not in problems:
            problems.append(p)
    for ds, ref, methods in seen_data.values():
        for node, what in ((ds, "dataset"), (ref, "pca.reference")):
            if node is None or (what == "pca.reference" and not any(methods)):   # no job fits PCA bases
                continue
            p = data_problem(node, what)
            if p and p not in problems:
                problems.append(p)
    return problems


# --- the combined table ---------------------------------------------------------------------------------------
def sweep_records(sweep_dir: Path) -> tuple[list[dict], int]:
    """``(records, jobs)``: every record of the sweep's finished jobs and the number of job folders."""
    from .results import ResultsFileError, read_results
    records, jobs = [], 0
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        jobs += 1
        try:
            records += read_results(d / "results.json")
        except ResultsFileError:
            continue
    return records, jobs


def combined_table(sweep_dir: Path) -> str | None:
    """Print and write (``results_table.csv`` / ``.md``) the records of every finished job of the sweep."""
    from .results import results_table
    from .tables import write_table
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    records, jobs = sweep_records(sweep_dir)
    if not records:
        return None
    # a method's record once per job (each job also repeats its zero-shot base record: keep one per cell)
    seen, rows = set(), []
    for r in records:
        k = (r.get("model"), r.get("dataset"), r.get("method"), r.get("seed"))
        if k not in seen:
            seen.add(k)
            rows.append(r)
    cols = ["model", "dataset", "method", "seed", "trainable_params", "zero_shot_test_accuracy", "val_accuracy",
            "test_accuracy", "flags"]
    flat = [{c: ("; ".join(r.get(c) or []) if c == "flags" else r.get(c)) for c in cols} for r in rows]
    csv_path, _ = write_table(flat, sweep_dir / SWEEP_TABLE, f"Sweep {sweep_dir.name}", columns=cols)
    text = results_table(rows)
    return f"{text}\nsweep: {len(rows)} results from {jobs} job folder(s) → {csv_path}"


class SweepCallback(Callback):
    """Checks a sweep before it launches; prints its combined table when it ends (see the module docstring)."""

    def __init__(self, check: bool = True) -> None:
        self.check = bool(check)
        self._sweep_dir: Path | None = None
        self._printed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        atexit.register(self._final_table)             # also when a failed job stops the sweep
        if not self.check:
            return
        try:
            jobs = sweep_jobs(config)
            problems = sweep_problems(config, jobs)
        except Exception as e:                         # a check that cannot run never blocks a sweep
            log.warning("sweep precheck skipped (%s: %s)", type(e).__name__, e)
            return
        if problems:
            count = f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}"
            if len(problems) == 1:
                print(f"error: {problems[0]} (none of the sweep's {count} was launched)", file=sys.stderr, flush=True)
            else:
                print(f"error: the sweep's {count} cannot run here (none was launched); missing:\n"
                      + "\n".join(f"error:   {p}" for p in problems), file=sys.stderr, flush=True)
            self._printed = True                       # nothing ran: no table
            sys.exit(EXIT_USER_ERROR)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._final_table()

    def _final_table(self) -> None:
        if self._printed or self._sweep_dir is None:
            return
        self._printed = True
        try:
            text = combined_table(self._sweep_dir)
        except Exception as e:                         # reporting never changes a sweep's outcome
            log.warning("combined table not written (%s: %s)", type(e).__name__, e)
            return
        if text:
            print(text, flush=True)

