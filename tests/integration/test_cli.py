"""The CLI end to end on tiny sizes: results.json contract, table, exit codes, messages."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from residual_exp.results import RESULT_KEYS
from tests.conftest import ROOT, TINY_DATA


def _cli(args, tmp_path, check=True):
    env = dict(os.environ, RESIDUAL_EXP_ROOT=str(tmp_path), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "residual_exp", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_default_pipeline_writes_results_json(tmp_path):
    proc = _cli(["trainer=fast", "logger=csv", *TINY_DATA], tmp_path)
    runs = list((tmp_path / "outputs" / "runs").rglob("results.json"))
    assert len(runs) == 1
    records = json.loads(runs[0].read_text())
    assert [r["method"] for r in records] == ["base", "residual_full"]
    for r in records:
        assert set(RESULT_KEYS) <= set(r), set(RESULT_KEYS) - set(r)
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["model"] == "tiny_clip"
    assert records[0]["trainable_params"] == 0
    assert records[1]["trainable_params"] == 16 * 32 + 4 * 64           # rank-aware: head_dim per head, D per MLP
    assert records[0]["test_accuracy"] == records[1]["zero_shot_test_accuracy"]
    for r in records:                      # what the numbers were computed under (FIDELITY.md)
        assert (r["units_convention"], r["classifier"], r["evr_rule"], r["compat"], r["cache_layout"]) == \
            ("official", "text", "strict", "none", "lowrank")
    run_dir = runs[0].parent
    assert (run_dir / "lambda.safetensors").exists() and (run_dir / "config.json").exists()
    assert "zero-shot test" in proc.stdout and "residual_full" in proc.stdout   # the printed table
    # caches were written and are reused by a second run (no re-encoding)
    assert list((tmp_path / "outputs" / "cache" / "encodings").glob("*.json"))


def test_misspelt_override_fails_with_the_key_named(tmp_path):
    proc = _cli(["trainer.max_epoch=3"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "max_epoch" in proc.stderr and "Traceback" not in proc.stderr.split("Key")[0][-200:]


def test_multirun_over_methods(tmp_path):
    _cli(["-m", "method=base,residual_coarse", "trainer=fast", "logger=none", *TINY_DATA], tmp_path)
    results = sorted((tmp_path / "outputs" / "sweeps").rglob("results.json"))
    assert len(results) == 2
    methods = {json.loads(p.read_text())[-1]["method"] for p in results}
    assert methods == {"base", "residual_coarse"}


def test_help_is_generated_from_the_catalog(tmp_path):
    """--help: a usage line, every task with its line, every group with its options (no schema
    nodes), the paper presets summarised, examples — read from the catalog, never stale."""
    from residual_exp.catalog import options, spec
    from residual_exp.config import TASKS
    out = _cli(["--help"], tmp_path).stdout
    assert out.startswith("usage: python -m residual_exp")
    assert "_schema" not in out and "powered by Hydra" not in out
    for name, schema in TASKS.items():
        assert f"  {name} " in out and schema.__doc__.split()[0] in out
    for group in ("model", "dataset", "method", "units", "rank", "pca", "trainer", "logger", "analysis",
                  "hydra/launcher"):
        assert f"  {group}:" in out
        for name in options(group):
            assert name in out
    flat = " ".join(out.split())
    for name in options("method"):
        assert spec("method", name).description in flat
    n_paper = len(options("experiment/paper"))
    assert f"= {n_paper} presets" in out and "paper/<model>_<dataset>" in out
    assert "examples:" in out and "python -m residual_exp -m " in out
    assert "ablation/<name>" in out and all(a in out for a in options("experiment/ablation"))
    assert "heads_mlps*" in out and "all*" in out               # the default method's units and rank


def test_readme_method_table_is_the_catalogs():
    """The README's methods table is generated from the catalog (residual_exp.help.method_table)."""
    from residual_exp.help import method_table
    assert method_table() in (ROOT / "README.md").read_text()
