"""The import graph of ``sta_dist`` (and ``kernels/``, installed as ``sta_dist.kernels``) has
no circle: every module's imports, at module and at function level, read with ``ast``.

An edge ``a -> b`` is an import statement in ``a`` naming ``b``: ``from .b import x``,
``from . import b`` (``b`` a module), ``import sta_dist.b``. Importing ``b`` also runs its
packages' ``__init__``; those implicit edges are left out (every module would sit on a
circle through ``sta_dist/__init__.py``, which re-exports the public names).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sta_dist": ROOT / "sta_dist", "sta_dist.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    """Dotted name of every module of the packages -> its file."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def imports(name: str, mods: dict[str, Path]) -> set[str]:
    """The modules of the packages that module ``name`` imports anywhere in its file."""
    here = name if _is_package(name, mods) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(mods[name].read_text(), str(mods[name]))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module mod; `from mod import name` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:  # `import sta_dist.x.y` of a name: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, mods) for name in mods}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def a_circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One closed path through the component's first module (breadth first: a shortest one)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def report(graph: dict[str, set[str]], components: list[list[str]]) -> str:
    return "\n".join(f"{len(c)} modules {c}: e.g. " + " -> ".join(a_circle(graph, c)) for c in components)


def test_the_graph_reads_every_module():
    graph = import_graph()
    assert "sta_dist.parallel.plan" in graph and "sta_dist.kernels.sta_fwd" in graph
    assert "sta_dist.geometry" in graph["sta_dist.parallel.plan"]
    assert "sta_dist.kernels.descriptors" in graph["sta_dist.kernels.sta_fwd"]
    assert "sta_dist.selection.attention" in graph["sta_dist.parallel.decide"]  # a function-level import


def test_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert a_circle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_parallel_has_no_circle():
    """No circle among the shard plan, the decisions, the cost model and the schedule, nor
    any that passes through ``sta_dist.parallel``."""
    graph = import_graph()
    found = [c for c in circles(graph) if any(m.startswith("sta_dist.parallel.") for m in c)]
    assert not found, report(graph, found)


def test_sta_dist_has_no_circle():
    graph = import_graph()
    found = circles(graph)
    assert not found, report(graph, found)
