"""``task=report``: collect a sweep's ``results.json`` files into the paper's table and plots.

    python -m residual_exp task=report sweep_dir=outputs/sweeps/synthetic/2026-…
    python -m residual_exp task=report 'task.run_dirs=[runA,runB]' task.out_dir=report/
    python -m residual_exp task=report sweep_dir=DIR task.lambda_run=DIR/6-…-residual_full

Every ``results.json`` under ``sweep_dir`` and ``task.run_dirs`` is read (each holds the
zero-shot ``base`` record and the trained method's record of one job).  Records with the same
(model, dataset, method, seed) are duplicates — every job repeats the zero-shot record, and
re-runs repeat cells — and only the newest (by file time) is kept; the report says how many
were dropped and lists the non-zero-shot ones.  Written to ``task.out_dir`` (default
``<sweep_dir>/report``):

* ``results.csv``   one row per kept record (+ gain over zero-shot, run dir);
* ``results.md``    the paper's layout: rows model × dataset, columns methods (test accuracy
  in %, mean ± std over seeds), a mean row per model and a trainable-parameters row per
  model, then a models × methods summary;
* ``accuracy_vs_params.png``, ``gain_over_zero_shot.png`` and ``lambda_spectra.png`` (the
  per-unit λ of ``task.lambda_run``; by default the newest ``residual_full`` run, else the
  newest run that has ``lambda.safetensors``).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..atomic import atomic_write_text
from ..catalog import method_order
from ..results import CONVENTION_KEYS, LAMBDA_FILE, ResultsFileError, read_results
from ..runtime import run_dir_of
from ..tables import markdown_table

log = logging.getLogger(__name__)

KEY = ("model", "dataset", "method", "seed")
LAMBDA_PREFERENCE = ("residual_full", "residual_fine", "residual_coarse", "spectral_adapter")


def _methods_order(present) -> list[str]:
    order = method_order()
    return [m for m in order if m in present] + sorted(m for m in present if m not in order)


def collect(dirs: list[Path]) -> tuple[list[dict], list[str]]:
    """All records under ``dirs`` (with ``run_dir`` and ``mtime``), and warnings."""
    records, warnings = [], []
    seen = set()
    for d in dirs:
        for path in sorted(d.rglob("results.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                recs = read_results(path)
            except ResultsFileError as e:
                warnings.append(f"skipped {e}")
                continue
            mtime = path.stat().st_mtime
            for r in recs:
                if not isinstance(r, dict) or any(k not in r for k in ("model", "dataset", "method", "test_accuracy")):
                    warnings.append(f"skipped a malformed record in {path}")
                    continue
                records.append({**r, "seed": int(r.get("seed", 0)), "run_dir": str(path.parent), "mtime": mtime})
    return records, warnings


def deduplicate(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Keep the newest record per (model, dataset, method, seed); messages about the rest."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in KEY), []).append(r)
    kept, notes, n_base = [], [], 0
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: (r["mtime"], r["run_dir"]), reverse=True)
        kept.append(rs[0])
        if len(rs) > 1:
            if key[2] == "base":
                n_base += len(rs) - 1
            else:
                notes.append(f"duplicate {'/'.join(map(str, key))}: {len(rs)} records, kept the newest "
                             f"({rs[0]['run_dir']}), dropped " + ", ".join(r["run_dir"] for r in rs[1:]))
    if n_base:
        notes.insert(0, f"dropped {n_base} duplicate zero-shot (base) records: every job reports zero-shot; "
                        "kept the newest per model/dataset/seed")
    return kept, notes


# --- tables -------------------------------------------------------------------------------
def fmt_params(values) -> str:
    vals = sorted({int(v) for v in values if v == v})
    if not vals:
        return "–"
    h = [_human(v) for v in (vals[0], vals[-1])]
    return h[0] if h[0] == h[1] else f"{h[0]}–{h[1]}"


def _human(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _cell(accs) -> str:
    import numpy as np
    a = np.asarray([x for x in accs if x == x], dtype=float) * 100
    if a.size == 0:
        return "–"
    return f"{a.mean():.1f}" if a.size == 1 else f"{a.mean():.1f} ± {a.std(ddof=1):.1f}"


def paper_table(df) -> str:
    """The paper's layout (see the module docstring), as markdown."""
    methods = _methods_order(set(df.method))
    cols, align = ["model", "dataset"] + methods, ["l", "l"] + ["r"] * len(methods)
    rows, notes = [], []
    for model in sorted(df.model.unique()):
        dm = df[df.model == model]
        datasets = sorted(dm.dataset.unique())
        for ds in datasets:
            rows.append({"model": model, "dataset": ds,
                         **{m: _cell(dm[(dm.dataset == ds) & (dm.method == m)].test_accuracy) for m in methods}})
        means = {}
        for m in methods:
            per_ds = dm[dm.method == m].groupby("dataset").test_accuracy.mean()
            if per_ds.empty:
                means[m] = "–"
                continue
            mark = "" if len(per_ds) == len(datasets) else "†"
            if mark:
                notes.append(f"† {model}/{m}: mean over {len(per_ds)} of {len(datasets)} datasets")
            means[m] = f"**{per_ds.mean() * 100:.1f}**{mark}"
        rows.append({"model": model, "dataset": "**mean**", **means})
        rows.append({"model": model, "dataset": "*trainable params*",
                     **{m: fmt_params(dm[dm.method == m].trainable_params) for m in methods}})
    lines = ["## Test accuracy (%)", "", markdown_table(rows, cols, fmt=_str, align=align).rstrip("\n")]
    if notes:
        lines += [""] + notes
    # summary: models x methods, mean over datasets
    summary = []
    for model in sorted(df.model.unique()):
        dm = df[df.model == model]
        row = {"model": model}
        for m in methods:
            v = dm[dm.method == m].groupby("dataset").test_accuracy.mean()
            row[m] = "–" if v.empty else f"{v.mean() * 100:.1f}"
        summary.append(row)
    if df.model.nunique() > 1:
        row = {"model": "**all**"}
        for m in methods:
            v = df[df.method == m].groupby(["model", "dataset"]).test_accuracy.mean()
            row[m] = "–" if v.empty else f"**{v.mean() * 100:.1f}**"
        summary.append(row)
    lines += ["", "## Mean over datasets (%)", "",
              markdown_table(summary, ["model"] + methods, fmt=_str, align=["l"] + ["r"] * len(methods)).rstrip("\n")]
    present = [k for k in CONVENTION_KEYS if k in df]
    if present:
        combos = df[present].fillna("?").astype(str).drop_duplicates().to_dict("records")
        lines += ["", "Conventions (FIDELITY.md): " + "; ".join(
            ", ".join(f"{k}={v}" for k, v in c.items()) for c in combos)
            + (" — MIXED: rows were computed under different conventions" if len(combos) > 1 else "")]
    seeds = sorted(df.seed.unique())
    lines += ["", f"{len(df)} records; {df.model.nunique()} models × {df.dataset.nunique()} datasets; "
                  f"seeds {', '.join(map(str, seeds))}" + ("" if len(seeds) == 1 else " (mean ± std over seeds)")]
    return "\n".join(lines) + "\n"


def _str(key, v) -> str:
    return "" if v is None else str(v)


# --- the task -----------------------------------------------------------------------------
def _fail(msg: str) -> int:
    print(f"report: {msg}", file=sys.stderr)
    log.error(msg)
    return 2


def report(cfg) -> int:
    import pandas as pd

    from ..analysis.report_plots import (find_lambda_run, plot_accuracy_vs_params, plot_gain_over_zero_shot,
                                         plot_lambda_spectra)

    t = cfg.task
    given = ([cfg.sweep_dir] if cfg.get("sweep_dir") else []) + list(t.get("run_dirs") or [])
    if not given:
        return _fail("nothing to collect: pass sweep_dir=DIR (a sweep or any folder of runs) "
                     "or task.run_dirs=[DIR,...]")
    dirs = [Path(str(d)).expanduser() for d in given]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        return _fail(f"no such directory: {', '.join(missing)} (sweep_dir / task.run_dirs must be existing "
                     "folders holding runs with results.json)")
    records, warnings = collect(dirs)
    for w in warnings:
        log.warning(w)
    if not records:
        return _fail(f"no results.json under {', '.join(map(str, dirs))}: have the jobs finished?")
    kept, notes = deduplicate(records)
    for n in notes:
        print(f"note: {n}")
    if t.get("out_dir"):
        out = Path(str(t.out_dir)).expanduser()
    elif cfg.get("sweep_dir"):
        out = Path(str(cfg.sweep_dir)).expanduser() / "report"
    else:
        out = run_dir_of(cfg) / "report"
    out.mkdir(parents=True, exist_ok=True)

    df = pd.DataFrame(kept).drop(columns=["mtime"])
    df["gain"] = df.test_accuracy - df.zero_shot_test_accuracy
    order = {m: i for i, m in enumerate(_methods_order(set(df.method)))}
    df = df.sort_values(["model", "dataset", "method", "seed"], key=lambda s: s.map(order) if s.name == "method" else s)
    first = ["model", "dataset", "method", "seed", "trainable_params", "test_accuracy", "val_accuracy",
             "zero_shot_test_accuracy", "zero_shot_val_accuracy", "gain"]
    df = df[[c for c in first if c in df] + [c for c in df.columns if c not in first]]
    atomic_write_text(out / "results.csv", df.to_csv(index=False))
    md = paper_table(df)
    if notes:
        md += "\n" + "\n".join(f"- note: {n}" for n in notes) + "\n"
    atomic_write_text(out / "results.md", md)
    print(md)

    written = [out / "results.csv", out / "results.md"]
    written.append(plot_accuracy_vs_params(df, out / "accuracy_vs_params.png"))
    written.append(plot_gain_over_zero_shot(df, out / "gain_over_zero_shot.png"))
    lam_run = Path(str(t.lambda_run)).expanduser() if t.get("lambda_run") else find_lambda_run(kept, LAMBDA_PREFERENCE)
    if lam_run is None:
        print("no run with lambda.safetensors: λ spectra skipped (set task.lambda_run=DIR)")
    elif not (lam_run / LAMBDA_FILE).is_file():
        return _fail(f"task.lambda_run={lam_run}: no lambda.safetensors there (only runs of spectral / "
                     "residual methods write one)")
    else:
        if not t.get("lambda_run"):
            print(f"λ spectra of {lam_run} (newest λ run; choose another with task.lambda_run=DIR)")
        written.append(plot_lambda_spectra(lam_run, out / "lambda_spectra.png"))
    print("report written:\n" + "\n".join(f"  {p}" for p in written if p is not None))
    return 0
