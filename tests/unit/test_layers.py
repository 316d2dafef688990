"""The package's layering (docs/architecture.md): import-linter's contracts hold, no module is part of an import
cycle (imports inside functions count), and no function grows back into a several-job monolith."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fedsim"
MAX_FUNCTION_LINES = 60


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    # the package's own __init__ only names its public API for lazy import; every other module counts
    modules = sorted(m for m in graph.modules if m.startswith("fedsim."))
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if not w.startswith("fedsim."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.find_modules_directly_imported_by(v):
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for m in modules:
            if m not in index:
                visit(m)
    finally:
        sys.setrecursionlimit(limit)  # other tests rely on the default (deep YAML must still raise)
    return out


def test_no_import_cycles():
    graph = grimp.build_graph("fedsim", exclude_type_checking_imports=True, cache_dir=None)
    assert len([m for m in graph.modules if m.startswith("fedsim.")]) > 100  # the whole package was read
    assert _cycles(graph) == []


def test_a_cycle_is_found():
    """The cycle check itself can fail: two modules that import each other are one."""
    graph = grimp.ImportGraph()
    for m in ("fedsim.a", "fedsim.b", "fedsim.c"):
        graph.add_module(m)
    graph.add_import(importer="fedsim.a", imported="fedsim.b")
    graph.add_import(importer="fedsim.b", imported="fedsim.a")
    graph.add_import(importer="fedsim.c", imported="fedsim.a")
    assert _cycles(graph) == [["fedsim.a", "fedsim.b"]]


def test_no_function_is_a_monolith():
    longest = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    longest.sort(reverse=True)
    assert longest[0][0] <= MAX_FUNCTION_LINES, longest[:5]
