"""Resumable sweeps: the results store skips finished jobs, redoes failed / killed ones, and a
killed sweep restarted gives the same results as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from omegaconf import open_dict

from residual_exp.run import run
from residual_exp.store import EXCLUDED_KEYS, resume_key, results_dir
from tests.conftest import compose_cfg
from tests.integration.sweep_helpers import TINY, cli, comparable, popen, results_in


def _cfg(tmp_path, *overrides):
    cfg = compose_cfg(["logger=none", *TINY, *overrides], tmp_path)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.trainer.progress_bar = False
    return cfg


def test_resume_key_ignores_run_location_but_not_the_experiment(tmp_path):
    base = _cfg(tmp_path)
    key = resume_key(base)
    same = [["logger=csv"], ["logger=wandb"], ["trainer.progress_bar=true"], ["trainer.num_workers=2"],
            ["dataset.num_workers=3"], ["device=cpu"], ["resume=false"], ["sweep_dir=/x"],
            ["cache.memory_budget_gb=0.001"], ["cache.enabled=false"]]
    for o in same:
        assert resume_key(_cfg(tmp_path, *o)) == key, o
    moved = _cfg(tmp_path)
    with open_dict(moved):
        moved.paths.output_dir = str(tmp_path / "elsewhere")
        moved.paths.cache_dir = moved.cache.dir = str(tmp_path / "other_cache")
    assert resume_key(moved) == key
    different = [["seed=1"], ["trainer.max_epochs=4"], ["dataset.params.n_train=121"], ["method=residual_fine"],
                 ["rank=evr", "rank.evr=0.5"], ["method.lr=0.1"], ["cache.dtype=float16"], ["dataset=shapes_color"],
                 ["model.pretrained=embedded"]]
    keys = {resume_key(_cfg(tmp_path, *o)) for o in different}
    assert key not in keys and len(keys) == len(different)
    assert "logger" in EXCLUDED_KEYS and "paths.output_dir" in EXCLUDED_KEYS


def _run(cfg, run_dir):
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return run(cfg)


def test_failed_job_is_not_stored_then_reruns_then_resumes(tmp_path, capsys, monkeypatch):
    import importlib
    train_task = importlib.import_module("residual_exp.tasks.train")   # the module, not the task function
    store = results_dir(_cfg(tmp_path))
    bad = _cfg(tmp_path, "method=residual_coarse")

    def crash(*args, **kwargs):                  # fails after encoding, before any result exists
        raise RuntimeError("injected failure")
    with monkeypatch.context() as m:
        m.setattr(train_task, "train_method", crash)
        with pytest.raises(RuntimeError, match="injected failure"):
            _run(bad, tmp_path / "r0")
    assert not (tmp_path / "r0" / "results.json").exists()
    assert not store.exists() or not list(store.glob("*.json"))

    cfg = _cfg(tmp_path, "method=residual_coarse")
    assert _run(cfg, tmp_path / "r1") == 0
    first = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert not (tmp_path / "r1" / "resumed.json").exists()
    entries = list(store.glob("*.json"))
    assert len(entries) == 1 and entries[0].stem == resume_key(cfg)
    assert (store / "artefacts" / f"{entries[0].stem}.lambda.safetensors").exists()

    capsys.readouterr()
    assert _run(_cfg(tmp_path, "method=residual_coarse"), tmp_path / "r2") == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "residual_coarse" in out                    # table printed
    assert json.loads((tmp_path / "r2" / "results.json").read_text()) == first
    assert (tmp_path / "r2" / "resumed.json").exists() and (tmp_path / "r2" / "lambda.safetensors").exists()
    assert (tmp_path / "r2" / "history.csv").read_bytes() == (tmp_path / "r1" / "history.csv").read_bytes()
    assert not (tmp_path / "r2" / "checkpoints").exists()                  # no work done

    # resume=false recomputes; a damaged entry is ignored and rewritten
    assert _run(_cfg(tmp_path, "method=residual_coarse", "resume=false"), tmp_path / "r3") == 0
    assert not (tmp_path / "r3" / "resumed.json").exists()
    entries[0].write_text('{"key": "truncated')
    assert _run(_cfg(tmp_path, "method=residual_coarse"), tmp_path / "r4") == 0
    assert not (tmp_path / "r4" / "resumed.json").exists()
    assert json.loads(entries[0].read_text())["records"][1]["method"] == "residual_coarse"

    # an entry whose records or artefacts changed after they were stored is not trusted
    entry = json.loads(entries[0].read_text())
    entry["records"][1]["test_accuracy"] = 0.999                        # a silently edited number
    entries[0].write_text(json.dumps(entry))
    capsys.readouterr()
    assert _run(_cfg(tmp_path, "method=residual_coarse"), tmp_path / "r5") == 0
    assert not (tmp_path / "r5" / "resumed.json").exists()             # recomputed, not copied
    assert json.loads((tmp_path / "r5" / "results.json").read_text())[1]["test_accuracy"] != 0.999
    lam = store / "artefacts" / f"{entries[0].stem}.lambda.safetensors"
    data = bytearray(lam.read_bytes())
    data[-3] ^= 0xFF
    os.remove(lam)                                                       # (a hard link of the run's file)
    lam.write_bytes(bytes(data))
    assert _run(_cfg(tmp_path, "method=residual_coarse"), tmp_path / "r6") == 0
    assert not (tmp_path / "r6" / "resumed.json").exists()


def _wait_for(predicate, timeout: float, poll: float = 0.02) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(poll)
    return False


def test_killed_sweep_restarts_without_redoing_finished_jobs(tmp_path):
    methods = "base,residual_coarse,residual_full"
    common = ["-m", "+experiment=sweep/synthetic", "dataset=shapes_shape", f"method={methods}", "logger=none", *TINY]
    root, sweep = tmp_path / "root", tmp_path / "root" / "sweep"
    store = root / "outputs" / "results"

    # 0. meanwhile, the same sweep never interrupted (its own root: fresh cache and store)
    ref_root = tmp_path / "ref"
    ref_proc = popen([*common, f"hydra.sweep.dir={ref_root / 'sweep'}"], ref_root, tmp_path / "ref.log")
    try:
        _interrupt_and_resume(tmp_path, common, root, sweep, store, ref_root, ref_proc)
    finally:
        if ref_proc.poll() is None:
            os.killpg(ref_proc.pid, signal.SIGKILL)
            ref_proc.wait()


def _interrupt_and_resume(tmp_path, common, root, sweep, store, ref_root, ref_proc):
    # 1. start the sweep, kill the whole process group as soon as the first job is stored
    proc = popen([*common, f"hydra.sweep.dir={sweep}"], root, tmp_path / "run1.log")
    try:
        assert _wait_for(lambda: store.exists() and any(store.glob("*.json")), 300), \
            (tmp_path / "run1.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("*.json")}
    jobs_before = {p.parent.name for p in sweep.rglob("results.json")}
    assert 1 <= len(done) < 3, "the sweep finished before it could be interrupted"
    assert len(jobs_before) == len(done)      # nothing half-finished looks finished
    # a killed job leaves no complete-looking cache entry: every visible entry is whole
    for entry in (root / "outputs" / "cache" / "encodings").iterdir():
        if entry.is_dir() and not entry.name.startswith("."):
            assert {"z.npy", "vec.npy", "stats.npy", "feature.npy", "labels.npy"} <= {p.name for p in entry.iterdir()}

    # 2. restart the same command: finished jobs are copied, the rest run
    proc2 = cli([*common, f"hydra.sweep.dir={sweep}"], root)
    after = results_in(sweep)
    assert len(after) == 3
    resumed = {p.parent.name for p in sweep.rglob("resumed.json")}
    assert resumed == jobs_before, (resumed, jobs_before, proc2.stdout[-2000:])
    for name, (mtime, blob) in done.items():             # entries of finished jobs were not rewritten
        assert (store / name).stat().st_mtime_ns == mtime and (store / name).read_bytes() == blob
    assert len(list(store.glob("*.json"))) == 3
    for job in set(after) - resumed:
        assert (sweep / job / "result_key.json").exists()

    # 3. the same results as the sweep that was never interrupted
    assert ref_proc.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref = results_in(ref_root / "sweep")
    assert sorted(ref) == sorted(after)
    for job in ref:
        assert comparable(after[job]) == comparable(ref[job]), job
