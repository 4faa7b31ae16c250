"""The package's shape: no file over 400 lines, no function over 60, no import cycle between its modules.

Imports are read with `ast`, function-level ones included (an import inside a function still ties the two
modules together). The EXEMPT sets list what is still over, each with why; an entry that is no longer over
must leave its set, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lwpipe"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60

EXEMPT_FILES: set[str] = set()
EXEMPT_FUNCTIONS: set[str] = set()
EXEMPT_IMPORTS: set[tuple[str, str]] = set()


def sources() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def long_functions(tree: ast.AST) -> dict[str, int]:
    """Qualified name (Class.method) -> lines, for every function longer than MAX_FUNCTION_LINES."""
    out = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        out[name] = lines
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (function-level imports included)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {known(a.name) for a in node.names if a.name.split(".")[0] == "lwpipe"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "lwpipe":
                continue
            for a in node.names:  # `from lwpipe import gptq` imports the module lwpipe.gptq
                full = f"{base}.{a.name}"
                out.add(full if full in modules else known(base))
    return out - {None, module}


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.add(m)
                    if m == node:
                        break
                if len(component) > 1:
                    cycles.append(frozenset(component))
    return cycles


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_no_file_over_the_limit():
    lines = {relative(p): len(p.read_text().splitlines()) for p in sources().values()}
    over = {f: n for f, n in lines.items() if n > MAX_FILE_LINES}
    assert set(over) <= EXEMPT_FILES, f"files over {MAX_FILE_LINES} lines: {sorted(set(over) - EXEMPT_FILES)}"
    stale = EXEMPT_FILES - set(over)
    assert not stale, f"no longer over {MAX_FILE_LINES} lines, take them out of EXEMPT_FILES: {sorted(stale)}"


def test_no_function_over_the_limit():
    over = {
        f"{relative(p)}:{name}": n
        for p in sources().values()
        for name, n in long_functions(ast.parse(p.read_text())).items()
    }
    new = {k: v for k, v in over.items() if k not in EXEMPT_FUNCTIONS}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines: {new}"
    stale = EXEMPT_FUNCTIONS - set(over)
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines, take them out of EXEMPT_FUNCTIONS: {sorted(stale)}"


def test_no_import_cycle():
    modules = sources()
    graph = {m: imported_modules(m, p, modules) for m, p in modules.items()}
    stale = {(a, b) for a, b in EXEMPT_IMPORTS if b not in graph.get(a, ())}
    assert not stale, f"these imports are gone, take them out of EXEMPT_IMPORTS: {sorted(stale)}"
    for a, b in EXEMPT_IMPORTS:
        graph[a] = graph[a] - {b}
    cycles = [sorted(c) for c in import_cycles(graph)]
    assert not cycles, f"import cycles (function-level imports included): {cycles}"


def test_the_checks_see_what_they_must():
    """The helpers find a long function, a function-level import and a cycle in code made up for the test."""
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"class A:\n    def f(self):\n{body}        return 0\n\n    def g(self):\n        return 1\n")
    assert long_functions(tree) == {"A.f": MAX_FUNCTION_LINES + 2}
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_count(tmp_path):
    (tmp_path / "lwpipe").mkdir()
    path = tmp_path / "lwpipe" / "core.py"
    path.write_text("def f():\n    from lwpipe.stages import prune\n    from . import other\n")
    modules = {"lwpipe.core": path, "lwpipe.stages": path, "lwpipe.stages.prune": path, "lwpipe.other": path}
    assert imported_modules("lwpipe.core", path, modules) == {"lwpipe.stages.prune", "lwpipe.other"}
