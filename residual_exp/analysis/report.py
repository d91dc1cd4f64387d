"""The data of ``task=report``: a sweep's records, completed, deduplicated and tabulated.

* :func:`collect` reads every ``results.json`` under some folders (each holds the zero-shot
  ``base`` record and the trained method's record of one job);
* :func:`complete` fills what older records lack from their run dir (``num_classes`` from
  ``classes.json``, the setting — units, rank, pca_reference, init, lr, max_epochs — from
  ``config.json``, ``n_selected_units`` from the λ file, ``kept_components`` = the λ count of the
  λ-per-PC methods); a field nothing says stays absent and the figures needing it are skipped;
* :func:`deduplicate` keeps the newest record per :func:`record_key` — (model, dataset, method,
  seed) plus, for trained methods, the setting and the selected units — so ablation cells are
  kept apart while every job's repeated zero-shot record and re-runs of a cell are dropped;
* :func:`cells` aggregates seeds into one row per cell, with its marks (:func:`marks`: below
  zero-shot or below chance, with what to check) and the best setting per model × dataset
  chosen on val only; :func:`paper_frame` keeps, per method, the setting chosen on val, for the
  paper's layout (:func:`paper_table`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..catalog import method_order
from ..results import (BELOW_ZERO_SHOT_MARGIN, CONVENTION_KEYS, LAMBDA_FILE, SETTING_KEYS, ResultsFileError,
                       load_lambda, method_spec, read_classes, read_results, read_run_config, setting_of)
from ..tables import markdown_table

log = logging.getLogger(__name__)

KEY = ("model", "dataset", "method", "seed")
PAIR = list(KEY[:2])                  # one panel / one best setting per model × dataset
CELL = ("model", "dataset", "method", *SETTING_KEYS, "selection")
INT_KEYS = ("seed", "trainable_params", "kept_components", "n_selected_units", "num_classes", "max_epochs",
            "best_epoch", "epochs", "seeds", "epoch")
FIRST = ("model", "dataset", "method", "seed", "units", "n_selected_units", "rank", "kept_components",
         "trainable_params", "pca_reference", "init", "lr", "max_epochs", "test_accuracy", "val_accuracy",
         "zero_shot_test_accuracy", "zero_shot_val_accuracy", "gain")


def methods_order(present) -> list[str]:
    order = method_order()
    return [m for m in order if m in present] + sorted(m for m in present if m not in order)


# --- records ------------------------------------------------------------------------------
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


def complete(records: list[dict]) -> None:
    """Fill, in place, the fields older records lack from their run dir (module docstring)."""
    cache: dict[str, dict] = {}
    for r in records:
        run = cache.setdefault(r["run_dir"], _run_facts(Path(r["run_dir"])))
        if "num_classes" not in r and run.get("num_classes"):
            r["num_classes"] = run["num_classes"]
        if r["method"] == "base":
            continue
        for k, v in run.get("setting", {}).items():
            if k not in r and run.get("method") == r["method"]:
                r[k] = v
        if "n_selected_units" not in r:
            if isinstance(r.get("selected_units"), list):
                r["n_selected_units"] = len(r["selected_units"])
            elif run.get("lambda_units") and run.get("lambda_method") == r["method"]:
                r["n_selected_units"] = len(run["lambda_units"])
        spec = method_spec({"name": r["method"]})
        if "kept_components" not in r and spec is not None and spec.needs_bases:
            r["kept_components"] = int(r["trainable_params"])         # one λ per kept principal component


def _run_facts(run_dir: Path) -> dict:
    facts: dict = {}
    try:
        facts["num_classes"] = len(read_classes(run_dir)["classnames"])
    except (ResultsFileError, OSError):
        pass
    try:
        config = read_run_config(run_dir)
        facts["method"] = (config.get("method") or {}).get("name")
        facts["setting"] = setting_of(config)
    except (FileNotFoundError, ResultsFileError):
        pass
    if (run_dir / LAMBDA_FILE).is_file():
        try:
            trained = load_lambda(run_dir)
            if trained.meta.get("units") and trained.units != ["output"]:
                facts["lambda_units"], facts["lambda_method"] = trained.units, trained.method
        except ResultsFileError as e:
            log.warning("%s", e)
    return facts


def selection(r: dict) -> str | None:
    units = r.get("selected_units")
    return ",".join(map(str, units)) if isinstance(units, list) else None


def record_key(r: dict) -> tuple:
    if r["method"] == "base":
        return tuple(r[k] for k in KEY)
    return tuple(r[k] for k in KEY) + tuple(r.get(k) for k in SETTING_KEYS) + (selection(r),)


def deduplicate(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Keep the newest record per :func:`record_key`; messages about the rest."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(record_key(r), []).append(r)
    kept, notes, n_base = [], [], 0
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: (r["mtime"], r["run_dir"]), reverse=True)
        kept.append(rs[0])
        if len(rs) > 1:
            if key[2] == "base":
                n_base += len(rs) - 1
            else:
                notes.append(f"duplicate {'/'.join(map(str, key[:4]))}{_setting_text(rs[0])}: {len(rs)} records, "
                             f"kept the newest ({rs[0]['run_dir']}), dropped " + ", ".join(r["run_dir"] for r in rs[1:]))
    if n_base:
        notes.insert(0, f"dropped {n_base} duplicate zero-shot (base) records: every job reports zero-shot; "
                        "kept the newest per model/dataset/seed")
    return kept, notes


def _setting_text(r) -> str:
    parts = [f"{k}={r[k]}" for k in SETTING_KEYS if r.get(k) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def frame(records: list[dict]) -> pd.DataFrame:
    """The kept records as a DataFrame: every setting column present, ``gain``, sorted."""
    df = pd.DataFrame(records)
    for k in (*SETTING_KEYS, "n_selected_units", "kept_components", "num_classes"):
        if k not in df:
            df[k] = None
    df["selection"] = [selection(r) for r in records]
    df["gain"] = df.test_accuracy - df.zero_shot_test_accuracy
    order = {m: i for i, m in enumerate(methods_order(set(df.method)))}
    df = df.sort_values(["model", "dataset", "method", "seed"], key=lambda s: s.map(order) if s.name == "method" else s,
                        kind="stable")
    return df[[c for c in FIRST if c in df] + [c for c in df.columns if c not in FIRST]].reset_index(drop=True)


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as ``results.csv`` holds it (no file times, the selected units as one string)."""
    return df.drop(columns=["mtime", "selected_units"], errors="ignore")


# --- cells, marks, the best setting -----------------------------------------------------------
def cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (model, dataset, method, setting, selection), seeds aggregated: mean val /
    test accuracy (``*_std`` over seeds), counts, ``marks`` and ``best_on_val``."""
    rows = []
    for key, g in df.groupby(list(CELL), dropna=False, sort=False):
        row = {k: _scalar(v) for k, v in zip(CELL, key)}
        row.update(seeds=len(g), val_accuracy=g.val_accuracy.mean(), test_accuracy=g.test_accuracy.mean(),
                   val_std=g.val_accuracy.std(ddof=1) if len(g) > 1 else None,
                   test_std=g.test_accuracy.std(ddof=1) if len(g) > 1 else None,
                   zero_shot_val_accuracy=g.zero_shot_val_accuracy.mean(),
                   zero_shot_test_accuracy=g.zero_shot_test_accuracy.mean(),
                   trainable_params=int(g.trainable_params.median()),
                   **{k: _first(g[k]) for k in ("kept_components", "n_selected_units", "num_classes")})
        row["gain"] = row["test_accuracy"] - row["zero_shot_test_accuracy"]
        flags = [f for fl in g["flags"] if isinstance(fl, list) for f in fl] if "flags" in g else []
        recorded = "flags" in g and g["flags"].apply(lambda f: isinstance(f, list)).any()
        row["marks"] = "; ".join(dict.fromkeys(map(str, flags))) if recorded else "; ".join(marks(row))
        row["run_dirs"] = " ".join(g.run_dir)
        rows.append(row)
    out = pd.DataFrame(rows)
    out["best_on_val"] = False
    for _, g in out.groupby(PAIR, sort=False):
        out.loc[best_index(g), "best_on_val"] = True
    return out


def _scalar(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _first(s: pd.Series):
    s = s.dropna()
    return None if s.empty else int(s.iloc[0])


def marks(cell: dict, margin: float = BELOW_ZERO_SHOT_MARGIN) -> list[str]:
    """What is wrong with a cell's numbers, each with what to check: a trained method more than
    ``margin`` below zero-shot on val (the trainer's own warning rule), any val accuracy below
    chance (1 / num_classes)."""
    out, val = [], cell["val_accuracy"]
    n = cell.get("num_classes")
    if cell["method"] == "base":
        if n and val < 1 / n:
            out.append(f"zero-shot below chance (val {val:.3f} < {1 / n:.3f} = 1/{n}): check the classifier "
                       "(class names, templates) and the model weights")
        return out
    zs = cell["zero_shot_val_accuracy"]
    if val < zs - margin:
        out.append(f"below zero-shot (val {val:.3f} < {zs:.3f}): check method.lr, method.init and trainer.max_epochs")
    if n and val < 1 / n:
        out.append(f"below chance (val {val:.3f} < {1 / n:.3f} = 1/{n}): check method.lr and the data")
    return out


def best_index(g: pd.DataFrame):
    """The row of ``g`` with the highest val accuracy (ties: fewer trainable parameters, then first)."""
    order = g.assign(_p=g.trainable_params.astype(float)).sort_values(["val_accuracy", "_p"], ascending=[False, True],
                                                                     kind="stable")
    return order.index[0]


def describe(cell) -> str:
    """``method units=… rank=… …`` of a cell (the setting fields it has)."""
    parts = [str(cell["method"])] + [f"{k}={_level(cell[k])}" for k in SETTING_KEYS if _scalar(cell.get(k)) is not None]
    return " ".join(parts)


def short_labels(rows: pd.DataFrame, exclude=()) -> list[str]:
    """:func:`describe` of each row, limited to the setting keys (less ``exclude``) whose values
    differ among ``rows``: ``residual_full rank=evr=0.9`` rather than the whole setting."""
    norm = {k: rows[k].map(lambda v: str(_scalar(v))) for k in SETTING_KEYS if k in rows and k not in exclude}
    varying = [k for k, v in norm.items() if v.nunique() > 1]
    return [" ".join([str(r["method"])] + [f"{k}={_level(r[k])}" for k in varying if _scalar(r[k]) is not None])
            for r in rows.to_dict("records")]


def _level(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def cells_markdown(c: pd.DataFrame) -> str:
    """The cells table (★ = best on val per model × dataset) and the chosen settings."""
    cols = ["model", "dataset", "method", "units", "n_selected_units", "rank", "kept_components", "trainable_params",
            "pca_reference", "init", "lr", "max_epochs", "seeds", "val", "test", "zero-shot test", "marks"]
    heads = cols[:4] + ["units sel.", "rank", "PCs kept", "λ / params"] + cols[8:]
    rows = [dict(r, val=_pct(r["val_accuracy"], r["val_std"]) + (" ★" if r["best_on_val"] else ""),
                 test=_pct(r["test_accuracy"], r["test_std"]), **{"zero-shot test": _pct(r["zero_shot_test_accuracy"])})
            for r in c.to_dict("records")]
    lines = ["## Cells (accuracy %, mean ± std over seeds; ★ best on val)", "",
             markdown_table(rows, cols, heads, fmt=_fmt).rstrip("\n"), "", "## Best setting, chosen on val only", ""]
    for r in c[c.best_on_val].to_dict("records"):
        lines.append(f"- {r['model']} / {r['dataset']}: **{describe(r)}** — val {_pct(r['val_accuracy'])}, "
                     f"test {_pct(r['test_accuracy'])} (zero-shot test {_pct(r['zero_shot_test_accuracy'])})")
    flagged = c[c.marks != ""]
    lines += ["", f"{len(flagged)} of {len(c)} cells marked" + (":" if len(flagged) else ".")]
    lines += [f"- {describe(r)} ({r['model']}/{r['dataset']}): {r['marks']}" for r in flagged.to_dict("records")]
    return "\n".join(lines) + "\n"


def _pct(v, std=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v * 100:.1f}" + ("" if std is None or (isinstance(std, float) and math.isnan(std)) else f" ± {std * 100:.1f}")


def _fmt(key, v) -> str:
    v = _scalar(v)
    if v is None:
        return "–" if key in ("units", "n_selected_units", "rank", "kept_components", "pca_reference", "init", "lr",
                              "max_epochs") else ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def clean_rows(df: pd.DataFrame) -> list[dict]:
    """Rows for CSV without float noise: counts as integers, other floats rounded to 6 decimals
    (accuracies are stored as float32: 0.39500001… → 0.395), NaN as empty."""
    out = []
    for r in df.to_dict("records"):
        row = {}
        for k, v in r.items():
            if isinstance(v, (float, np.floating)):
                v = float(v)
                v = None if math.isnan(v) else int(v) if k in INT_KEYS and v.is_integer() else round(v, 6) + 0.0
            elif isinstance(v, np.integer):
                v = int(v)
            row[k] = v
        out.append(row)
    return out


# --- the paper's layout ---------------------------------------------------------------------
def paper_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per (model, dataset, method) the records of one setting — the only one, or the one with the
    best mean val accuracy (:func:`best_index`) — and a note for each choice made."""
    c = cells(df)
    keep, notes = [], []
    for (model, ds, method), g in c.groupby(list(KEY[:3]), sort=False):
        best = g.loc[best_index(g)]
        keep.append(tuple(_scalar(best[k]) for k in CELL))
        if len(g) > 1:
            notes.append(f"‡ {model}/{ds}/{method}: best of {len(g)} settings on val: {describe(best)}")
    wanted = set(keep)
    mask = [tuple(_scalar(v) for v in row) in wanted for row in df[list(CELL)].itertuples(index=False)]
    return df[mask], notes


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
    a = np.asarray([x for x in accs if x == x], dtype=float) * 100
    if a.size == 0:
        return "–"
    return f"{a.mean():.1f}" if a.size == 1 else f"{a.mean():.1f} ± {a.std(ddof=1):.1f}"


def paper_table(df: pd.DataFrame, choices: list[str] = ()) -> str:
    """The paper's layout as markdown: rows model × dataset, methods as columns (test accuracy in
    %, mean ± std over seeds), a mean row and a trainable-parameters row per model, then a models
    × methods summary, the conventions and the settings chosen on val (``choices``)."""
    methods = methods_order(set(df.method))
    cols, align = PAIR + methods, ["l", "l"] + ["r"] * len(methods)
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
    if notes or choices:
        lines += [""] + notes + list(choices)
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
            v = df[df.method == m].groupby(PAIR).test_accuracy.mean()
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
