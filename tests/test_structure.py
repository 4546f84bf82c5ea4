"""Structure of the package, read from the source with ``ast`` (nothing is imported).

- No import cycle among the modules of ``src/dida``, counting only imports that run when a module is
  imported: imports inside functions and under ``if TYPE_CHECKING:`` do not count.
- No function or method in ``dida.uda`` or ``dida.engine`` is longer than ``MAX_FUNCTION_LINES``
  (from the ``def`` line to the last line of the body, docstring included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dida"
MAX_FUNCTION_LINES = 80
LENGTH_CHECKED = ("uda", "engine")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (not in functions, not TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            found += _import_time_imports(node.orelse)
        else:  # class bodies, try/except, with, plain if: all run at import time
            for field in ("body", "orelse", "finalbody", "handlers"):
                found += _import_time_imports(getattr(node, field, []) or [])
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _with_ancestors(target: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """``target`` and the packages Python initialises to import it (other than the importer's own)."""
    parts = target.split(".")
    names = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    return {n for n in names if n in modules and (n == target or n not in own)}


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``dida`` modules it imports at import time."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _import_time_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, is_package, node)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target == PACKAGE or not target.startswith(PACKAGE + "."):
                    continue
                while target not in modules and "." in target:  # `from pkg import function`
                    target = target.rsplit(".", 1)[0]
                deps |= _with_ancestors(target, name, modules)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def long_functions(max_lines: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``path:line qualified_name`` and length of every too-long function in the checked packages."""
    found = []
    for sub in LENGTH_CHECKED:
        for path in sorted((SRC / PACKAGE / sub).rglob("*.py")):
            found += _long_in(ast.parse(path.read_text(), str(path)), path.relative_to(SRC.parent), max_lines)
    return found


def _long_in(tree: ast.AST, rel: Path, max_lines: int, prefix: str = "") -> list[tuple[str, int]]:
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qualname = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                if length > max_lines:
                    found.append((f"{rel}:{node.lineno} {qualname}", length))
            found += _long_in(node, rel, max_lines, qualname + ".")
        else:
            found += _long_in(node, rel, max_lines, prefix)
    return found


# ------------------------------------------------------------------------------------------ tests


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among dida modules (import-time imports only):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_functions_in_uda_and_engine_are_short():
    too_long = long_functions()
    assert not too_long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
        f"  {where}: {n} lines" for where, n in too_long
    )


# ----------------------------------------------------------------------- the checkers themselves


def _graph_of(tmp_path: Path, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    return import_graph()


def test_cycle_checker_counts_import_time_imports_only(tmp_path, monkeypatch):
    graph = _graph_of(tmp_path, {
        "__init__.py": "",
        "a.py": "from dida.b import f\n",
        "b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dida.a import g\n"
                 "def f():\n    from dida.a import g\n"),
        "pkg/__init__.py": "from .c import h\n",
        "pkg/c.py": "try:\n    import dida.d\nexcept ImportError:\n    pass\n",
        "d.py": "class D:\n    from dida.pkg import c\n",
    }, monkeypatch)
    assert graph["dida.a"] == {"dida.b"} and graph["dida.b"] == set()
    assert graph["dida.pkg"] == {"dida.pkg.c"} and graph["dida.pkg.c"] == {"dida.d"}
    assert graph["dida.d"] == {"dida.pkg", "dida.pkg.c"}
    assert find_cycles(graph) == [["dida.d", "dida.pkg", "dida.pkg.c"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_length_checker_counts_def_to_last_line():
    body = "".join(f"        x{i} = {i}\n" for i in range(78))
    source = f'class A:\n    def ok(self):\n        """Doc."""\n{body}\n    def long(self):\n        """Doc."""\n{body}        return 1\n'
    assert _long_in(ast.parse(source), Path("m.py"), 80) == [("m.py:83 A.long", 81)]
