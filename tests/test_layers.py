"""The llava_pipeline package, the stages and the bench/ scripts are layered: their import
graph (top-level and function-local imports alike) has no cycles, so every module can be read
and tested on top of the ones below it; no module imports a command-line entry point; and
nothing in llava_pipeline/ or stages/ imports bench/ (the benchmarks are scripts on top of
the library, not part of it). A function-local import counts as an edge like any other:
deferring an import hides a cycle from Python, not from the reader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_dag_deps import _module_file

PACKAGE = ROOT / "llava_pipeline"
BENCH = ROOT / "bench"
STAGES = ROOT / "stages"
FOLDERS = (PACKAGE, STAGES, BENCH)


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _edges(path: Path, source: str | None = None) -> dict[Path, list[str]]:
    """The project's modules (FOLDERS) that `path` (or `source` read as if it were there)
    imports -> where: `line 12`, `line 40, in a function`."""
    package = _dotted(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    else:
        package = package.removesuffix(".__init__")
    out: dict[Path, list[str]] = {}

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in child.names]
            else:
                visit(child, inner)
                continue
            for name in names:
                target = _module_file(name) if name.split(".")[0] in {f.name for f in FOLDERS} else None
                if target is not None and target != path:
                    where = f"line {child.lineno}" + (", in a function" if local else "")
                    out.setdefault(target, [])
                    if where not in out[target]:
                        out[target].append(where)

    visit(ast.parse(path.read_text() if source is None else source), False)
    return out


def import_graph() -> dict[Path, dict[Path, list[str]]]:
    return {p: _edges(p) for folder in FOLDERS for p in sorted(folder.rglob("*.py"))}


def cycles(graph: dict[Path, dict[Path, list[str]]]) -> list[list[Path]]:
    """One shortest cycle per strongly connected component of more than one module."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    components: list[list[Path]] = []

    def strongconnect(v: Path) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    found = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        # Breadth-first from `start` inside the component, back to `start`: a shortest cycle.
        paths = {start: [start]}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        found.append(cycle)
    return found


def describe(cycle: list[Path], graph) -> str:
    steps = [_dotted(cycle[0]).removeprefix("llava_pipeline.")]
    for a, b in zip(cycle, cycle[1:]):
        steps.append(f"-> {_dotted(b).removeprefix('llava_pipeline.')} ({'; '.join(graph[a][b])})")
    return " ".join(steps)


def test_the_graph_sees_top_level_and_function_local_imports():
    source = (
        "import torch\nfrom . import measure\nfrom llava_pipeline.pipeline.stage import run\n\n"
        "def f():\n    from llava_pipeline.base.config import load\n"
    )
    assert _edges(BENCH / "x.py", source) == {
        BENCH / "__init__.py": ["line 2"],
        BENCH / "measure.py": ["line 2"],
        PACKAGE / "pipeline" / "stage.py": ["line 3"],
        PACKAGE / "base" / "config.py": ["line 6, in a function"],
    }
    assert _edges(PACKAGE / "verify" / "x.py", "from ..pipeline.stage import run\nimport bench.measure\n") == {
        PACKAGE / "pipeline" / "stage.py": ["line 1"],
        BENCH / "measure.py": ["line 2"],
    }
    graph = import_graph()
    assert {
        BENCH / "runtime.py",
        BENCH / "peers" / "timing.py",
        STAGES / "evaluate.py",
        PACKAGE / "pipeline" / "stage.py",
    } <= set(graph)
    assert cycles({Path("a"): {Path("b"): ["line 1"]}, Path("b"): {Path("a"): ["line 2, in a function"]}}) == [
        [Path("a"), Path("b"), Path("a")]
    ]


def test_the_package_import_graph_has_no_cycles():
    graph = import_graph()
    found = cycles(graph)
    if found:
        pytest.fail(
            "import cycles in llava_pipeline / stages / bench:\n  " + "\n  ".join(describe(c, graph) for c in found)
        )


# Command-line entry points: the top of the graph, imported by no module of the package.
ENTRY_POINTS = (
    *(PACKAGE / name for name in ("run.py", "sweep.py", "evaluate.py", "params.py", "test_pte.py")),
    PACKAGE / "verify" / "__main__.py",
    BENCH / "__main__.py",
    BENCH / "peers" / "__main__.py",
)


def test_no_module_imports_a_command_line_entry_point():
    graph = import_graph()
    found = [
        f"{_dotted(a)} imports {_dotted(b)} ({'; '.join(where)})"
        for a, edges in graph.items()
        for b, where in edges.items()
        if b in ENTRY_POINTS
    ]
    assert not found, found


def test_the_library_and_the_stages_do_not_import_bench():
    graph = import_graph()
    found = [
        f"{_dotted(a)} imports {_dotted(b)} ({'; '.join(where)})"
        for a, edges in graph.items()
        if BENCH not in a.parents
        for b, where in edges.items()
        if BENCH in b.parents
    ]
    assert not found, found


# The package's layers, bottom first, one folder each (README's Layout lists them the same way).
# A module may import modules of its own layer or of the layers below it, never above.
LAYERS = ("base", "formats", "model", "export", "pipeline", "runtime", "verify")
# The modules at the package's top level: the command-line entry points, above every layer.
TOP = tuple(p.name for p in ENTRY_POINTS if p.parent == PACKAGE)


def _layer_of(path: Path) -> int | None:
    parts = path.relative_to(PACKAGE).parts
    if parts == ("__init__.py",):  # the package docstring; imports nothing
        return 0
    if len(parts) == 1:
        return len(LAYERS) if parts[0] in TOP else None
    return LAYERS.index(parts[0]) if parts[0] in LAYERS and len(parts) == 2 else None


def test_every_module_sits_in_a_layer_folder_and_imports_only_downwards():
    graph = import_graph()
    modules = [p for p in graph if PACKAGE in p.parents]
    assert not [_dotted(p) for p in modules if _layer_of(p) is None], f"modules outside {LAYERS} and {TOP}"
    assert {p.relative_to(PACKAGE).parts[0] for p in modules} == set(LAYERS) | set(TOP) | {"__init__.py"}
    names = [*LAYERS, "entry points"]
    upward = [
        f"{_dotted(a)} ({names[_layer_of(a)]}) imports {_dotted(b)} ({names[_layer_of(b)]}; {'; '.join(where)})"
        for a in modules
        for b, where in graph[a].items()
        if PACKAGE in b.parents and _layer_of(b) > _layer_of(a)
    ]
    assert not upward, upward


def test_the_readme_lists_the_layers_and_their_modules_as_the_tree_has_them():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("\nllava_pipeline/ ") : text.index("\nbench/ ")]
    listed: dict[str, list[str]] = {}
    layer = "."
    for line in block.splitlines()[2:]:
        if len(line) - len(line.lstrip()) > 4:  # a description's continuation
            continue
        names = line.strip().split("   ")[0]
        if line.startswith("    "):
            listed[layer] += [n.removesuffix(",") for n in names.split()]
        elif names.endswith("/"):
            layer = names.removesuffix("/")
            listed[layer] = []
        else:
            layer = "."
            listed.setdefault(layer, []).extend(n.removesuffix(",") for n in names.split())
    on_disk = {
        folder: sorted(p.name for p in (PACKAGE / folder).glob("*.py") if p.name != "__init__.py")
        for folder in [*LAYERS, "."]
    }
    assert list(listed) == [*LAYERS, "."], "README's layers are not LAYERS, bottom first"
    assert {k: sorted(v) for k, v in listed.items()} == on_disk
    assert on_disk["."] == sorted(TOP)
