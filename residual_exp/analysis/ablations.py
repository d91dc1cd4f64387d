"""The ablation figures of ``task=report``: each a PNG, a CSV and a markdown section — or one line
saying why it was skipped (its inputs are absent, or no two cells differ in what it compares).

=============================  ==========================================================================
``accuracy_vs_components``     accuracy vs Σ kept principal components (log x), one line per units
                               choice (cells that differ only in ``rank``), zero-shot as a line
``pareto_params``              every cell, accuracy vs trainable parameters (log x; zero-shot at 1); the
                               Pareto front is chosen on val (no cell with as few parameters is better
                               on val) and marked in both panels, val and test
``units``                      heads / MLPs / both / all …: cells that differ only in ``units``
``pca_reference``              ImageNet vs target bases: cells that differ only in ``pca_reference``
``lr_sensitivity``             accuracy vs ``lr`` (log x);  ``init_sensitivity``: per λ initialisation;
                               ``epochs_sensitivity``: accuracy vs ``max_epochs``
``training_dynamics``          val accuracy and train / val loss per epoch of every trained run, from
                               its ``history.csv``; the best-val epoch marked
=============================  ==========================================================================

Bars and lines show test accuracy (val as black ticks / dotted lines); ★ marks the cell chosen
on val among the figure's cells; one panel per model × dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..atomic import atomic_write_text, save_figure  # noqa: E402
from ..results import SETTING_KEYS, ResultsFileError, read_history  # noqa: E402
from ..tables import csv_text, markdown_table  # noqa: E402
from .report import CELL, PAIR, best_index, clean_rows, describe, short_labels  # noqa: E402

UNITS_ORDER = ("heads", "mlps", "heads_mlps", "all", "layers", "names", "coarse_top", "output")
MAX_PANELS = 12


@dataclass
class Figure:
    name: str
    title: str
    files: list[Path]
    markdown: str = ""
    skipped: str | None = None


# --- which cells a figure compares ---------------------------------------------------------------
def comparable(trained: pd.DataFrame, factor: str) -> pd.DataFrame:
    """The cells with at least one partner that differs only in ``factor`` (``units`` goes with the
    selected units), labelled: ``series`` (the rest of the setting, as far as it varies) and ``level``."""
    d = trained[trained[factor].notna()].copy()
    if factor == "rank":
        d = d[d.kept_components.notna()]
    if d.empty:
        return d
    rest = [k for k in CELL if k != factor and not (factor == "units" and k == "selection")]
    d["_series"] = [tuple(None if _na(v) else v for v in row) for row in d[rest].itertuples(index=False)]
    d["level"] = [f"{u} ({int(n)} units)" if factor == "units" and not _na(n) else _level(u)
                  for u, n in zip(d[factor], d.n_selected_units)]
    levels = d.groupby("_series")["level"].transform("nunique")
    d = d[levels >= 2].copy()
    d["series"] = short_labels(d, exclude=(factor,))
    return d.drop(columns="_series")


def _na(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _level(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def level_order(d: pd.DataFrame, factor: str) -> list[str]:
    """The levels of ``factor`` in reading order: units as :data:`UNITS_ORDER`, ranks by kept
    components, numbers ascending, other names alphabetically."""
    return sorted(d.level.unique(), key=lambda lv: _key(d[d.level == lv], lv, factor))


def _key(g: pd.DataFrame, level: str, factor: str) -> tuple:
    if factor == "units":
        return (_units_rank(level), level)
    if factor == "rank":
        return (float(g.kept_components.median()), level)
    if factor in ("lr", "max_epochs"):
        return (float(g[factor].iloc[0]), level)
    return (0.0, level)


def _panels(d: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(d.model, d.dataset)))


# --- figures -----------------------------------------------------------------------------------
def factor_figure(trained: pd.DataFrame, out: Path | None, factor: str, name: str, title: str, scale: str) -> Figure:
    """Accuracy per level of ``factor`` (``scale``: categorical bars, or lines on a log / linear x);
    ``out`` None: decide and tabulate only, draw nothing."""
    d = comparable(trained, factor)
    if d.empty:
        present = sorted({_level(v) for v in trained[factor].dropna()}) if factor in trained else []
        why = (f"no trained cell records {factor}" if not present else
               f"no two cells differ only in {factor} (values found: {', '.join(present)})")
        return Figure(name, title, [], skipped=f"{name}: skipped — {why}")
    d = d.assign(best_on_val=False)
    for _, p in d.groupby(PAIR, sort=False):
        d.loc[best_index(p), "best_on_val"] = True
    if out is None:
        return Figure(name, title, [], _pivot(d, title, name, factor))
    x = "kept_components" if factor == "rank" else factor
    panels = _panels(d)[:MAX_PANELS]
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(dict.fromkeys(d.series))}
    fig, axes = plt.subplots(1, len(panels), figsize=(9.5 * len(panels), 4.8), squeeze=False)
    for ax, (model, ds) in zip(axes[0], panels):
        p = d[(d.model == model) & (d.dataset == ds)]
        if scale == "categorical":
            _bars(ax, p, factor, colors)
        else:
            _lines(ax, p, x, scale == "log", colors)
        ax.axhline(p.zero_shot_test_accuracy.mean() * 100, color="gray", linestyle="--", linewidth=1,
                   label="zero-shot (test)")
        best = p.loc[best_index(p)]
        ax.set_title(f"{model} / {ds}\nbest on val: {describe(best)}", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    cols = ["model", "dataset", "series", factor, "level", "kept_components", "n_selected_units", "trainable_params",
            "seeds", "val_accuracy", "test_accuracy", "zero_shot_test_accuracy", "best_on_val"]
    files = _write(fig, d[[c for c in cols if c in d]], out / name)
    return Figure(name, title, files, _pivot(d, title, name, factor))


def _bars(ax, p: pd.DataFrame, factor: str, colors: dict) -> None:
    """Test-accuracy bars grouped by level (only the series present at a level), val as black
    ticks, the λ count above each bar, ★ on the cell chosen on val."""
    levels = level_order(p, factor)
    best = p.loc[best_index(p)]
    width = 0.8 / p.groupby("level").series.nunique().max()
    seen = set()
    for j, lv in enumerate(levels):
        q = p[p.level == lv]
        for i, r in enumerate(q.to_dict("records")):
            xv = j + (i - (len(q) - 1) / 2) * width
            t, v = r["test_accuracy"] * 100, r["val_accuracy"] * 100
            ax.bar([xv], [t], width * 0.95, color=colors[r["series"]],
                   label=None if r["series"] in seen else r["series"])
            ax.plot([xv - width * 0.4, xv + width * 0.4], [v, v], color="black", linewidth=1.5,
                    label=None if seen else "val")
            seen.add(r["series"])
            ax.annotate(f"{int(r['trainable_params']):,} λ", (xv, max(t, v)), textcoords="offset points",
                        xytext=(0, 2), ha="center", va="bottom", fontsize=6)
            if r["series"] == best.series and lv == best.level:
                ax.scatter([xv], [max(t, v) + 1.8], marker="*", s=140, color="gold", edgecolors="black", zorder=4,
                           label="best on val")
    ax.set_xticks(np.arange(len(levels)))
    ax.set_xticklabels(levels, rotation=15, ha="right", fontsize=8)
    _ylim(ax, p)


def _units_rank(level: str) -> int:
    head = level.split(" ")[0]
    return UNITS_ORDER.index(head) if head in UNITS_ORDER else len(UNITS_ORDER)


def _lines(ax, p: pd.DataFrame, x: str, log: bool, colors: dict) -> None:
    best = best_index(p)
    for s in dict.fromkeys(p.series):
        q = p[p.series == s].sort_values(x)
        color = colors[s]
        ax.plot(q[x], q.test_accuracy * 100, marker="o", color=color, label=s)
        if q.test_std.notna().any():              # seeds: ± one standard deviation of test accuracy
            ax.errorbar(q[x], q.test_accuracy * 100, yerr=q.test_std.fillna(0) * 100, fmt="none", ecolor=color,
                        capsize=3, linewidth=1)
        ax.plot(q[x], q.val_accuracy * 100, linestyle=":", marker=".", color=color, alpha=0.7)
        if x == "kept_components":
            for xv, yv, r in zip(q[x], q.test_accuracy * 100, q["rank"]):
                ax.annotate(str(r), (xv, yv), textcoords="offset points", xytext=(3, 4), fontsize=6)
    b = p.loc[best]
    ax.scatter([b[x]], [b.test_accuracy * 100], marker="*", s=180, color="gold", edgecolors="black", zorder=4,
               label="best on val")
    if log:
        ax.set_xscale("log")
    xs = sorted(p[x].unique())
    if len(xs) <= 12:                          # ticks at the values run, written plainly
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:g}" for v in xs], fontsize=7, rotation=30 if len(xs) > 6 else 0)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel({"kept_components": "Σ kept principal components (log)", "lr": "learning rate (log)"}.get(x, x)
                  + " — dotted: val")
    _ylim(ax, p)


def _ylim(ax, p) -> None:
    vals = np.concatenate([p.test_accuracy, p.val_accuracy, p.zero_shot_test_accuracy]) * 100
    ax.set_ylim(max(0.0, np.nanmin(vals) - 8), min(100.0, np.nanmax(vals) + 6))


def _pivot(d: pd.DataFrame, title: str, name: str, factor: str) -> str:
    rows = []
    columns = ["model", "dataset", "series", *level_order(d, factor)]
    for (model, ds, s), g in d.groupby(["model", "dataset", "series"], sort=False):
        row = {"model": model, "dataset": ds, "series": s}
        for r in g.to_dict("records"):
            row[r["level"]] = f"{r['test_accuracy'] * 100:.1f} ({r['val_accuracy'] * 100:.1f})" + (
                " ★" if r["best_on_val"] else "")
        rows.append(row)
    return (f"## {title}\n\n![{name}]({name}.png)\n\ntest accuracy % (val %); ★ chosen on val; data: {name}.csv\n\n"
            + markdown_table(rows, columns))


def pareto_front(params, val) -> np.ndarray:
    """``front[i]``: no other cell has as few parameters (or fewer) and a val accuracy as high (or
    higher), one of the two strictly."""
    params, val = np.asarray(params, float), np.asarray(val, float)
    dominated = [((params <= p) & (val >= v) & ((params < p) | (val > v))).any() for p, v in zip(params, val)]
    return ~np.asarray(dominated, bool)


def pareto_figure(all_cells: pd.DataFrame, out: Path | None) -> Figure:
    name, title = "pareto_params", "Accuracy vs trainable parameters, every cell (Pareto front chosen on val)"
    d = all_cells.copy()
    d["front"] = False
    for _, p in d.groupby(PAIR, sort=False):
        d.loc[p.index, "front"] = pareto_front(p.trainable_params, p.val_accuracy)
    panels = [pm for pm in _panels(d) if d[(d.model == pm[0]) & (d.dataset == pm[1])].trainable_params.nunique() > 1]
    if not panels:
        return Figure(name, title, [], skipped=f"{name}: skipped — every model × dataset has a single parameter count")
    d["cell"] = [describe(r) for r in d.to_dict("records")]
    front = d[d.front].sort_values(["model", "dataset", "trainable_params"])
    rows = [{"model": r["model"], "dataset": r["dataset"], "#": k, "cell": r["cell"], "params": int(r["trainable_params"]),
             "val %": f"{r['val_accuracy'] * 100:.1f}", "test %": f"{r['test_accuracy'] * 100:.1f}"}
            for (_, g) in front.groupby(PAIR, sort=False) for k, r in enumerate(g.to_dict("records"), 1)]
    md = (f"## {title}\n\n![{name}]({name}.png)\n\nThe front (no cell with as few parameters is better on val), "
          f"by parameters (# as numbered in the plot); data: {name}.csv\n\n" + markdown_table(rows))
    if out is None:
        return Figure(name, title, [], md)
    shown = panels[:MAX_PANELS]
    fig, axes = plt.subplots(len(shown), 2, figsize=(13, 4.6 * len(shown)), squeeze=False)
    methods = list(dict.fromkeys(d.method))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for (ax_v, ax_t), (model, ds) in zip(axes, shown):
        p = d[(d.model == model) & (d.dataset == ds)]
        x = np.maximum(p.trainable_params.to_numpy(float), 1.0)
        for ax, col, split in ((ax_v, "val_accuracy", "val"), (ax_t, "test_accuracy", "test")):
            for m in methods:
                sel = (p.method == m).to_numpy()
                if sel.any():
                    ax.scatter(x[sel], p[col].to_numpy()[sel] * 100, s=30, color=colors[m], label=m, alpha=0.8)
            f = p.front.to_numpy()
            order = np.argsort(x[f])
            ax.plot(x[f][order], p[col].to_numpy()[f][order] * 100, color="black", linewidth=1, zorder=1,
                    label="Pareto front (on val)")
            ax.scatter(x[f], p[col].to_numpy()[f] * 100, s=110, facecolors="none", edgecolors="black", zorder=3)
            for k, (xv, yv) in enumerate(sorted(zip(x[f], p[col].to_numpy()[f] * 100)), 1):   # = the table's #
                ax.annotate(str(k), (xv, yv), textcoords="offset points", xytext=(5, -10), fontsize=7)
            ax.axhline(p[f"zero_shot_{split}_accuracy"].mean() * 100, color="gray", linestyle="--", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters (log; zero-shot at 1)")
            ax.set_ylabel(f"{split} accuracy (%)")
            ax.set_title(f"{model} / {ds} — {split}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_v.legend(fontsize=7, loc="best")
    fig.tight_layout()
    cols = ["model", "dataset", "cell", "method", *SETTING_KEYS, "n_selected_units", "kept_components",
            "trainable_params", "val_accuracy", "test_accuracy", "front"]
    files = _write(fig, d[cols].rename(columns={"front": "pareto_val"}), out / name)
    return Figure(name, title, files, md)


def dynamics_figure(df: pd.DataFrame, out: Path | None) -> Figure:
    """One row per model × dataset × method (at most :data:`MAX_PANELS`): val accuracy (★ best
    epoch) and losses (solid val, dashed train) per epoch, a line per run, labelled by what varies
    among that row's runs; seeds of a cell share its colour."""
    name, title = "training_dynamics", "Training dynamics: val accuracy and loss per epoch (history.csv)"
    runs, bad = [], []
    trained = df[df.method != "base"]
    for r in trained.to_dict("records"):
        try:
            hist = read_history(Path(r["run_dir"]))
        except ResultsFileError as e:
            bad.append(str(e))
            continue
        if hist:
            runs += [dict(h, model=r["model"], dataset=r["dataset"], method=r["method"], cell=describe(r),
                          seed=r["seed"], run_dir=r["run_dir"], **{k: r[k] for k in SETTING_KEYS}) for h in hist]
    if not runs:
        why = "no trained run has a history.csv (runs written before it existed, or zero-shot only)"
        return Figure(name, title, [], skipped=f"{name}: skipped — {why}" + (f"; {'; '.join(bad)}" if bad else ""))
    h = pd.DataFrame(runs)
    if out is None:
        return Figure(name, title, [], f"## {title}\n\n{h.groupby(['cell', 'seed', 'run_dir']).ngroups} runs with a history")
    rows = list(dict.fromkeys(zip(h.model, h.dataset, h.method)))
    shown = rows[:MAX_PANELS]
    fig, axes = plt.subplots(len(shown), 3, figsize=(17, 3.6 * len(shown)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 0.9]})
    summary = []
    for (ax_a, ax_l, ax_k), (model, ds, method) in zip(axes, shown):
        p = h[(h.model == model) & (h.dataset == ds) & (h.method == method)]
        firsts = p.drop_duplicates("run_dir")
        label_of = dict(zip(firsts.cell, short_labels(firsts, exclude=())))
        cells = list(dict.fromkeys(p.cell))
        cmap = plt.get_cmap("tab10" if len(cells) <= 10 else "tab20")
        for (cell, seed, run), q in p.groupby(["cell", "seed", "run_dir"], sort=False):
            color = cmap(cells.index(cell) % cmap.N)
            first = seed == p[p.cell == cell].seed.min()
            label = label_of[cell].removeprefix(method).strip() or method
            ax_a.plot(q.epoch, q.val_accuracy * 100, marker=".", color=color, label=label if first else None)
            b = q.loc[q.val_accuracy.idxmax()] if q.val_accuracy.notna().any() else None
            if b is not None:
                ax_a.scatter([b.epoch], [b.val_accuracy * 100], marker="*", s=80, color=color, edgecolors="black",
                             zorder=3)
            ax_l.plot(q.epoch, q.val_loss, color=color)
            ax_l.plot(q.epoch, q.train_loss, color=color, linestyle="--", alpha=0.7)
            summary.append({"model": model, "dataset": ds, "run": f"{cell} s{seed}", "epochs": len(q),
                            "best epoch": None if b is None else int(b.epoch),
                            "best val %": "" if b is None else f"{b.val_accuracy * 100:.1f}",
                            "last train loss": f"{q.train_loss.iloc[-1]:.4f}", "last val loss": f"{q.val_loss.iloc[-1]:.4f}"})
        ax_a.set_title(f"{model} / {ds} / {method} — val accuracy (★ best epoch)", fontsize=9)
        ax_l.set_title("loss (solid val, dashed train)", fontsize=9)
        for ax in (ax_a, ax_l):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        ax_a.set_ylabel("val accuracy (%)")
        ax_l.set_ylabel("cross-entropy")
        ax_k.axis("off")
        ax_k.legend(*ax_a.get_legend_handles_labels(), fontsize=6, loc="upper left", borderaxespad=0,
                    ncol=1 if len(cells) <= 22 else 2, title=f"{method} runs", title_fontsize=7)
    fig.tight_layout()
    files = _write(fig, h[["model", "dataset", "cell", "seed", "epoch", "train_loss", "val_loss", "val_accuracy",
                           "run_dir"]], out / name)
    more = (f" (first {MAX_PANELS} of {len(rows)} model × dataset × method rows drawn; the CSV has all)"
            if len(rows) > len(shown) else "")
    md = f"## {title}\n\n![{name}]({name}.png){more}\n\ndata: {name}.csv\n\n" + markdown_table(summary)
    return Figure(name, title, files, md + "".join(f"\n- warning: {b}" for b in bad))


def _write(fig, table: pd.DataFrame, stem: Path) -> list[Path]:
    png, csv = stem.with_suffix(".png"), stem.with_suffix(".csv")
    save_figure(fig, png, dpi=110)
    plt.close(fig)
    atomic_write_text(csv, csv_text(clean_rows(table.reset_index(drop=True)), list(table.columns)))
    return [png, csv]


FACTORS = (   # factor, file, title, scale
    ("rank", "accuracy_vs_components", "Accuracy vs kept principal components, per units choice", "log"),
    ("units", "units", "Which units: heads / MLPs / both / all", "categorical"),
    ("pca_reference", "pca_reference", "Bases fitted on ImageNet vs the target (pca_reference)", "categorical"),
    ("lr", "lr_sensitivity", "Learning-rate sensitivity", "log"),
    ("init", "init_sensitivity", "λ initialisation", "categorical"),
    ("max_epochs", "epochs_sensitivity", "Epoch budget (trainer.max_epochs)", "linear"),
)


def ablation_figures(df: pd.DataFrame, all_cells: pd.DataFrame, out: Path | None) -> list[Figure]:
    """Every figure of the module docstring, in order, drawn into ``out`` or skipped (``out`` None:
    which would be drawn, with their tables, drawing nothing)."""
    trained = all_cells[all_cells.method != "base"]
    figs = [factor_figure(trained, out, *spec) for spec in FACTORS[:1]]
    figs.append(pareto_figure(all_cells, out))
    figs += [factor_figure(trained, out, *spec) for spec in FACTORS[1:]]
    figs.append(dynamics_figure(df, out))
    return figs
