"""Every user error of every task is one line and exit status 2: each task run with a bad path, an empty
folder or the wrong kind of folder (a file where a folder belongs, a folder of another task, an empty
dictionary, empty or pickled weights files).

In process (``run(cfg)``, classified exactly as ``python -m residual_exp`` classifies it), plus the cases
only the command line has (folders Hydra creates, the cache folder, a read-only location).
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_cfg


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    t = tmp_path_factory.mktemp("user_errors")
    (t / "empty").mkdir()
    (t / "a_file.txt").write_text("not a folder")
    (t / "foreign").mkdir()
    (t / "foreign" / "notes.md").write_text("hello")
    (t / "badjson").mkdir()
    (t / "badjson" / "config.json").write_text("{not json")
    (t / "badjson" / "adapted.json").write_text("{not json")
    (t / "planrun").mkdir()
    (t / "planrun" / "config.json").write_text(json.dumps({"task": {"name": "plan"}, "method": {"name": "base"}}))
    (t / "empty_dictionary.txt").write_text("")
    (t / "blank_dictionary.txt").write_text("\n  \n# a comment\n")
    (t / "empty.pt").write_bytes(b"")
    (t / "plain.pkl").write_bytes(pickle.dumps({"a": [1]}))
    return t


# (case, overrides with {t} for the fixture folder, a phrase the one line must hold)
CASES = [
    ("train, root missing", ["dataset=image_folder", "dataset.root={t}/nope"], "does not exist"),
    ("train, root empty", ["dataset=image_folder", "dataset.root={t}/empty"], "has no class folders"),
    ("train, root a file", ["dataset=image_folder", "dataset.root={t}/a_file.txt"], "is a file, not a folder"),
    ("train, cifar10 root empty", ["dataset=cifar10", "dataset.root={t}/empty"], "data not found under root"),
    ("train, weights empty", ["model.weights={t}/empty.pt"], "empty file (0 bytes)"),
    ("train, weights pickle", ["model.weights={t}/plain.pkl"], "unsafe or foreign pickle refused"),
    ("check_decomposition, weights pickle", ["task=check_decomposition", "model.weights={t}/plain.pkl"],
     "unsafe or foreign pickle refused"),
    ("analysis, empty dictionary", ["task=analysis", "analysis=text_spans", "analysis.dictionary={t}/empty_dictionary.txt"],
     "holds 0 descriptions"),
    ("analysis, blank dictionary", ["task=analysis", "analysis=text_spans", "analysis.dictionary={t}/blank_dictionary.txt"],
     "holds 0 descriptions"),
    ("analysis, run_dir foreign", ["task=analysis", "analysis=text_spans", "analysis.run_dir={t}/foreign"],
     "not a run folder (no config.json"),
    ("analysis, run_dir of task=plan", ["task=analysis", "analysis=text_spans", "analysis.run_dir={t}/planrun"],
     "a run of task=plan, not a training run"),
    ("plan, a user folder", ["task=plan", "dataset=image_folder"], "task=plan has no nominal sizes"),
    ("export, run_dir empty", ["task=export", "run_dir={t}/empty"], "not a run folder of task=train"),
    ("export, run_dir foreign", ["task=export", "run_dir={t}/foreign"], "not a run folder of task=train"),
    ("export, run_dir bad json", ["task=export", "run_dir={t}/badjson"], "unreadable run config"),
    ("export, run_dir of task=plan", ["task=export", "run_dir={t}/planrun"], "not the config of a training run"),
    ("predict, inputs empty folder", ["task=predict", "model_dir={t}/empty", "inputs={t}/empty"], "no image files"),
    ("predict, out_dir a file", ["task=predict", "model_dir={t}/empty", "inputs={t}/foreign",
                                 "task.out_dir={t}/a_file.txt"], "is a file, not a folder"),
    ("predict, model_dir empty", ["task=predict", "model_dir={t}/empty", f"inputs={ROOT}/residual_exp"],
     "no image files"),
    ("evaluate, model_dir empty", ["task=evaluate", "model_dir={t}/empty"], "no adapted.json: not an export folder"),
    ("evaluate, model_dir foreign", ["task=evaluate", "model_dir={t}/foreign"], "not an export folder"),
    ("evaluate, model_dir bad json", ["task=evaluate", "model_dir={t}/badjson"], "adapted.json: unreadable"),
    ("pretrain, out a folder", ["task=pretrain_tiny_clip", "task.out={t}/empty"], "is a folder"),
    ("pretrain, out under a file", ["task=pretrain_tiny_clip", "task.out={t}/a_file.txt/x.safetensors"],
     "is a file, not a folder"),
]


@pytest.mark.parametrize("case, overrides, phrase", CASES, ids=[c[0] for c in CASES])
def test_each_task_refuses_bad_paths_in_one_line(paths, tmp_path, case, overrides, phrase):
    from residual_exp.__main__ import _user_message
    from residual_exp.run import run
    cfg = compose_cfg([o.format(t=paths) for o in overrides] + ["logger=none"], tmp_path)
    with pytest.raises(Exception) as e:
        run(cfg)
    message = _user_message(e.value)
    assert message is not None, f"{case}: not a user error: {type(e.value).__name__}: {e.value}"
    assert message.startswith("error: ") and "\n" not in message and phrase in message, message
    assert not (tmp_path / "outputs" / "results").exists() and not (tmp_path / "run" / "results.json").exists()


def test_report_refuses_empty_and_foreign_folders(paths, tmp_path, capsys):
    from residual_exp.run import run
    for d in ("empty", "foreign"):
        assert run(compose_cfg(["task=report", f"sweep_dir={paths / d}"], tmp_path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"report: no results.json under {paths / d}: have the jobs finished?"]


def _cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "residual_exp", *args, f"paths.root_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, phrase", [
    (["task=plan", "hydra.run.dir={t}/a_file.txt/run"], "hydra.run.dir={t}/a_file.txt/run: {t}/a_file.txt is a file"),
    (["-m", "task=plan", "hydra.sweep.dir={t}/a_file.txt/s"], "hydra.sweep.dir={t}/a_file.txt/s: {t}/a_file.txt is a file"),
    (["task=cache", "cache.dir={t}/a_file.txt"], "cache.dir={t}/a_file.txt: is a file, not a folder"),
    (["task=plan", "run_name=../../outside"], "run_name=../../outside: must be a plain folder name"),
])
def test_cli_refuses_output_paths_it_cannot_use(paths, tmp_path, args, phrase):
    proc = _cli([a.format(t=paths) for a in args], tmp_path)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and phrase.format(t=paths) in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (paths.parent / "outside").exists()


def test_cli_refuses_a_read_only_output_root(tmp_path):
    ro = Path("/sys/residual_exp_probe")                     # not writable even as root
    if not Path("/sys").is_dir():
        pytest.skip("no /sys")
    proc = _cli(["task=plan", f"hydra.run.dir={ro}/run"], tmp_path)
    assert proc.returncode == 2 and "cannot write in /sys" in proc.stderr and "Traceback" not in proc.stderr
