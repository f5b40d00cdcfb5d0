"""Where code lives: no import cycle between the package's modules (function-level imports and
``TYPE_CHECKING`` ones included), no module over 400 lines, no file name used on two sides for
two things, and server, client and shared importing one way only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"batchfeed": REPO / "batchfeed",
            "batchfeed.transforms": REPO / "batchfeed" / "transforms",
            "batchfeed.server": REPO / "server",
            "batchfeed.server.sources": REPO / "server" / "sources",
            "batchfeed.client": REPO / "client", "batchfeed.shared": REPO / "shared"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for f in folder.glob("*.py"):
            out[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in it."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{node.module}" if node.module else parent
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            out.update(subs)
            if len(subs) < len(node.names) and base in known:
                out.add(base)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_server_and_client_import_shared_never_each_other() -> None:
    known = modules()
    for name, path in known.items():
        for target in imports(name, path, known):
            for a, b in (("server", "client"), ("client", "server"), ("shared", "server"),
                         ("shared", "client")):
                assert not (name.startswith(f"batchfeed.{a}") and
                            target.startswith(f"batchfeed.{b}")), f"{name} imports {target}"


def test_no_module_over_400_lines() -> None:
    long = {str(path.relative_to(REPO)): n for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    long.update({str(p.relative_to(REPO)): n for p in (REPO / "benchmarks").glob("*.py")
                 if (n := len(p.read_text().splitlines())) > MAX_LINES})
    assert long == {}


def test_a_file_name_says_which_side_it_is_on() -> None:
    names: dict[str, list[str]] = {}
    for folder in [*PACKAGES.values(), REPO / "benchmarks"]:
        for f in folder.glob("*.py"):
            if f.stem not in ("__init__", "__main__"):
                stem = f.stem.rstrip("s")  # transform and transforms are one name
                names.setdefault(stem, []).append(str(f.relative_to(REPO)))
    assert {stem: paths for stem, paths in names.items() if len(paths) > 1} == {}
