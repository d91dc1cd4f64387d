"""The package's shape: no import cycles (function-level imports included), no YAML read by
hand (Hydra composes every config), thin task glue."""
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


def test_the_analysis_task_is_glue():
    lines = (PKG / "tasks" / "analysis.py").read_text().splitlines()
    assert len(lines) <= 250, len(lines)


def test_the_report_task_is_glue():
    for task in ("report", "dashboard"):
        lines = (PKG / "tasks" / f"{task}.py").read_text().splitlines()
        assert len(lines) <= 150, (task, len(lines))
