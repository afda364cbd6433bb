"""The dependency rules of README's "How it works", read from the source: pages -> page engines ->
engine, never back up, and no import circle among the engine's modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quantlab"
PAGE_ENGINES = {"ui_state", "sweeps", "lab", "share"}


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """The quantlab modules a file imports (also inside functions, unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 1:
            found |= {module.split(".")[0]} if module else {alias.name for alias in node.names}
        elif module.startswith("quantlab."):
            found.add(module.split(".")[1])
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def graph(top_level_only: bool = False) -> dict[str, set[str]]:
    return {p.stem: imports_of(p, top_level_only) for p in PACKAGE.glob("*.py")}


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in edges.get(todo.pop(), ()):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_no_engine_module_imports_a_page_engine_even_inside_a_function():
    edges = graph()
    offenders = {module: sorted(deps & PAGE_ENGINES) for module, deps in edges.items()
                 if module not in PAGE_ENGINES and deps & PAGE_ENGINES}
    assert offenders == {}


def test_the_technique_registry_reaches_neither_the_dashboard_nor_the_sweep_runner():
    # the circle techniques -> sensitivity -> lab -> sweeps -> runner -> tasks -> techniques is gone
    for family in ("techniques", "ptq", "fine_tuning", "litert_quant"):
        if (PACKAGE / f"{family}.py").exists():
            assert not reachable(family, graph()) & (PAGE_ENGINES | {"runner", "tasks"}), family


def test_module_level_imports_form_no_circle():
    edges = graph(top_level_only=True)
    circles = [module for module in edges if module in reachable(module, edges)]
    assert circles == []


def test_the_finder_sees_imports_made_inside_functions(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("def f():\n    from .lab import x\n    from quantlab.sweeps import y\n")
    assert imports_of(source) == {"lab", "sweeps"}
    assert imports_of(source, top_level_only=True) == set()
