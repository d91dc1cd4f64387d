"""task=report on an ablation sweep (records carrying units / rank / pca_reference / init / lr /
max_epochs, history.csv per run) and task=dashboard's W&B workspace spec, built offline."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from residual_exp.results import write_history
from residual_exp.run import run
from tests.conftest import compose_cfg

ZS_VAL, ZS_TEST, CLASSES = 0.35, 0.3525, 4
# (method, units, n_units, rank, kept, params, pca_reference, init, lr, val, test) — one trained cell each
CELLS = [
    ("residual_fine", "heads", 16, "evr=0.5", 40, 40, "imagenet", "normal", 0.8, 0.40, 0.41),
    ("residual_fine", "heads", 16, "evr=0.9", 120, 120, "imagenet", "normal", 0.8, 0.47, 0.43),   # best on val
    ("residual_fine", "heads", 16, "all", 512, 512, "imagenet", "normal", 0.8, 0.45, 0.46),      # best on test
    ("residual_full", "heads_mlps", 20, "evr=0.9", 200, 200, "imagenet", "normal", 0.8, 0.43, 0.42),
    ("residual_full", "heads_mlps", 20, "all", 768, 768, "imagenet", "normal", 0.8, 0.44, 0.44),
    ("residual_full", "heads", 16, "all", 512, 512, "imagenet", "normal", 0.8, 0.42, 0.42),
    ("residual_full", "mlps", 4, "all", 256, 256, "imagenet", "normal", 0.8, 0.38, 0.37),
    ("residual_full", "all", 21, "all", 832, 832, "imagenet", "normal", 0.8, 0.43, 0.43),
    ("residual_full", "heads_mlps", 20, "all", 768, 768, "target", "normal", 0.8, 0.41, 0.40),
    ("residual_full", "heads_mlps", 20, "all", 768, 768, "imagenet", "normal", 0.08, 0.39, 0.39),
    ("residual_full", "heads_mlps", 20, "all", 768, 768, "imagenet", "normal", 8.0, 0.30, 0.31),  # below zero-shot
    ("residual_full", "heads_mlps", 20, "all", 768, 768, "imagenet", "normal", 30.0, 0.20, 0.21),  # below chance
    ("residual_full", "heads_mlps", 20, "all", 768, 768, "imagenet", "ones", 0.8, 0.42, 0.43),
    ("residual_coarse", "heads", 16, None, None, 16, None, "normal", 0.8, 0.36, 0.355),
]


def _units(kind, n):
    names = [f"L{l}H{h}" for l in range(4) for h in range(4)] + [f"L{l}.mlp" for l in range(4)] + ["embed"]
    return {"heads": names[:16], "mlps": names[16:20], "heads_mlps": names[:20], "all": names}[kind][:n]


def _record(method, **kw):
    rec = dict(model="tiny_clip", dataset="shapes_shape", seed=0, zero_shot_val_accuracy=ZS_VAL,
               zero_shot_test_accuracy=ZS_TEST, num_classes=CLASSES, units_convention="official", classifier="text",
               evr_rule="strict", compat="none", cache_layout="lowrank", method=method, wall_seconds=1.0)
    rec.update(kw)
    return rec


def _history(run_dir, best_val, epochs=5):
    vals = np.linspace(ZS_VAL, best_val, epochs)
    rows = [{"epoch": e, "train_loss": 1.4 - 0.02 * e, "val_loss": 1.45 - 0.01 * e, "val_accuracy": float(v)}
            for e, v in enumerate(vals)]
    write_history(rows, run_dir / "history.csv")
    return rows


def _write_sweep(root):
    sweep = root / "sweep"
    for i, (method, units, n, rank, kept, params, ref, init, lr, val, test) in enumerate(CELLS):
        seeds = (0, 1) if (rank, units, ref, init, lr) == ("all", "heads_mlps", "target", "normal", 0.8) else (0,)
        for seed in seeds:
            d = sweep / f"{i}-s{seed}-{method}"
            d.mkdir(parents=True)
            rec = _record(method, seed=seed, units=units, selected_units=_units(units, n), n_selected_units=n,
                          rank=rank, pca_reference=ref, init=init, lr=lr, max_epochs=5, trainable_params=params,
                          val_accuracy=val + 0.02 * seed, test_accuracy=test + 0.02 * seed, best_epoch=4, epochs=5)
            if kept is not None:
                rec["kept_components"] = kept
            base = _record("base", seed=seed, trainable_params=0, val_accuracy=ZS_VAL, test_accuracy=ZS_TEST)
            (d / "results.json").write_text(json.dumps([base, rec]))
            _history(d, val + 0.02 * seed)
            (d / "wandb" / f"offline-run-20260101_000000-id{i:02d}s{seed}").mkdir(parents=True)
    return sweep


@pytest.fixture
def sweep(tmp_path):
    return _write_sweep(tmp_path)


def _report(tmp_path, *overrides):
    return run(compose_cfg(["task=report", *overrides], tmp_path))


def _front(params, val):
    """Independent Pareto front: walk the parameter counts upwards, keeping the best val so far."""
    params, val = np.asarray(params, float), np.asarray(val, float)
    front, best = np.zeros(len(params), bool), -np.inf
    for p in np.unique(params):
        at = params == p
        top = val[at].max()
        if top > best:
            front[at & (val == top)] = True
            best = top
    return front


def test_ablation_report_writes_every_figure_with_its_table(sweep, tmp_path, capsys):
    assert _report(tmp_path, f"sweep_dir={sweep}") == 0
    out = capsys.readouterr().out
    rep = sweep / "report"
    drawn = ("accuracy_vs_components", "pareto_params", "units", "pca_reference", "lr_sensitivity", "init_sensitivity",
             "training_dynamics")
    for name in drawn:
        png = rep / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
        assert (rep / f"{name}.csv").stat().st_size > 0, name
    assert not (rep / "epochs_sensitivity.png").exists()
    skip = "epochs_sensitivity: skipped — no two cells differ only in max_epochs (values found: 5)"
    assert skip in out and skip in (rep / "figures.md").read_text()
    figures_md = (rep / "figures.md").read_text()
    assert all(f"![{n}]({n}.png)" in figures_md for n in drawn)

    # one row per cell, with selected-unit count, kept components and λ count; seeds aggregated
    cells = pd.read_csv(rep / "cells.csv")
    assert len(cells) == len(CELLS) + 1                                              # + zero-shot
    two = cells[(cells.pca_reference == "target")]
    assert two.seeds.tolist() == [2] and two.val_accuracy.tolist() == [pytest.approx(0.42)]
    fine = cells[cells.method == "residual_fine"].set_index("rank")
    assert fine.kept_components.to_dict() == {"evr=0.5": 40, "evr=0.9": 120, "all": 512}
    assert fine.n_selected_units.tolist() == [16] * 3 and fine.trainable_params.tolist() == [40, 120, 512]

    # the best setting is chosen on val (residual_fine evr=0.9), not on test (residual_fine all)
    best = cells[cells.best_on_val]
    assert len(best) == 1 and best.method.item() == "residual_fine" and best["rank"].item() == "evr=0.9"
    assert cells.loc[cells.test_accuracy.idxmax(), "rank"] == "all"
    md = (rep / "cells.md").read_text()
    assert ("- tiny_clip / shapes_shape: **residual_fine units=heads rank=evr=0.9 pca_reference=imagenet init=normal "
            "lr=0.8 max_epochs=5** — val 47.0, test 43.0") in md and "Best setting, chosen on val only" in out

    # marks: below zero-shot (the trainer's 0.02 margin on val) and below chance, with what to check
    marks = cells.set_index("lr").marks.fillna("")
    assert marks[8.0] == "below zero-shot (val 0.300 < 0.350): check method.lr, method.init and trainer.max_epochs"
    assert marks[30.0].startswith("below zero-shot (val 0.200 < 0.350)")
    assert marks[30.0].endswith("below chance (val 0.200 < 0.250 = 1/4): check method.lr and the data")
    assert (cells.marks.fillna("") != "").sum() == 2 and "2 of 15 cells marked" in md      # coarse: 0.36 ≥ 0.35 - 0.02

    # Pareto front on val, checked against an independent walk
    pareto = pd.read_csv(rep / "pareto_params.csv")
    assert len(pareto) == len(cells)
    expected = _front(pareto.trainable_params, pareto.val_accuracy)
    assert pareto.pareto_val.tolist() == expected.tolist()
    assert set(pareto[pareto.pareto_val].trainable_params) == {0, 16, 40, 120}

    # accuracy vs kept components: the cells that differ only in rank, per units choice
    comp = pd.read_csv(rep / "accuracy_vs_components.csv")
    assert sorted(zip(comp.series, comp.kept_components)) == [
        ("residual_fine units=heads", 40), ("residual_fine units=heads", 120), ("residual_fine units=heads", 512),
        ("residual_full units=heads_mlps", 200), ("residual_full units=heads_mlps", 768)]
    units = pd.read_csv(rep / "units.csv")
    assert sorted(units.units) == ["all", "heads", "heads_mlps", "mlps"]
    assert units.set_index("units").n_selected_units.to_dict() == {"heads": 16, "mlps": 4, "heads_mlps": 20, "all": 21}
    assert sorted(pd.read_csv(rep / "pca_reference.csv").pca_reference) == ["imagenet", "target"]
    assert sorted(pd.read_csv(rep / "lr_sensitivity.csv").lr) == [0.08, 0.8, 8.0, 30.0]
    assert sorted(pd.read_csv(rep / "init_sensitivity.csv").init) == ["normal", "ones"]
    dyn = pd.read_csv(rep / "training_dynamics.csv")
    assert len(dyn) == 5 * (len(CELLS) + 1) and set(dyn.epoch) == set(range(5))

    # the paper table shows, per method, the setting chosen on val, and says so
    results_md = (rep / "results.md").read_text()
    assert "‡ tiny_clip/shapes_shape/residual_full: best of 10 settings on val" in results_md
    row = next(line for line in results_md.splitlines() if line.startswith("| tiny_clip | shapes_shape"))
    assert row.split(" | ")[-1].strip(" |") == "44.0"                   # residual_full heads_mlps all (val 0.44)


def test_report_rounds_float32_noise_and_uses_recorded_flags(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    d = sweep / "0-run"
    d.mkdir(parents=True)
    rec = _record("residual_full", trainable_params=768, val_accuracy=0.39500001430511475,
                  test_accuracy=0.40849998593330383, flags=["recorded by the trainer: check it"])
    base = _record("base", trainable_params=0, val_accuracy=ZS_VAL, test_accuracy=ZS_TEST)
    (d / "results.json").write_text(json.dumps([base, rec]))
    assert _report(tmp_path, f"sweep_dir={sweep}") == 0
    text = (sweep / "report" / "results.csv").read_text()
    assert ",0.395," in text and ",0.4085," in text and "0.39500001" not in text and "0.408499" not in text
    cells = pd.read_csv(sweep / "report" / "cells.csv")
    assert cells.set_index("method").marks.fillna("").to_dict() == {"base": "",
                                                                    "residual_full": "recorded by the trainer: check it"}
    out = capsys.readouterr().out
    for name in ("accuracy_vs_components", "units", "pca_reference", "lr_sensitivity", "init_sensitivity",
                 "epochs_sensitivity"):
        assert f"{name}: skipped — no trained cell records" in out, name
    assert "training_dynamics: skipped — no trained run has a history.csv" in out


def test_dashboard_builds_the_workspace_spec_offline(sweep, tmp_path, monkeypatch, capsys):
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "ablations")

    def no_network(*a, **k):
        raise AssertionError("the dashboard tried to reach W&B offline")
    monkeypatch.setattr(ws.Workspace, "save", no_network)
    monkeypatch.setattr(internal, "upsert_view2", no_network)
    assert run(compose_cfg(["task=dashboard", f"sweep_dir={sweep}"], tmp_path)) == 0
    out = capsys.readouterr().out
    assert "offline: the view was not saved" in out
    spec = json.loads((sweep / "report" / "wandb_workspace.json").read_text())
    assert spec["project"] == "ablations" and spec["displayName"] == "residual_exp · sweep"
    section = spec["spec"]["section"]
    runset = section["runSets"][0]
    (flt,) = runset["filters"]["filters"]
    ids = {f"id{i:02d}s0" for i in range(len(CELLS))} | {"id08s1"}
    assert flt["key"] == {"section": "run", "name": "name"} and flt["op"] == "IN" and set(flt["value"]) == ids
    sections = {s["name"]: s["panels"] for s in section["panelBankConfig"]["sections"]}
    assert list(sections) == ["Paper table", "Ablations", "Training dynamics", "λ"]
    paper = [p["config"].get("value", "") for p in sections["Paper table"] if p["viewType"] == "Markdown Panel"]
    assert "## Test accuracy (%)" in paper[0] and "Best setting, chosen on val only" in paper[1]
    abl = sections["Ablations"]
    scatter_x = [p["config"]["xAxis"] for p in abl if p["viewType"] == "Scatter Plot"]
    assert scatter_x == ["config:setting/kept_components.value", "summary:final/trainable_params",
                         "summary:final/trainable_params", "config:setting/lr.value", "config:setting/lr.value"]
    bars = [p["config"]["groupBy"] for p in abl if p["viewType"] == "Bar Chart"]
    assert bars == ["setting/units.value", "setting/pca_reference.value", "setting/init.value"]
    assert "epochs_sensitivity: skipped" in abl[-1]["config"]["value"]
    assert [p["config"]["metrics"] for p in sections["Training dynamics"]] == [
        ["history/val_accuracy"], ["history/val_loss"], ["history/train_loss"]]
    assert all(p["config"]["xAxis"] == "history/epoch" for p in sections["Training dynamics"])
    assert sections["λ"][0]["config"]["metrics"] == ["lambda/hist"]
    # the spec reads back through the library into the same sections and panels
    back = ws.Workspace._from_model(internal.View.model_validate(spec))
    assert [len(s.panels) for s in back.sections] == [len(p) for p in sections.values()]


def test_dashboard_needs_a_sweep_dir_with_runs(tmp_path, capsys):
    from residual_exp.validate import ConfigError
    with pytest.raises(ConfigError, match="task=dashboard needs sweep_dir="):
        run(compose_cfg(["task=dashboard"], tmp_path))
    with pytest.raises(ConfigError, match=r"sweep_dir=.*nope: no such directory"):
        run(compose_cfg(["task=dashboard", f"sweep_dir={tmp_path / 'nope'}"], tmp_path))
    (tmp_path / "empty").mkdir()
    assert run(compose_cfg(["task=dashboard", f"sweep_dir={tmp_path / 'empty'}"], tmp_path)) == 2
    assert "dashboard: no results.json under" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report").exists()


def _e2e(tmp_path, extra, logger="wandb"):
    from tests.integration.sweep_helpers import cli
    sweep = tmp_path / "sweep"
    cli(["-m", "method=base,residual_coarse,residual_full", "trainer=fast", f"logger={logger}",
         f"hydra.sweep.dir={sweep}", *extra], tmp_path, timeout=3000)
    proc = cli(["task=report", f"sweep_dir={sweep}"], tmp_path)
    rep = sweep / "report"
    cells = pd.read_csv(rep / "cells.csv")
    assert sorted(cells.method) == ["base", "residual_coarse", "residual_full"]
    full = cells.set_index("method").loc["residual_full"]
    assert (full.units, full.n_selected_units, full["rank"], full.kept_components, full.trainable_params) == (
        "heads_mlps", 20, "all", 768, 768)                       # 16 heads × 32 PCs + 4 MLPs × 64 PCs
    coarse = cells.set_index("method").loc["residual_coarse"]
    assert (coarse.units, coarse.n_selected_units, coarse.trainable_params) == ("heads", 16, 16)
    assert cells.best_on_val.sum() == 1
    assert cells.loc[cells.best_on_val, "val_accuracy"].item() == cells.val_accuracy.max()
    for name in ("pareto_params", "training_dynamics"):
        assert (rep / f"{name}.png").stat().st_size > 10_000 and (rep / f"{name}.csv").is_file()
    dyn = pd.read_csv(rep / "training_dynamics.csv")
    for r in json.loads(next(sweep.glob("*residual_full*/results.json")).read_text())[1:]:
        assert len(dyn[dyn.cell.str.startswith("residual_full")]) == r["epochs"]
    for name in ("accuracy_vs_components", "units", "pca_reference", "lr_sensitivity", "init_sensitivity"):
        assert f"{name}: skipped — no two cells differ only in" in proc.stdout, name
    for name in ("results.md", "accuracy_vs_params.png", "gain_over_zero_shot.png", "lambda_spectra.png"):
        assert (rep / name).is_file(), name
    return sweep


def test_report_and_dashboard_over_a_real_small_sweep(tmp_path):
    """The default method trio on the embedded task (tiny sizes, random tiny CLIP), W&B offline."""
    from tests.integration.sweep_helpers import TINY, cli
    sweep = _e2e(tmp_path, [a for a in TINY if a != "trainer=fast"])
    proc = cli(["task=dashboard", f"sweep_dir={sweep}"], tmp_path)
    assert "offline: the view was not saved" in proc.stdout
    spec = json.loads((sweep / "report" / "wandb_workspace.json").read_text())
    ids = {p.name.rsplit("-", 1)[1] for p in sweep.glob("*/wandb/offline-run-*")}
    assert len(ids) == 2                                           # residual_coarse, residual_full (base: no W&B run)
    (flt,) = spec["spec"]["section"]["runSets"][0]["filters"]["filters"]
    assert set(flt["value"]) == ids


@pytest.mark.slow
def test_report_over_the_default_trio_on_the_embedded_default(tmp_path):
    """`python -m residual_exp -m method=base,residual_coarse,residual_full trainer=fast`, then the report."""
    _e2e(tmp_path, [], logger="csv")
