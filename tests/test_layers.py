"""The layers of the house, read from the source: who imports whom among precond_ref's modules.

The graph is built with ``ast`` from every ``import`` statement of ``precond_ref/`` and ``adapters/``
(installed as ``precond_ref.adapters``), those inside functions and ``TYPE_CHECKING`` blocks
included: a deferred import is still a dependency, and a circle that it hides is still a circle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Source folders and the package name each installs as.
SOURCES = {"precond_ref": ROOT / "precond_ref", "precond_ref.adapters": ROOT / "adapters"}

#: The bottom layer: these import neither the contract (transform) nor the methods.
BOTTOM = ("precond_ref._backend", "precond_ref.tree", "precond_ref.linalg", "precond_ref.sketch")


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the sources, by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "precond_ref" and parts and parts[0] == "adapters":
                continue  # not a source folder of precond_ref (adapters/ installs there)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the sources it imports}``; ``from p import name`` imports the module
    ``p.name`` where there is one (``p`` itself, a package, is imported first in any case, as every
    ancestor of a module is), else ``p``."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


GRAPH = import_graph()


def test_the_graph_sees_the_known_imports():
    """The reader finds imports in each form the sources use: absolute, relative (one and two
    levels), of a name and of a module [a check of the test itself]."""
    assert "precond_ref.transform" in GRAPH["precond_ref.methods.asgo"]  # from ..transform import
    assert "precond_ref._backend" in GRAPH["precond_ref.linalg"]  # from ._backend import
    assert "precond_ref.methods" in GRAPH["precond_ref"]  # from .methods import a name
    assert "precond_ref.compare.digits" in GRAPH["precond_ref.compare.training"]  # from . import a module
    assert "precond_ref.transform" in GRAPH["precond_ref.adapters._torch_core"]  # from precond_ref.transform import
    assert "precond_ref.adapters._torch_state" in GRAPH["precond_ref.adapters._torch_core"]  # from . import _torch_state
    assert "precond_ref.adapters._torch_core" in GRAPH["precond_ref.adapters.torch"]  # from ._torch_core import


@pytest.mark.parametrize("module", BOTTOM)
def test_bottom_modules_import_neither_the_contract_nor_the_methods(module):
    """The shims, trees, matrix numerics and sketches sit below the contract: none imports
    ``transform`` or a method module."""
    above = {m for m in GRAPH[module] if m == "precond_ref.transform" or m.startswith("precond_ref.methods")}
    assert above == set(), f"{module} imports {sorted(above)}"


def test_backend_imports_nothing_from_the_package():
    """``_backend`` is the bottom: it imports only the standard library and array_api_compat."""
    assert GRAPH["precond_ref._backend"] == set()
    tree = ast.parse(SOURCES["precond_ref"].joinpath("_backend.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
    assert imported <= {"__future__", "contextlib", "contextvars", "math", "numbers", "sys", "typing", "array_api_compat"}, imported


def test_no_import_circle_in_the_house():
    """No circle of imports among the modules of ``precond_ref`` and its adapters ("the
    house has no import circle"): the torch adapter's modules stack ``_torch_state``,
    ``_torch_compile`` -> ``_torch_capture`` -> ``_torch_core`` -> ``torch`` -> ``torch_distributed``."""
    assert cycles(GRAPH) == []


def test_the_torch_adapter_modules_import_downwards_only():
    """The layering the torch adapter is written in: the state, compile and memory helpers import
    no other module of the adapter's, the capture helper only the compile one (the patterns a
    compiled step runs eagerly are those it does not capture); ``_torch_core``
    (``CoreOptimizer``) imports them and ``_keywords`` (the unknown-keyword message the torch and optax
    adapters share, itself importing nothing of the adapter's) and nothing above; ``_torch_methods`` (the classes' behaviour beyond their table rows) imports only those
    below it; ``torch`` (the method table) does not import the distributed classes."""
    adapters = {m: {t for t in GRAPH[m] if t.startswith("precond_ref.adapters.")} for m in GRAPH
                if m.startswith("precond_ref.adapters.")}
    helpers = {"precond_ref.adapters._torch_state", "precond_ref.adapters._torch_compile", "precond_ref.adapters._torch_memory"}
    for helper in helpers:
        assert adapters[helper] == set(), helper
    capture = "precond_ref.adapters._torch_capture"
    assert adapters[capture] == {"precond_ref.adapters._torch_compile"}
    keywords = "precond_ref.adapters._keywords"
    assert adapters[keywords] == set()
    assert adapters["precond_ref.adapters._torch_core"] == helpers | {capture, keywords}
    assert adapters["precond_ref.adapters._torch_methods"] <= helpers | {"precond_ref.adapters._torch_core"}
    assert "precond_ref.adapters.torch_distributed" not in adapters["precond_ref.adapters.torch"]


def test_cycles_finds_a_circle():
    """``cycles`` reports a circle, however long, and no singleton [a check of the test itself]."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
