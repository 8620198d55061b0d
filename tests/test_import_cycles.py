"""No import cycles in fusedpar/: data flows cli -> plan/layers -> overlap -> kernels, comm,
streams, and a module never imports (at module level or inside a function) one that imports
it back. Read from the source with `ast`, so nothing is imported and a function-level import
that only dodges a cycle at import time counts as the cycle it is."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` of every module under ``root/package``."""
    mods = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` over the package's own modules, every import
    statement in the file (module level, in functions, under ``if TYPE_CHECKING``).
    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
    ``pkg`` (its ``__init__``); the implicit import of a module's parent packages is not
    an edge (Python runs it for every submodule, whatever the code's structure)."""
    mods = module_names(root, package)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]  # what `.` means in this file
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:  # `import fusedpar.kernels.matmul.x`: nearest module
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as the
    list of modules along it, first repeated at the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:  # a shortest path back to the start, inside the component (BFS)
        start = min(comp)
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        end = v
                        break
                    if w in comp and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """Each hop of a cycle with the line of its import statement."""
    hops = [f"{a} (line {graph[a][b]} of {Path(*a.split('.'))}.py) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "; ".join(hops)


def test_fusedpar_has_no_import_cycles():
    graph = import_graph(ROOT, "fusedpar")
    assert len(graph) > 40 and "fusedpar.layers.linear" in graph, sorted(graph)  # it read the package
    assert "fusedpar.kernels.matmul" in graph["fusedpar.layers.linear"] or \
        "fusedpar.kernels" in graph["fusedpar.layers.linear"], graph["fusedpar.layers.linear"]
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in fusedpar/:\n" + "\n".join(describe(c, graph) for c in cycles)


def test_the_check_finds_module_and_function_level_cycles_and_names_them(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("from .sub import b\n\ndef f():\n    return b.g()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import f  # late: a imports this module\n    return f\n")
    (pkg / "c.py").write_text("import pkg.d\n")
    (pkg / "d.py").write_text("from pkg import c\n")
    (pkg / "e.py").write_text("from . import a\nfrom .sub.b import g\n")  # imports into a cycle: not one itself
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.a": 2} and graph["pkg.a"] == {"pkg.sub.b": 1}, graph
    cycles = import_cycles(graph)
    assert sorted(cycles) == [["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"]], cycles
    text = describe(cycles[0], graph)
    assert "pkg.sub.b (line 2 of pkg/sub/b.py) -> pkg.a" in text, text
