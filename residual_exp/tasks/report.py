"""``task=report``: collect a sweep's ``results.json`` files into the paper's table, the cells
table and the figures that answer an ablation sweep.

    python -m residual_exp task=report sweep_dir=outputs/sweeps/synthetic/2026-…
    python -m residual_exp task=report 'task.run_dirs=[runA,runB]' task.out_dir=report/
    python -m residual_exp task=report sweep_dir=DIR task.lambda_run=DIR/6-…-residual_full

Every ``results.json`` under ``sweep_dir`` and ``task.run_dirs`` is read; older records are
completed from their run dirs, duplicates (every job repeats the zero-shot record; re-runs
repeat cells) keep the newest, and the report says what it dropped
(:mod:`residual_exp.analysis.report`).  Written to ``task.out_dir`` (default
``<sweep_dir>/report``):

* ``results.csv``   one row per kept record (+ gain over zero-shot, run dir; floats rounded);
* ``results.md``    the paper's layout: rows model × dataset, methods as columns (test accuracy
  in %, mean ± std over seeds; a method run in several settings shows the one chosen on val,
  noted ‡), a mean row and a trainable-parameters row per model, a models × methods summary;
* ``cells.csv`` / ``cells.md``  one row per cell (method × setting, seeds aggregated) with
  selected-unit count, kept components and λ count, marks (below zero-shot / below chance, with
  what to check) and the best setting per model × dataset chosen on val only;
* ``figures.md`` + a PNG and a CSV per ablation figure (:mod:`residual_exp.analysis.ablations`:
  accuracy vs kept components, Pareto front over parameters, units, pca_reference, lr, init,
  epochs, training dynamics); a figure without its inputs is skipped with one line saying why;
* ``accuracy_vs_params.png``, ``gain_over_zero_shot.png`` and ``lambda_spectra.png`` (the
  per-unit λ of ``task.lambda_run``; by default the newest ``residual_full`` run, else the
  newest run that has ``lambda.safetensors``).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..atomic import atomic_write_text
from ..results import LAMBDA_FILE
from ..runtime import run_dir_of
from ..tables import csv_text

log = logging.getLogger(__name__)

LAMBDA_PREFERENCE = ("residual_full", "residual_fine", "residual_coarse", "spectral_adapter")


def _fail(msg: str) -> int:
    print(f"report: {msg}", file=sys.stderr)
    log.error(msg)
    return 2


def input_dirs(cfg) -> tuple[list[Path], str | None]:
    """The folders to collect (``sweep_dir`` + ``task.run_dirs``), or why there are none."""
    given = ([cfg.sweep_dir] if cfg.get("sweep_dir") else []) + list(cfg.task.get("run_dirs") or [])
    if not given:
        return [], ("nothing to collect: pass sweep_dir=DIR (a sweep or any folder of runs) "
                    "or task.run_dirs=[DIR,...]")
    dirs = [Path(str(d)).expanduser() for d in given]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        return [], (f"no such directory: {', '.join(missing)} (sweep_dir / task.run_dirs must be existing "
                    "folders holding runs with results.json)")
    return dirs, None


def output_dir(cfg) -> Path:
    if cfg.task.get("out_dir"):
        return Path(str(cfg.task.out_dir)).expanduser()
    if cfg.get("sweep_dir"):
        return Path(str(cfg.sweep_dir)).expanduser() / "report"
    return run_dir_of(cfg) / "report"


def load(dirs: list[Path]):
    """``(records frame, notes)`` of the kept records under ``dirs``, or ``(None, why)``."""
    from ..analysis import report as R
    records, warnings = R.collect(dirs)
    for w in warnings:
        log.warning(w)
    if not records:
        return None, f"no results.json under {', '.join(map(str, dirs))}: have the jobs finished?"
    R.complete(records)
    kept, notes = R.deduplicate(records)
    return R.frame(kept), notes


def report(cfg) -> int:
    from ..analysis import report as R
    from ..analysis.ablations import ablation_figures
    from ..analysis.report_plots import (find_lambda_run, plot_accuracy_vs_params, plot_gain_over_zero_shot,
                                         plot_lambda_spectra)

    dirs, why = input_dirs(cfg)
    if why:
        return _fail(why)
    df, notes = load(dirs)
    if df is None:
        return _fail(notes)
    for n in notes:
        print(f"note: {n}")
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    table = R.csv_frame(df)
    atomic_write_text(out / "results.csv", csv_text(R.clean_rows(table), list(table.columns)))
    paper, choices = R.paper_frame(df)
    md = R.paper_table(paper, choices)
    if notes:
        md += "\n" + "\n".join(f"- note: {n}" for n in notes) + "\n"
    atomic_write_text(out / "results.md", md)
    print(md)

    cells = R.cells(df)
    atomic_write_text(out / "cells.csv", csv_text(R.clean_rows(cells), list(cells.columns)))
    cells_md = R.cells_markdown(cells)
    atomic_write_text(out / "cells.md", cells_md)
    print(cells_md[cells_md.index("## Best setting"):])

    written = [out / "results.csv", out / "results.md", out / "cells.csv", out / "cells.md"]
    written.append(plot_accuracy_vs_params(paper, out / "accuracy_vs_params.png"))
    written.append(plot_gain_over_zero_shot(paper, out / "gain_over_zero_shot.png"))
    figures = ablation_figures(df, cells, out)
    skipped = [f.skipped for f in figures if f.skipped]
    atomic_write_text(out / "figures.md", "\n\n".join(f.markdown for f in figures if not f.skipped)
                      + ("\n\n## Skipped\n\n" + "\n".join(f"- {s}" for s in skipped) if skipped else "") + "\n")
    written += [out / "figures.md"] + [p for f in figures for p in f.files]
    for s in skipped:
        print(s)

    lam_run = Path(str(cfg.task.lambda_run)).expanduser() if cfg.task.get("lambda_run") else None
    lam_run = lam_run or find_lambda_run(df.to_dict("records"), LAMBDA_PREFERENCE)
    if lam_run is None:
        print("no run with lambda.safetensors: λ spectra skipped (set task.lambda_run=DIR)")
    elif not (lam_run / LAMBDA_FILE).is_file():
        return _fail(f"task.lambda_run={lam_run}: no lambda.safetensors there (only runs of spectral / "
                     "residual methods write one)")
    else:
        if not cfg.task.get("lambda_run"):
            print(f"λ spectra of {lam_run} (newest λ run; choose another with task.lambda_run=DIR)")
        written.append(plot_lambda_spectra(lam_run, out / "lambda_spectra.png"))
    print("report written:\n" + "\n".join(f"  {p}" for p in written if p is not None))
    return 0
