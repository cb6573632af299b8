"""The package map's dependency rules (docs/ARCHITECTURE.md), checked by scanning the sources.

engine never imports worker, producer or protocol; kernels never import engine; protocol imports none of
spool's packages; worker never imports producer; producer never imports worker or engine; the gateway never
imports engine or worker (nor torch); nothing shipped imports the test support; bench never imports the test
suite; no import cycles at module level; the producer verbs of the CLI and `spool serve` never load torch.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "protocol", "worker", "producer", "gateway", "spool", "spool_testing")
ALL_OURS = (*PACKAGES, "tests", "bench")

# package -> packages it must never import (at any depth, lazily or not)
FORBIDDEN = {
    "kernels": {"engine", "worker", "producer", "protocol", "gateway", "spool", "spool_testing", "tests", "bench"},
    "engine": {"worker", "producer", "protocol", "gateway", "spool", "spool_testing", "tests", "bench"},
    "protocol": {"engine", "kernels", "worker", "producer", "gateway", "spool", "spool_testing", "tests", "bench"},
    "worker": {"producer", "gateway", "spool", "spool_testing", "tests", "bench"},
    "producer": {"engine", "kernels", "worker", "gateway", "spool", "spool_testing", "tests", "bench"},
    # the HTTP face: `spool serve` runs without torch, so never the engine's side of the queue
    "gateway": {"engine", "kernels", "worker", "spool", "spool_testing", "tests", "bench"},
    "spool": {"tests", "bench"},
    "spool_testing": {"tests", "bench"},
    "bench": {"tests"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names imported by a file (`from a import b` yields a.b and a); top_level_only skips bodies of
    functions and classes (lazy imports cannot form a cycle at import time)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also look inside module-level if/try blocks
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in ALL_OURS}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_rules(package):
    bad = []
    for path in _sources(package):
        for name in _imports(path, top_level_only=False):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles():
    modules = {_module_name(p): p for top in PACKAGES for p in _sources(top)}
    graph = {}
    for name, path in modules.items():
        # `from producer import ops` is an edge to producer.ops when that is a module, else to producer.
        graph[name] = {n if n in modules else n.rsplit(".", 1)[0] for n in _imports(path, top_level_only=True)}
        # A module importing its own package (`from kernels import reference` inside kernels/) is no cycle:
        # the package is already in sys.modules, partly initialised, and only its submodule is fetched.
        graph[name] = {n for n in graph[name] if n in modules and n != name and not name.startswith(n + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_producer_verbs_do_not_import_torch():
    code = ("import sys; from spool.cli.main import build_parser; "
            "build_parser(worker_flags=False).parse_args(['status']); "
            "import producer, producer.batch, producer.admin; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_gateway_does_not_import_torch():
    code = ("import sys; from spool.cli.main import build_parser; "
            "build_parser(worker_flags=False).parse_args(['serve']); "
            "import gateway.app, gateway.server; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_every_package_has_a_docstring():
    missing = [top for top in PACKAGES if not ast.get_docstring(ast.parse((ROOT / top / "__init__.py").read_text()))]
    assert not missing, f"packages without a docstring in __init__.py: {missing}"
