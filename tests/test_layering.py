"""The layers point one way: the core (`mars_core`) never imports the study pipeline (`analysis`),
and no import circle exists inside the core.

Two independent checks: a scan of every import statement in the core's source (module level and
inside functions), and importing every core module in a fresh interpreter where `analysis` cannot
be imported at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "mars_core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved; for
    `from pkg import name`, pkg.name when that is a module of the core, else pkg)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found = False
            for a in node.names:
                sub = f"{target}.{a.name}"
                if _core_file(sub) is not None:
                    out.add(sub)
                    found = True
            if not found:
                out.add(target)
    return out


def _core_file(name: str) -> Path | None:
    if not name.startswith("mars_core"):
        return None
    p = ROOT.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def _core_graph() -> dict[str, set[str]]:
    graph = {}
    for path in CORE.rglob("*.py"):
        mod = _module_name(path)
        graph[mod] = {t for t in _imports(path) if t.startswith("mars_core")}
    return graph


def test_core_never_imports_the_pipeline():
    offenders = {}
    for path in CORE.rglob("*.py"):
        bad = sorted(t for t in _imports(path) if t == "analysis" or t.startswith("analysis."))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"core modules import the pipeline: {offenders}"


def test_no_import_circle_inside_the_core():
    """Edges are explicit imports between core modules; the root package `mars_core` (the API
    facade that re-exports everything) is not a node."""
    graph = {m: {t for t in ts if t != "mars_core" and t in _core_graph_nodes()} for m, ts in _core_graph().items()
             if m != "mars_core"}
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import circles in the core: " + "; ".join(" -> ".join(c) for c in cycles)


def _core_graph_nodes() -> set[str]:
    return {_module_name(p) for p in CORE.rglob("*.py")}


def test_the_scan_sees_a_planted_pipeline_import(tmp_path):
    """The scan is not vacuous: an import of `analysis` inside a function is found."""
    p = CORE / "_planted_for_test.py"
    p.write_text("def f():\n    from analysis.reproduce import run\n    return run\n")
    try:
        assert "analysis.reproduce" in _imports(p)
    finally:
        p.unlink()


def test_every_core_module_imports_without_the_pipeline():
    code = """
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "analysis" or name.startswith("analysis."):
            raise ImportError(f"the pipeline package {name!r} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
import mars_core
failed = []
for info in pkgutil.walk_packages(mars_core.__path__, "mars_core."):
    try:
        importlib.import_module(info.name)
    except ImportError as e:
        failed.append(f"{info.name}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
