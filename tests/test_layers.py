"""The package is layered: no two modules import each other, not even lazily inside a function.

A circle of imports means two modules that cannot be understood (or moved) one without the other;
a lazy import that closes one only hides it.  Imports between a package and its own submodules
(``levels/__init__.py`` and ``levels/_core.py``) are not circles of this kind and are left out.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set

import neurofuse

SRC = Path(neurofuse.__file__).resolve().parent


def _modules() -> Dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("neurofuse",) + path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> Dict[str, Set[str]]:
    """``{module: the neurofuse modules it imports anywhere in its code}`` (relative imports)."""
    mods = _modules()
    graph: Dict[str, Set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            for target in [base] + [f"{base}.{a.name}" for a in node.names]:
                related = name.startswith(target + ".") or target.startswith(name + ".")
                if target in mods and target != name and not related:
                    graph[name].add(target)
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle_of_three_and_ignores_a_chain():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}}) == []


def test_the_graph_sees_lazy_imports_inside_functions():
    assert "neurofuse.models" in import_graph()["neurofuse.checkpoint"]  # imported inside _build


def test_no_two_modules_of_neurofuse_import_each_other():
    assert circles(import_graph()) == [], "break the circle: move what both need into a lower module"
