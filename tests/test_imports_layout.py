"""Import layout (issue 7): neither the library nor the tests reach into benches/, and the demo's modules import one
another without a circle. Checked by parsing the sources with `ast`, so function-local imports count too (imports
under `if TYPE_CHECKING:` do not: they never run)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_runtime(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk without the bodies of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _walk_runtime(other)
            continue
        yield child
        yield from _walk_runtime(child)


def _imports(path: Path) -> set[str]:
    """Every module named by an import in `path` (absolute, relative ones resolved), and `from m import x` also as
    m.x (x may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _dynamic_imports(path: Path) -> set[str]:
    """String constants passed to importlib.import_module / __import__."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.add(node.args[0].value)
    return out


def _offenders(folder: str, top: str, dynamic: bool = False) -> list[str]:
    bad = []
    for p in _sources(folder):
        names = _dynamic_imports(p) if dynamic else _imports(p)
        hits = sorted(n for n in names if n == top or n.startswith(top + "."))
        if hits:
            bad.append(f"{p.relative_to(ROOT)}: {hits}")
    return bad


def test_library_does_not_import_benches() -> None:
    assert _offenders("nlsr_fast", "benches") == []


def test_library_does_not_load_benches_dynamically() -> None:
    assert _offenders("nlsr_fast", "benches", dynamic=True) == []


def test_tests_do_not_import_benches() -> None:
    assert _offenders("tests", "benches") == []
    assert _offenders("tests", "benches", dynamic=True) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_graph(folder: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in _sources(folder)}
    return {m: {n for n in _imports(p) if n in files and n != m} for m, p in files.items()}


def test_demo_modules_have_no_import_circle() -> None:
    graph = _package_graph("nlsr_fast/demo")
    # the package's __init__ imports its modules; a module importing its own package is not what this rule is about
    graph = {m: deps - {"nlsr_fast.demo"} for m, deps in graph.items()}
    assert "nlsr_fast.demo.train" in graph and "nlsr_fast.demo.evaluate" in graph
    assert "nlsr_fast.demo.evaluate" not in graph["nlsr_fast.demo.train"]
    assert "nlsr_fast.demo.train" not in graph["nlsr_fast.demo.evaluate"]
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
