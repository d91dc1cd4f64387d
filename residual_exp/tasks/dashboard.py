"""``task=dashboard``: a W&B workspace (saved view) of a sweep.

    python -m residual_exp task=dashboard sweep_dir=outputs/sweeps/…
    python -m residual_exp task=dashboard sweep_dir=DIR task.entity=me task.project=residual_exp

The view (:mod:`residual_exp.analysis.dashboard`) holds the paper table, the cells table, one
panel per ablation figure ``task=report`` draws for the sweep, the training curves and the λ
histograms, over the sweep's runs only.  Its spec (the JSON the W&B API stores) is always
written to ``<task.out_dir or sweep_dir/report>/wandb_workspace.json`` after being read back
through the library; online (an API key, ``WANDB_MODE`` not offline) the view is also saved and
its URL printed.  No network is touched offline.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..atomic import atomic_write_text
from .report import input_dirs, load, output_dir

log = logging.getLogger(__name__)
SPEC_FILE = "wandb_workspace.json"


def dashboard(cfg) -> int:
    from ..analysis import dashboard as D
    from ..analysis import report as R
    from ..analysis.ablations import ablation_figures
    from ..train.loggers import wandb_mode

    dirs, why = input_dirs(cfg)
    df, notes = load(dirs) if not why else (None, why)
    if df is None:
        print(f"dashboard: {notes}", file=sys.stderr)
        return 2
    t = cfg.task
    run_dirs = list(dict.fromkeys(df[df.method != "base"].run_dir))
    by_run = D.wandb_run_ids(run_dirs)
    run_ids = list(dict.fromkeys(i for ids in by_run.values() for i in ids))
    without = [d for d, ids in by_run.items() if not ids]
    paper, choices = R.paper_frame(df)
    cells = R.cells(df)
    sweep = Path(str(cfg.sweep_dir)).expanduser().resolve()
    view = D.workspace(entity=D.entity_of(run_dirs, t.get("entity")), project=D.project_of(run_dirs, t.get("project")),
                       name=t.get("title") or f"residual_exp · {sweep.name}", run_ids=run_ids, run_dirs=run_dirs,
                       paper_md=R.paper_table(paper, choices), cells_md=R.cells_markdown(cells),
                       figures=ablation_figures(df, cells, None))
    spec = D.spec(view)
    problems = D.check_spec(spec, view)
    if problems:
        print("dashboard: the workspace does not read back: " + "; ".join(problems), file=sys.stderr)
        return 1
    out = output_dir(cfg) / SPEC_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(spec, indent=1))
    n_panels = sum(len(s.panels) for s in view.sections)
    print(f"W&B workspace '{view.name}' ({view.entity or '<entity>'}/{view.project}): {len(view.sections)} sections, "
          f"{n_panels} panels over {len(run_ids) or len(run_dirs)} runs "
          f"({'W&B run ids' if run_ids else 'setting/run_dir, no W&B run folder found'}); spec: {out}")
    if run_ids and without:
        print(f"note: {len(without)} of {len(run_dirs)} trained runs have no W&B run (logged with logger=csv / none) "
              f"and are not in the view, e.g. {without[0]}")
    if wandb_mode() in ("offline", "disabled"):
        print("offline: the view was not saved; with an API key (WANDB_API_KEY or `wandb login`) run this again "
              "to save it" + ("" if view.entity else " (and pass task.entity=… or WANDB_ENTITY)"))
        return 0
    if not view.entity:
        import wandb
        view.entity = wandb.Api().default_entity
    try:
        view.save()
    except Exception as e:                      # network, permissions: the spec is on disk
        print(f"dashboard: saving the view failed ({type(e).__name__}: {e}); its spec is in {out}", file=sys.stderr)
        return 1
    print(f"saved: {view.url}")
    return 0
