"""A non-editable install works on its own: configs, the tiny CLIP checkpoint and the entry
point ship inside the package, so `python -m residual_exp` runs from any folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT, TINY_DATA


def test_non_editable_install_runs_from_another_folder(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"        # build from a copy: no build/ left in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "build",
                                                             "*.egg-info", "__pycache__", "wandb"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert (site / "residual_exp" / "conf" / "config.yaml").is_file()
    assert (site / "residual_exp" / "assets" / "tiny_clip.safetensors").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), WANDB_MODE="offline", RESIDUAL_EXP_ROOT=str(work))
    run = lambda *args: subprocess.run([sys.executable, "-m", "residual_exp", *args], cwd=work, env=env,
                                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    where = subprocess.run([sys.executable, "-c", "import residual_exp; print(residual_exp.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where                     # the installed copy, not the checkout
    help_ = run("--help")
    assert help_.returncode == 0 and "method:" in help_.stdout, help_.stderr[-2000:]
    job = run("trainer=fast", "logger=none", *TINY_DATA)
    assert job.returncode == 0, job.stderr[-3000:]
    results = list((work / "outputs" / "runs").rglob("results.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())[1]["method"] == "residual_full"
