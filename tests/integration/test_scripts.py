"""Every script in ``scripts/`` runs: ``--smoke`` (tiny sizes, CPU) exits 0 and prints its table.

Scripts are found by globbing, so a new script without a ``--smoke`` mode fails here.  Also:
``bench_train.py`` fails at once (non-zero exit, the child's error shown) when a measuring
child process raises or dies, instead of waiting on it forever.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
RULE = re.compile(r"^ *-+( +-+)* *$")                # text_table's rule, or one long rule


def table_rows(stdout: str) -> list[str]:
    """The data rows of the first table in ``stdout``: a header line of ≥ 2 columns, a rule of
    dashes, ≥ 1 row below it (up to a blank line)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines[1:-1], 1):
        if RULE.match(line) and line.count("-") >= 3 and len(lines[i - 1].split()) >= 2:
            rows = []
            for row in lines[i + 1:]:
                if not row.strip():
                    break
                rows.append(row)
            if rows:
                return rows
    return []


def smoke_failure(script: Path, cwd: Path, timeout: float = 300) -> str | None:
    """Why ``script --smoke`` does not pass (None when it does)."""
    if "--smoke" not in script.read_text():
        return f"{script.name} has no --smoke mode"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}          # this checkout's package, whatever is installed
    try:
        r = subprocess.run([sys.executable, str(script), "--smoke"], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{script.name} --smoke ran over {timeout:.0f} s"
    if r.returncode != 0:
        return f"{script.name} --smoke exited {r.returncode}:\n{r.stderr[-4000:]}"
    if not table_rows(r.stdout):
        return f"{script.name} --smoke printed no table:\n{r.stdout[-4000:]}"
    return None


def test_the_scripts_are_found():
    names = {p.stem for p in SCRIPTS}
    assert {"bench_adapted", "bench_cache", "bench_decompose", "bench_gpu", "bench_train",
            "gen_experiments"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_runs_its_smoke_mode_and_prints_its_table(script, tmp_path):
    failure = smoke_failure(script, tmp_path)
    assert failure is None, failure


def test_the_table_finder():
    assert table_rows("title\nab  cd\n--  --\n1   2\n3   4\n\nnext") == ["1   2", "3   4"]
    assert table_rows("model  cached s\n----------------\nvit  1.0\n") == ["vit  1.0"]
    assert table_rows("a  b\n----  ----\n") == []                 # a header and no row
    assert table_rows("wrote 3 presets\n") == []
    assert table_rows("-----\n1\n") == []                          # no header
    assert table_rows("a b\n-\n1\n") == []                          # a dash, not a rule


def test_a_script_without_smoke_mode_fails(tmp_path):
    script = tmp_path / "bench_new.py"
    script.write_text("import argparse\nap = argparse.ArgumentParser()\nap.add_argument('--big', action='store_true')\n"
                      "ap.parse_args()\nprint('a  b\\n-  -\\n1  2')\n")
    assert smoke_failure(script, tmp_path) == "bench_new.py has no --smoke mode"
    script.write_text(script.read_text() + "# --smoke: not implemented\n")        # mentioned, not accepted
    assert "exited 2" in smoke_failure(script, tmp_path)
    script.write_text("import sys\nassert sys.argv[1:] == ['--smoke']\nprint('done')\n")
    assert "printed no table" in smoke_failure(script, tmp_path)


# --- bench_train: a crashed child fails the script at once ----------------------------------------
def _raises_in_child(mode, model, args):
    raise ValueError(f"boom in the {mode} child of {model}")


def _dies_in_child(mode, model, args):
    os._exit(7)                                    # no exception, no answer: a killed process looks like this


@pytest.fixture
def bench_train(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_train
    return bench_train


@pytest.mark.parametrize("target, message", [(_raises_in_child, r"ValueError: boom in the in_loop child of m"),
                                             (_dies_in_child, r"died \(exit code 7\)")])
def test_bench_train_fails_at_once_when_a_child_crashes(bench_train, target, message):
    t = time.perf_counter()
    with pytest.raises(bench_train.ChildFailed, match=message) as e:
        bench_train.run_mode("in_loop", "m", argparse.Namespace(), target=target)
    assert str(e.value).startswith("in_loop/m: the child process")
    assert time.perf_counter() - t < 60           # the spawn and its imports; never the wait for an answer


def test_bench_train_exits_nonzero_with_the_childs_error(tmp_path):
    # a real child failing on bad input (batch size 0) ends the script with exit 1 and its traceback
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--models", "tiny_clip",
                        "--epochs", "1", "--n-train", "32", "--n-eval", "16", "--n-ref", "32", "--batch", "0"],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    assert "bench_train: cached/tiny_clip: the child process failed:" in r.stderr
    assert "Traceback" in r.stderr and "batch_size" in r.stderr, r.stderr
    assert "speed-up" not in r.stdout
