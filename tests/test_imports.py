"""The import graph of the package has no cycles, so it shows where a call goes.

Every module of ``fusedopt/`` and ``kernels/`` (installed as ``fusedopt.kernels``) is parsed,
not imported, and every ``import`` statement in it counts: at the top, inside a function, under
an ``if`` or a ``try``, relative or absolute. A function-local import that dodges a cycle at
import time is still a cycle in the design (two modules that each need the other), so it fails
here too. The dependencies run one way: class -> base step -> ``backends.resolve`` -> backend
module -> kernel.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Package name -> its folder in the repository (pyproject.toml's package-dir).
PACKAGES = {"fusedopt": ROOT / "fusedopt", "fusedopt.kernels": ROOT / "kernels", "fusedopt.csrc": ROOT / "csrc"}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (``__init__`` as the package)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _known(name: str, known) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package, or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in known:
            return prefix
    return None


def imports(name: str, path: Path, known) -> set[str]:
    """The package's modules that module ``name`` (at ``path``) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # ``from . import x`` in a module is relative to its package; in an __init__,
                # to the package itself.
                parts = name.split(".")
                anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            # ``from base import x``: x is a submodule when the package has one of that name.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in map(lambda t: _known(t, known), targets) if t is not None and t != name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one
    module (Tarjan's algorithm, then a shortest path back to the start inside the component)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)

    found = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)
        paths, frontier = {start: [start]}, [start]
        while frontier:  # breadth first, inside the component, until an edge leads back to start
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & component):
                    if w == start:
                        found.append(paths[v] + [start])
                        nxt = []
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                else:
                    continue
                break
            frontier = nxt
    return found


def test_the_graph_sees_every_kind_of_import():
    """The parser itself: relative and absolute, package and module, function-local."""
    edges = graph()
    assert "fusedopt.kernels.backend" in edges and "fusedopt.cli" in edges
    assert "fusedopt.layout" in edges["fusedopt.kernels.backend"]  # from .. import layout
    assert "fusedopt.kernels.common" in edges["fusedopt.kernels.backend"]  # from . import common
    assert "fusedopt.scalars" in edges["fusedopt.kernels.common"]  # from ..scalars import X
    assert "fusedopt.build" in edges["fusedopt.cli"]  # from fusedopt import build, in a function
    assert "fusedopt.adam" in edges["fusedopt"]  # an __init__'s from .adam import Adam
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles in the package:\n" + "\n".join(" -> ".join(c) for c in found)


def test_a_step_is_followed_by_its_imports():
    """class -> base step -> ``backends.resolve`` -> backend module -> kernel, each an import
    edge: the backends are named where they are loaded, and the kernels below them import
    nothing of the layers above (the capture check is a leaf both read)."""
    edges = graph()
    assert "fusedopt.optimizer" in edges["fusedopt.sgd"]
    assert "fusedopt.backends" in edges["fusedopt.compiled"]
    assert {"fusedopt.reference", "fusedopt.kernels.backend", "fusedopt.cuda_backend"} <= edges["fusedopt.backends"]
    assert "fusedopt.kernels.elementwise" in edges["fusedopt.kernels.backend"]
    above = {"fusedopt", "fusedopt.optimizer", "fusedopt.compiled", "fusedopt.backends", "fusedopt.step"}
    below = [m for m in edges if m.startswith("fusedopt.kernels") or m == "fusedopt.cuda_backend"]
    assert not {m: edges[m] & above for m in below if edges[m] & above}
    assert edges["fusedopt.capture"] == set()


def test_every_backend_names_its_steps():
    """Each backend's ``STEPS`` holds only the spec's families; the reference runs them all."""
    from fusedopt import backends, families

    for name, load in backends.LOADERS.items():
        module = load()
        assert set(module.STEPS) <= set(families.FAMILIES), name
        assert all(callable(f) for f in module.STEPS.values()), name
    assert set(backends.LOADERS["reference"]().STEPS) == set(families.FAMILIES)
