"""The package's shape: no import cycles (function-level imports included), no YAML read by
hand (Hydra composes every config), thin task glue (every task file ≤ 150 lines)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "residual_exp"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(PKG.parent).with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its source (any nesting level)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]     # the importing package
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                mod = ".".join(p for p in (base, node.module or "") if p)
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first = last), ignoring a package's imports of its own
    submodules (``pkg/__init__`` re-exporting ``pkg.x`` is not a cycle in the design)."""
    def own(a: str, b: str) -> bool:
        return b.startswith(a + ".")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges[v]):
            if own(v, w):
                continue
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_cycle_finder_sees_function_level_imports(tmp_path):
    edges = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p": {"p.a"}}
    assert find_cycle(edges) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"p": {"p.a"}, "p.a": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_reads_a_yaml_file_itself():
    pattern = re.compile(r"OmegaConf\.load\(|yaml\.(safe_)?load|import yaml|\.ya?ml[\"']\)")
    offenders = [f"{f.relative_to(PKG)}:{i}" for f in PKG.rglob("*.py")
                 for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == [], offenders


TASK_LINES = 150                              # a task file is glue: config in, library calls, output
TASK_LINES_EXCEPT = {"analysis.py": 250}      # the analyses' glue (one entry point per analysis)
# Temporary: task files that still hold library code, and the issue that moves it out.  Drop an
# entry when its file is within the limit (the test below says so).
OVER_THE_LIMIT_UNTIL: dict[str, str] = {}          # task file → the issue that brings it under the limit


def _task_lines() -> dict[str, int]:
    return {f.name: len(f.read_text().splitlines()) for f in sorted((PKG / "tasks").glob("*.py"))}


def test_every_task_file_is_glue():
    over = {name: f"{n} lines > {TASK_LINES_EXCEPT.get(name, TASK_LINES)}" for name, n in _task_lines().items()
            if name not in OVER_THE_LIMIT_UNTIL and n > TASK_LINES_EXCEPT.get(name, TASK_LINES)}
    assert over == {}, f"move library code out of these tasks (into the package it belongs to): {over}"


def test_the_allow_list_of_long_tasks_is_temporary():
    lines = _task_lines()
    for name, until in OVER_THE_LIMIT_UNTIL.items():
        assert name in lines, f"tasks/{name} is gone: drop it from OVER_THE_LIMIT_UNTIL"
        assert lines[name] > TASK_LINES, (f"tasks/{name} has {lines[name]} lines now ({until} is done): "
                                          "drop it from OVER_THE_LIMIT_UNTIL")


def _literal_string_sets(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield frozenset(e.value for e in node.elts), node.lineno


def test_no_module_spells_an_allowed_value_list_of_the_catalog():
    """Every closed set of values lives in residual_exp.catalog; a literal tuple / list / set elsewhere
    that equals one of them (e.g. ("drop", "mean", "add")) is a second copy of that fact."""
    from enum import Enum

    from residual_exp.catalog import values
    sets = {frozenset(m.value for m in e): e.__name__ for e in vars(values).values()
            if isinstance(e, type) and issubclass(e, Enum) and e is not Enum}
    sets.update({frozenset(v): k for k, v in vars(values).items() if isinstance(v, tuple) and len(v) > 1
                 and all(isinstance(x, str) for x in v)})
    copies = [f"{f.relative_to(PKG)}:{line} spells {sets[vals]}" for f in PKG.rglob("*.py") if "catalog" not in f.parts
              for vals, line in _literal_string_sets(ast.parse(f.read_text(encoding="utf-8"))) if vals in sets]
    assert copies == [], copies
