"""The `units` and `rank` groups end to end: a layer range, name patterns, the top heads a
coarse_selection analysis ranked; records and λ files list the selected units; a selection that
matches nothing is refused before anything is encoded."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from residual_exp.results import load_lambda
from tests.conftest import ROOT

SMALL = ["dataset.params.n_train=120", "dataset.params.n_val=60", "dataset.params.n_test=60",
         "dataset.params.n_reference=200", "trainer=fast", "logger=none"]


def _cli(args, root: Path, check: bool = True):
    env = dict(os.environ, RESIDUAL_EXP_ROOT=str(root), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-m", "residual_exp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _run(root: Path, name: str) -> tuple[Path, list[dict]]:
    (path,) = (root / "outputs" / "runs" / name).rglob("results.json")
    return path.parent, json.loads(path.read_text())


def test_a_layer_range_of_heads_trains_only_those_heads(tmp_path):
    _cli(["method=residual_full", "units=layers", "units.layers=[3,3]", "units.kinds=[head]", *SMALL], tmp_path)
    run_dir, (_, rec) = _run(tmp_path, "tiny_clip-shapes_shape-residual_full")
    heads = [f"L3H{h}" for h in range(4)]
    assert rec["selected_units"] == heads and rec["n_selected_units"] == 4 and rec["units"] == "layers"
    lam = load_lambda(run_dir)
    assert lam.units == heads
    kept = int(lam.mask.sum())                                 # Σ kept PCs of those heads (rank=all: head_dim each)
    assert rec["trainable_params"] == rec["kept_components"] == kept == 4 * 32 and rec["rank"] == "all"


def test_names_and_rank_choose_units_and_components(tmp_path):
    _cli(["method=residual_fine", "units=names", "units.include=[L2*,L3.mlp]", "units.exclude=[L2H0]", "rank=k",
          "rank.k=3", *SMALL], tmp_path)
    run_dir, (_, rec) = _run(tmp_path, "tiny_clip-shapes_shape-residual_fine")
    assert rec["selected_units"] == ["L2H1", "L2H2", "L2H3", "L2.mlp", "L3.mlp"]
    assert rec["rank"] == "k=3" and rec["trainable_params"] == rec["kept_components"] == 5 * 3
    assert load_lambda(run_dir).units == rec["selected_units"]


def test_coarse_top_trains_the_heads_the_analysis_ranked_on_top(tmp_path):
    _cli(["task=analysis", "analysis=coarse_selection", "dataset=shapes_color", "analysis.scores=[zero_shot]",
          "analysis.random_seeds=[]", "analysis.max_samples=60", "analysis.keep_fractions=[0.25]",
          "hydra.run.dir=" + str(tmp_path / "coarse"), *SMALL], tmp_path)
    with open(tmp_path / "coarse" / "head_scores.csv", newline="") as f:
        ranked = sorted(csv.DictReader(f), key=lambda r: int(r["zero_shot_rank"]))
    top = {r["unit"] for r in ranked[:4]}                       # 25 % of the 16 heads
    _cli(["method=residual_fine", "dataset=shapes_color", "units=coarse_top", f"units.run_dir={tmp_path / 'coarse'}",
          "units.fraction=0.25", "units.score=zero_shot", "rank=all", *SMALL], tmp_path)
    run_dir, (_, rec) = _run(tmp_path, "tiny_clip-shapes_color-residual_fine")
    assert set(rec["selected_units"]) == top and rec["n_selected_units"] == 4 and rec["units"] == "coarse_top"
    assert set(load_lambda(run_dir).units) == top


def test_bad_selections_exit_2_before_any_encoding(tmp_path):
    for args, expected in [
        (["units=layers", "units.layers=[7,9]"], "units=layers: units.kinds=[head,mlp], units.layers=[7,9] selects no unit"),
        (["units=names", "units.include=[L9H*]"], "units=names: units.include=[L9H*] selects no unit"),
        (["units=coarse_top", f"units.run_dir={tmp_path}"], "not the run dir of a coarse_selection analysis"),
        (["method=base", "units=heads"], "method=base acts on the output feature: takes units=output"),
        (["method.units=heads"], "did you mean units=NAME"),
    ]:
        proc = _cli([*args, *SMALL], tmp_path, check=False)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert expected in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "outputs" / "cache").exists()          # nothing was encoded, no run was kept


def test_a_model_without_a_stated_shape_is_refused_after_building_before_encoding(tmp_path):
    proc = _cli(["model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=null", "model.image_size=32",
                 "+model.params.create_kwargs.depth=2", "units=layers", "units.layers=[5,6]", *SMALL],
                tmp_path, check=False)
    assert proc.returncode == 2 and "selects no unit of this model (2 layers × 3 heads" in proc.stderr, proc.stderr
    assert not list((tmp_path / "outputs" / "cache").rglob("*.npy"))     # no split was encoded
