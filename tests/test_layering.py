"""The layers of ARCHITECTURE.md, read from the code's own imports.

Every ``lowbit.*`` import (function-level ones included) is resolved to its file; the
test fails on an import cycle between files and on any edge that goes up or sideways:

    tools     lowbit/, compiler/*.py (driver, cli, explain, diff, inspect, report, frontend)
    analysis  compiler/analysis/ (candidates, costs, sensitivity, allocation, plan-mixed)
    passes    passes/                 backends  backends/<name>/ (each apart)
    models    models/ (family adapters, loaders)
    core      compiler/core/
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lowbit.compiler": "compiler", "lowbit.passes": "passes", "lowbit.backends": "backends",
            "lowbit.models": "models", "lowbit": "lowbit"}
#: which layers a layer may import (besides itself)
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "passes": {"core"},
    "backends": {"core"},  # each backend apart: backends/ort never imports backends/tvm
    "analysis": {"core", "models", "passes", "backends"},
    "tools": {"core", "models", "passes", "backends", "analysis"},
}


def layer(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "compiler":
        return parts[1] if parts[1] in ("core", "analysis") else "tools"
    return {"lowbit": "tools"}.get(parts[0], parts[0])


def unit(path: str) -> str:
    """The unit an edge must not leave sideways: a backend's own folder, else the layer."""
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0] == "backends" and len(parts) > 2 else layer(path)


def module_file(module: str) -> str | None:
    for prefix in sorted(PACKAGES, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix):].lstrip(".").replace(".", "/")
            base = ROOT / PACKAGES[prefix] / rest if rest else ROOT / PACKAGES[prefix]
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return str(candidate.relative_to(ROOT))
    return None


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for folder in set(PACKAGES.values()):
        for path in sorted((ROOT / folder).rglob("*.py")):
            src = str(path.relative_to(ROOT))
            graph.add_node(src)
            for node in ast.walk(ast.parse(path.read_text(), src)):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    target = module_file(name) if name.startswith("lowbit") else None
                    # a package's __init__ re-exports its modules: the edge that counts is to the module
                    if target and target != src and not (target.endswith("__init__.py") and f"{name}." in str(names)):
                        graph.add_edge(src, target)
    return graph


def forbidden_edges(graph: nx.DiGraph) -> list[str]:
    bad = []
    for a, b in graph.edges:
        la, lb = layer(a), layer(b)
        if unit(a) == unit(b) or lb in ALLOWED[la]:
            continue
        if la == lb == "backends":
            bad.append(f"{a} -> {b} (a backend imports another backend)")
        else:
            bad.append(f"{a} ({la}) -> {b} ({lb})")
    return sorted(bad)


def test_layers_only_import_downward():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the code
    assert forbidden_edges(graph) == []


def test_no_import_cycle_between_files():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == []


def test_the_check_sees_a_bad_edge():
    graph = nx.DiGraph([("backends/tvm/lower.py", "backends/ort/lower.py"),
                        ("compiler/core/plan.py", "passes/plan.py"),
                        ("passes/plan.py", "compiler/core/plan.py")])
    assert forbidden_edges(graph) == [
        "backends/tvm/lower.py -> backends/ort/lower.py (a backend imports another backend)",
        "compiler/core/plan.py (core) -> passes/plan.py (passes)",
    ]
