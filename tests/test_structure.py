"""The library's shape (issue #14): no import cycle between isep's modules, none imported from inside
a function, and no module over 600 lines (samples.py, the synthetic-save builder, aside)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "isep"
MAX_LINES = 600
LONG_ALLOWED = {"isep.samples"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """The isep modules an import statement loads (from . import x: the module x when it is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    package = module.split(".")
    if not module_name_is_package(module):
        package = package[:-1]
    base = package[:len(package) - node.level + 1] if node.level else []
    target = ".".join(base + (node.module.split(".") if node.module else []))
    found = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
    if target in known and (node.module or not found):
        found.add(target)
    return found


def module_name_is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> isep modules it imports, wherever the import statement stands (inside a function
    too: such an import can hide a cycle); and where the imports inside functions are."""
    known = set(modules())
    graph: dict[str, set[str]] = {}
    nested: set[str] = set()
    for module, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= imported(module, node, known) - {module}
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and imported(module, node, known):
                        nested.add(f"{module}:{node.lineno}")
    return graph, sorted(nested)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from its smallest module)."""
    found = set()
    out = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                ring = path[path.index(nxt):]
                start = ring.index(min(ring))
                key = tuple(ring[start:] + ring[:start])
                if key not in found:
                    found.add(key)
                    out.append(list(key) + [key[0]])
            else:
                walk(nxt, path + [nxt])

    for module in sorted(graph):
        walk(module, [module])
    return out


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert graph["isep.join"] >= {"isep.parts", "isep.files"}  # the walk sees relative imports
    assert cycles(graph) == []


def test_a_cycle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_isep_module_is_imported_inside_a_function():
    _, nested = import_graph()
    # the CLI layer may defer heavy imports to keep start-up fast; the library core may not
    assert [n for n in nested if not n.startswith("isep.cli")] == []


def test_a_plain_pack_loads_only_what_it_runs():
    """isep-pack's start-up is an eighth of a 256 MiB pack: its deltas, isula layout, stream output
    and registry client load only when a run asks for them."""
    code = ("import sys, isep.cli.pack; print(' '.join(sorted(m for m in sys.modules if m in "
            "('isep.cli.pack', 'isep.delta', 'isep.deltapack', 'isep.isula', 'isep.stream', 'isep.registry', "
            "'backports.zstd', 'http.client'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.split() == ["isep.cli.pack"]


def test_a_command_keeps_its_imports_out_of_the_collector():
    """launch freezes what the imports made: no collection, the interpreter's exit included, walks it."""
    code = ("import atexit, gc, sys; import isep.cli.index as m; "
            "atexit.register(lambda: print(gc.get_freeze_count(), file=sys.stderr)); "
            "sys.argv = ['isep-index', '--version']; m.main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert res.returncode == 0 and res.stdout.startswith("isep ")
    assert int(res.stderr) > 10_000  # typer's and isep's modules, classes and functions


def test_no_module_is_over_600_lines():
    long = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    assert {m: n for m, n in long.items() if n > MAX_LINES and m not in LONG_ALLOWED} == {}


def test_the_library_core_does_not_import_the_cli():
    graph, _ = import_graph()
    assert {m for m, deps in graph.items() if not m.startswith("isep.cli") and any(
        d.startswith("isep.cli") for d in deps)} == set()


if __name__ == "__main__":  # the module map with its imports, for a reader
    graph, nested = import_graph()
    for module in sorted(graph):
        print(f"{module}: {', '.join(sorted(d.removeprefix('isep.') for d in graph[module])) or '-'}")
    print("cycles:", cycles(graph) or "none")
    print("imports inside functions:", nested or "none")
