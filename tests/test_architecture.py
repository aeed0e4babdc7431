"""The import rules of ARCHITECTURE.md, read from the source (every import statement, lazy
ones inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "service" / "axguard"

# The layers (ARCHITECTURE.md). Modules are named relative to the axguard package.
PURE = {"errors", "scoring", "verdict", "drift", "feedback", "threads"}
ENGINE = PURE | {"model", "preprocess", "activations", "attribution", "sharedpass",
                 "evidence", "engine", "gax", "calibration.artifact", "config"}
DATA_PLANE = ENGINE | {"batching", "diagnoser", "live", "metrics", "dataplane"}
TRANSPORT = {"server", "rpc", "interceptors", "openinference", "converters", "security",
             "transport_cost", "startup", "workers", "v1", "oip"}
TRANSPORT_PACKAGES = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf",
                      "axguard_client")
FITTING_PACKAGES = ("sklearn", "scipy", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything `path` imports ("axguard.x" for the package's own)."""
    return imports_in(path.read_text(), ["axguard", *path.relative_to(PACKAGE).parent.parts])


def imports_in(source: str, package: list[str]) -> set[str]:
    """Absolute names imported by `source`, a module of `package` (a list of names)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None or node.level and not node.module:
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def own_modules(names: set[str]) -> set[str]:
    """The axguard modules among `names`, relative to the package."""
    return {n.removeprefix("axguard.") for n in names if n.startswith("axguard.")}


def layer_of(name: str, layer: set[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in layer)


SOURCES = {module_name(p): p for p in PACKAGE.rglob("*.py")
           if "oip" not in p.parts and p.parent.name != "v1"}


def test_every_layered_module_exists():
    for name in DATA_PLANE | (TRANSPORT - {"v1", "oip"}):
        assert name in SOURCES, f"{name} is named in a layer but does not exist"


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n in DATA_PLANE))
def test_the_engine_and_data_plane_know_nothing_of_grpc_or_fitting(name):
    imported = imports_of(SOURCES[name])
    for package in (*TRANSPORT_PACKAGES, *FITTING_PACKAGES):
        assert not any(i == package or i.startswith(package + ".") for i in imported), (
            f"{name} imports {package}")
    upward = {m for m in own_modules(imported) if layer_of(m, TRANSPORT)}
    assert not upward, f"{name} imports transport modules {upward}"


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n in ENGINE))
def test_the_engine_does_not_import_the_data_plane(name):
    serving = DATA_PLANE - ENGINE
    upward = {m for m in own_modules(imports_of(SOURCES[name])) if layer_of(m, serving)}
    assert not upward, f"{name} imports serving modules {upward}"


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_import_only_errors(name):
    own = own_modules(imports_of(SOURCES[name])) - {"errors"}
    assert not {m for m in own if not m.startswith("errors.")}, f"{name} imports {own}"


def test_calibration_fitting_stays_out_of_serving():
    # scikit-learn and scipy are fitting tools: nothing the server runs per request needs
    # them (the calibration artifact is plain pydantic).
    for name in DATA_PLANE | TRANSPORT:
        if name in SOURCES:
            fitting = {m for m in own_modules(imports_of(SOURCES[name]))
                       if m.startswith("calibration.") and m != "calibration.artifact"
                       and not m.startswith("calibration.artifact.")}
            assert not fitting, f"{name} imports {fitting}"


def test_the_checker_sees_lazy_and_relative_imports():
    source = ("import os\n"
              "def f():\n    import grpc\n    from ..server import serve\n"
              "    from . import risk\n")
    found = imports_in(source, ["axguard", "calibration"])
    assert {"os", "grpc", "axguard.server", "axguard.server.serve",
            "axguard.calibration.risk"} <= found
    assert own_modules(found) >= {"server", "calibration.risk"}


def import_graph() -> dict[str, set[str]]:
    """Each module's own-package imports (lazy ones too), resolved to modules."""
    graph = {}
    for name, path in SOURCES.items():
        deps = set()
        for imported in own_modules(imports_of(path)):
            parts = imported.split(".")
            resolved = next((".".join(parts[:k]) for k in range(len(parts), 0, -1)
                             if ".".join(parts[:k]) in SOURCES), None)
            if resolved is not None and resolved != name:
                deps.add(resolved)
        graph[name] = deps
    return graph


def test_no_module_imports_itself_through_others():
    """No import circle among the package's modules, counting imports inside functions
    (the evidence plan lives with the verdict; only workers.launch picks one process or
    several, so the server never imports workers)."""
    graph = import_graph()
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" → ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not circles, circles[:5]
