"""Helpers of the sweep tests: run the CLI in a subprocess against a private root."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# tiny synthetic sizes + random tiny-CLIP weights (independent of the shipped checkpoint)
TINY = ["dataset.params.n_train=120", "dataset.params.n_val=60", "dataset.params.n_test=60",
        "dataset.params.n_reference=120", "model.pretrained=null", "trainer=fast", "trainer.max_epochs=3"]


def cli_env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(RESIDUAL_EXP_ROOT=str(root), WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               HYDRA_FULL_ERROR="1", **extra)
    return env


def cli(args: list[str], root: Path, check: bool = True, timeout: int = 600, env: dict | None = None):
    proc = subprocess.run([sys.executable, "-m", "residual_exp", *args], cwd=ROOT, env=env or cli_env(root),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def popen(args: list[str], root: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "residual_exp", *args], cwd=ROOT, env=env or cli_env(root),
                            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def results_in(folder: Path) -> dict[str, list[dict]]:
    """``{job dir name: records}`` of every results.json under ``folder``."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))}


def comparable(records: list[dict]) -> list[dict]:
    """Records without what legitimately differs between two runs of the same job."""
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]
