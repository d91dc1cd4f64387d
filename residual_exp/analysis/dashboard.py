"""A W&B workspace (saved view) of one sweep, built with ``wandb-workspaces``.

The view shows the sweep's runs only (their W&B run ids, found in each run dir's ``wandb/``
folder — for a resumed cell, in the run it was copied from — or, without any, their
``setting/run_dir`` config key) in four sections:

* **Paper table** — the report's ``results.md`` and cells table (best setting chosen on val,
  marks) as markdown panels, test accuracy per method, a parallel-coordinates plot over the
  setting keys;
* **Ablations** — one native panel per ablation figure the report draws for this sweep (the
  same decision, :func:`residual_exp.analysis.ablations.ablation_figures`), on the runs'
  ``setting/*`` config keys and ``final/*`` summary metrics, each with its table;
* **Training dynamics** — ``history/val_accuracy`` and the losses against ``history/epoch``;
* **λ** — the per-epoch ``lambda/hist`` histograms and the λ summaries.

:func:`spec` is the view as the W&B API stores it (JSON); :func:`check_spec` reads it back
through the library (every section and panel must survive the round trip).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces import expr

from ..results import read_run_config

PREFIX = "setting/"
PANELS = {   # report figure → how W&B draws it: (x, y, kind) per panel
    "accuracy_vs_components": [("kept_components", "final/test_accuracy", "scatter-log")],
    "pareto_params": [("final/trainable_params", "final/val_accuracy", "scatter-log"),
                      ("final/trainable_params", "final/test_accuracy", "scatter-log")],
    "units": [("units", "final/test_accuracy", "bar")],
    "pca_reference": [("pca_reference", "final/test_accuracy", "bar")],
    "lr_sensitivity": [("lr", "final/val_accuracy", "scatter-log"), ("lr", "final/test_accuracy", "scatter-log")],
    "init_sensitivity": [("init", "final/test_accuracy", "bar")],
    "epochs_sensitivity": [("max_epochs", "final/val_accuracy", "scatter")],
}
PARALLEL = ("method", "units", "rank", "kept_components", "pca_reference", "init", "lr", "max_epochs")


def wandb_run_ids(run_dirs) -> dict[str, list[str]]:
    """``{run dir: its W&B run ids}`` (``wandb/run-<time>-<id>`` or ``offline-run-…``; a resumed
    cell's come from the run its results were copied from; [] for runs logged without W&B)."""
    out = {}
    for d in map(Path, run_dirs):
        found = sorted((d / "wandb").glob("*run-*-*")) if (d / "wandb").is_dir() else []
        if not found and (d / "resumed.json").is_file():
            src = json.loads((d / "resumed.json").read_text()).get("from_run_dir")
            found = sorted((Path(src) / "wandb").glob("*run-*-*")) if src and (Path(src) / "wandb").is_dir() else []
        out[str(d)] = [p.name.rsplit("-", 1)[-1] for p in found if p.is_dir()]
    return out


def _runs_logger(run_dirs, key: str) -> str | None:
    """``logger.<key>`` of the first run whose config.json sets it."""
    for d in run_dirs:
        try:
            value = (read_run_config(Path(d)).get("logger") or {}).get(key)
        except (FileNotFoundError, ValueError):
            continue
        if value:
            return str(value)
    return None


def project_of(run_dirs, given: str | None) -> str:
    """``given``, else the runs' W&B project (their config.json), else ``WANDB_PROJECT``, else ``residual_exp``."""
    return given or _runs_logger(run_dirs, "project") or os.environ.get("WANDB_PROJECT") or "residual_exp"


def entity_of(run_dirs, given: str | None) -> str | None:
    """``given``, else ``WANDB_ENTITY``, else the runs' configured entity (None: unknown offline)."""
    return given or os.environ.get("WANDB_ENTITY") or _runs_logger(run_dirs, "entity")


def _panel(title: str, x: str, y: str, kind: str):
    xm = wr.SummaryMetric(x) if x.startswith("final/") else wr.Config(PREFIX + x)
    if kind == "bar":
        return wr.BarPlot(title=title, metrics=[wr.SummaryMetric(y)], groupby=wr.Config(PREFIX + x),
                          groupby_aggfunc="mean", groupby_rangefunc="minmax", orientation="v")
    return wr.ScatterPlot(title=title, x=xm, y=wr.SummaryMetric(y), log_x=kind == "scatter-log" or None)


def workspace(*, entity: str | None, project: str, name: str, run_ids: list[str], run_dirs: list[str],
              paper_md: str, cells_md: str, figures) -> ws.Workspace:
    """The view described in the module docstring (``figures``: the report's
    :class:`~residual_exp.analysis.ablations.Figure` list; skipped ones get no panel)."""
    drawn = [f for f in figures if not f.skipped and f.name in PANELS]
    ablations = []
    for f in drawn:
        ablations += [_panel(f"{f.title} ({y.split('/')[-1]})", x, y, kind) for x, y, kind in PANELS[f.name]]
        ablations.append(wr.MarkdownPanel(markdown=_without_images(f.markdown)))
    skipped = [f.skipped for f in figures if f.skipped]
    if skipped:
        ablations.append(wr.MarkdownPanel(markdown="### Not drawn for this sweep\n\n" + "\n".join(f"- {s}" for s in skipped)))
    paper = [wr.MarkdownPanel(markdown=paper_md), wr.MarkdownPanel(markdown=cells_md),
             wr.BarPlot(title="test accuracy per method (mean, min–max over runs)",
                        metrics=[wr.SummaryMetric("final/test_accuracy")], groupby=wr.Config(PREFIX + "method"),
                        groupby_aggfunc="mean", groupby_rangefunc="minmax", orientation="v"),
             wr.ParallelCoordinatesPlot(title="settings → accuracy", columns=[
                 wr.ParallelCoordinatesPlotColumn(metric=wr.Config(PREFIX + k)) for k in PARALLEL] + [
                 wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m))
                 for m in ("final/val_accuracy", "final/test_accuracy")])]
    dynamics = [wr.LinePlot(title="val accuracy per epoch", x="history/epoch", y=["history/val_accuracy"]),
                wr.LinePlot(title="val loss per epoch", x="history/epoch", y=["history/val_loss"]),
                wr.LinePlot(title="train loss per epoch (epoch mean)", x="history/epoch", y=["history/train_loss"])]
    lam = [wr.LinePlot(title="λ histogram per epoch", y=["lambda/hist"]),
           wr.LinePlot(title="λ mean and std", y=["lambda/mean", "lambda/std"]),
           wr.LinePlot(title="fraction of negative λ", y=["lambda/frac_negative"])]
    if run_ids:
        filters = [expr.Metric("ID").isin(run_ids)]
    else:
        filters = [expr.Config(PREFIX + "run_dir").isin(list(run_dirs))]
    return ws.Workspace(
        entity=entity or "", project=project, name=name,
        sections=[ws.Section(name="Paper table", panels=paper, is_open=True),
                  ws.Section(name="Ablations", panels=ablations, is_open=True),
                  ws.Section(name="Training dynamics", panels=dynamics, is_open=True),
                  ws.Section(name="λ", panels=lam, is_open=True)],
        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=max(10, min(200, len(run_ids) or len(run_dirs)))),
        runset_settings=ws.RunsetSettings(filters=filters, pinned_columns=(
            [f"config:{PREFIX}{k}.value" for k in ("method", "units", "rank", "pca_reference")]
            + [f"summary:final/{m}" for m in ("val_accuracy", "test_accuracy", "trainable_params")])))


def _without_images(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if not line.startswith("!["))


def spec(view: ws.Workspace) -> dict:
    """The view as the W&B API stores it (built locally, no network)."""
    return view._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def check_spec(data: dict, view: ws.Workspace) -> list[str]:
    """Problems found reading ``data`` back into a workspace (empty: none)."""
    from wandb_workspaces.workspaces import internal
    back = ws.Workspace._from_model(internal.View.model_validate(data))
    problems = []
    if [s.name for s in back.sections] != [s.name for s in view.sections]:
        problems.append(f"sections {[s.name for s in back.sections]} != {[s.name for s in view.sections]}")
    for a, b in zip(back.sections, view.sections):
        if [type(p).__name__ for p in a.panels] != [type(p).__name__ for p in b.panels]:
            problems.append(f"section {b.name}: panels {[type(p).__name__ for p in a.panels]} read back, "
                            f"{[type(p).__name__ for p in b.panels]} written")
    return problems
