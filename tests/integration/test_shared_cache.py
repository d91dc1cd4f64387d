"""Shared work across jobs: concurrent processes build each cache entry once and all read it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.integration.sweep_helpers import TINY, comparable, popen

BUILDER = r"""
import json, os, sys, time
from pathlib import Path
from residual_exp.cache import Cache

root, log, delay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])

def build(tmp):
    with open(log, "a") as f:                      # one line per build, from any process
        f.write(f"{os.getpid()}\n")
    tmp.mkdir()
    (tmp / "a.txt").write_text("half")
    time.sleep(delay)                              # a slow build: the other process must wait
    (tmp / "a.txt").write_text("complete")
    (tmp / "b.txt").write_text("complete")

value = Cache(root).get_or_build("things", {"x": 1}, build,
                                 load=lambda p: sorted((q.name, q.read_text()) for q in p.iterdir()))
print(json.dumps(value))
"""


def _builders(tmp_path, n: int, delay: float) -> list[subprocess.Popen]:
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    return [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "builds.log"),
                              str(delay)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for _ in range(n)]


def test_concurrent_processes_build_a_cache_entry_once(tmp_path):
    procs = _builders(tmp_path, 3, delay=1.5)
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    builds = (tmp_path / "builds.log").read_text().split()
    assert len(builds) == 1, builds
    values = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    expected = [["a.txt", "complete"], ["b.txt", "complete"], ["spec.json", values[0][2][1]]]
    assert all(v == expected for v in values), values


def test_a_killed_builder_leaves_nothing_that_looks_built(tmp_path):
    (p,) = _builders(tmp_path, 1, delay=60)
    log = tmp_path / "builds.log"
    t0 = time.time()
    while not log.exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.3)                                   # mid-build, lock held
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    things = tmp_path / "cache" / "things"
    assert [q for q in things.iterdir() if not q.name.startswith(".") and not q.name.endswith(".lock")] == []
    # the next process is not blocked by the dead one's lock, rebuilds and cleans its leftovers
    (q,) = _builders(tmp_path, 1, delay=0)
    out, err = q.communicate(timeout=120)
    assert q.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])[0] == ["a.txt", "complete"]
    assert len(log.read_text().split()) == 2
    assert [x.name for x in things.iterdir() if x.name.endswith(".tmp")] == []


def test_two_jobs_of_the_same_model_at_once_share_the_cache(tmp_path):
    """Two CLI jobs (same model and dataset, two methods that need encodings, classifier and PCA
    bases) start together on one cache: each entry is built by exactly one of them."""
    root = tmp_path / "root"
    jobs = {"residual_full": "rf", "spectral_adapter": "sa"}
    # the reference: both jobs one after the other (one process) on a fresh cache and store
    alone = tmp_path / "alone"
    ref = popen(["-m", "logger=none", f"method={','.join(jobs)}", *TINY, f"hydra.sweep.dir={alone}",
                 "hydra.sweep.subdir=${method.name}"], alone, tmp_path / "alone.log")
    procs = {m: popen(["logger=none", f"method={m}", *TINY, f"hydra.run.dir={root / d}"], root, tmp_path / f"{d}.log")
             for m, d in jobs.items()}
    for m, p in procs.items():
        assert p.wait(timeout=600) == 0, (tmp_path / f"{jobs[m]}.log").read_text()[-3000:]
    logs = {m: (tmp_path / f"{d}.log").read_text() for m, d in jobs.items()}
    cache = root / "outputs" / "cache"
    entries = {kind: sorted(p.name for p in (cache / kind).iterdir()
                            if not p.name.startswith(".") and not p.name.endswith((".lock", ".json")))
               for kind in ("encodings", "bases", "classifiers")}
    assert {k: len(v) for k, v in entries.items()} == {"encodings": 3, "bases": 1, "classifiers": 1}, entries
    for kind, names in entries.items():
        for name in names:
            built = sum(log.count(f"cache build: {kind}/{name}") for log in logs.values())
            assert built == 1, (kind, name, built)
    assert sum(log.count("cache hit") for log in logs.values()) >= 5   # the other job read every entry

    # both results are correct: the same as each job run alone on a fresh cache
    results = {m: json.loads((root / d / "results.json").read_text()) for m, d in jobs.items()}
    assert comparable(results["residual_full"])[0] == comparable(results["spectral_adapter"])[0]   # zero-shot
    assert ref.wait(timeout=600) == 0, (tmp_path / "alone.log").read_text()[-3000:]
    for m in jobs:
        assert comparable(json.loads((alone / m / "results.json").read_text())) == comparable(results[m]), m


def test_submitit_local_launcher_runs_a_sweep_on_one_machine(tmp_path):
    """`hydra/launcher=submitit_local`: each job in its own process (as on SLURM), results stored."""
    from tests.integration.sweep_helpers import cli
    sweep = tmp_path / "sweep"
    cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "logger=none",
         "method=base,residual_coarse", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("results.json")}
    assert sorted(results) == ["0-tiny_clip-shapes_shape-base-s0", "1-tiny_clip-shapes_shape-residual_coarse-s0"]
    assert results["1-tiny_clip-shapes_shape-residual_coarse-s0"][-1]["method"] == "residual_coarse"
    assert len(list((sweep / ".submitit").rglob("*_log.out"))) == 2
    assert len(list((tmp_path / "outputs" / "results").glob("*.json"))) == 2
