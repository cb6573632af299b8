"""The package map's dependency rules (docs/ARCHITECTURE.md), checked by scanning the sources.

engine never imports worker, producer or protocol; kernels never import engine; protocol imports none of
spool's packages; worker never imports producer; producer never imports worker or engine; the gateway never
imports engine or worker (nor torch); nothing shipped imports the test support; bench never imports the test
suite; no import cycles at module level; the producer verbs of the CLI and `spool serve` never load torch; only
`spool` sits at the top level, and no bench or test module is named like an installed module.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# spool's parts, each a set of paths under the repository root; every part but tests and bench lives in the
# one top-level package `spool` (a distribution installs no other top-level name: a generic one such as
# `kernels` collides with other distributions, as Hugging Face's `kernels` did once transformers required it).
PARTS = {
    "engine": ("spool/engine",),
    "kernels": ("spool/kernels",),
    "protocol": ("spool/protocol",),
    "worker": ("spool/worker",),
    "producer": ("spool/producer",),
    "gateway": ("spool/gateway",),
    "cli": ("spool/cli", "spool/demo.py", "spool/__main__.py"),
    "testing": ("spool/testing",),
    "root": ("spool/__init__.py",),
}
PACKAGES = tuple(PARTS)
ALL_OURS = (*PACKAGES, "tests", "bench")

# part -> parts it must never import (at any depth, lazily or not)
FORBIDDEN = {
    "kernels": {"engine", "worker", "producer", "protocol", "gateway", "cli", "testing", "tests", "bench"},
    "engine": {"worker", "producer", "protocol", "gateway", "cli", "testing", "tests", "bench"},
    "protocol": {"engine", "kernels", "worker", "producer", "gateway", "cli", "testing", "tests", "bench"},
    "worker": {"producer", "gateway", "cli", "testing", "tests", "bench"},
    "producer": {"engine", "kernels", "worker", "gateway", "cli", "testing", "tests", "bench"},
    # the HTTP face: `spool serve` runs without torch, so never the engine's side of the queue
    "gateway": {"engine", "kernels", "worker", "cli", "testing", "tests", "bench"},
    "cli": {"tests", "bench"},
    "testing": {"tests", "bench"},
    "bench": {"tests"},
    # `import spool.protocol` runs spool/__init__.py first: it must load nothing
    "root": set(ALL_OURS) - {"root"},
}


def _part(name: str) -> str | None:
    """The part a dotted module name belongs to (None: not ours)."""
    top, _, rest = name.partition(".")
    if top in ("tests", "bench"):
        return top
    if top != "spool":
        return None
    sub = rest.split(".")[0]
    if not sub:
        return "root"
    if sub in ("cli", "demo", "__main__"):
        return "cli"
    return sub if sub in PARTS else None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(part: str) -> list[Path]:
    paths = PARTS.get(part, (part,))
    return sorted(f for p in paths for f in ([ROOT / p] if p.endswith(".py") else (ROOT / p).rglob("*.py")))


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
    # `from spool import engine` names spool and spool.engine: the bare parent is no dependency of its own
    return {n for n in names if _part(n) is not None and n != "spool"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_rules(package):
    bad = []
    for path in _sources(package):
        for name in _imports(path, top_level_only=False):
            if _part(name) in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles():
    modules = {_module_name(p): p for top in PACKAGES for p in _sources(top)}
    graph = {}
    for name, path in modules.items():
        # `from spool.producer import ops` is an edge to spool.producer.ops when that is a module, else to
        # spool.producer.
        graph[name] = {n if n in modules else n.rsplit(".", 1)[0] for n in _imports(path, top_level_only=True)}
        # A module importing its own package (`from spool.kernels import reference` inside spool/kernels/) is no
        # cycle:
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
            "import spool.producer, spool.producer.batch, spool.producer.admin; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_gateway_does_not_import_torch():
    code = ("import sys; from spool.cli.main import build_parser; "
            "build_parser(worker_flags=False).parse_args(['serve']); "
            "import spool.gateway.app, spool.gateway.server; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_every_package_has_a_docstring():
    inits = [ROOT / "spool" / "__init__.py"] + [ROOT / p / "__init__.py" for paths in PARTS.values() for p in paths
                                                if not p.endswith(".py")]
    missing = [str(f.relative_to(ROOT)) for f in inits if not ast.get_docstring(ast.parse(f.read_text()))]
    assert not missing, f"packages without a docstring: {missing}"


def test_one_top_level_package():
    """The distribution installs `spool` and nothing else at the top level of site-packages."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["spool*"]' in text
    strays = [p.name for p in ROOT.iterdir()
              if (p / "__init__.py").exists() and p.name not in ("spool", "tests", "bench")]
    assert not strays, f"top-level packages outside spool/: {strays}"


def test_no_script_shadows_an_installed_module():
    """`python bench/x.py` puts bench/ first on sys.path, so a bench module named like an installed top-level
    module (bench/kernels.py and Hugging Face's `kernels`, which transformers imports) would replace it."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    clashes = [str(p.relative_to(ROOT)) for d in ("bench", "tests") for p in (ROOT / d).glob("*.py")
               if p.stem in installed]
    assert not clashes, f"rename these, they shadow installed modules: {clashes}"
