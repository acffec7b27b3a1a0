"""The package's rooms: imports run one way, the worker side stays light, Kafka clients have one home."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "workers" / "embedstream"

# What a worker process runs: nothing here may import the model side when the module loads.
WORKER_SIDE = (
    "embedstream.worker",
    "embedstream.consume",
    "embedstream.sinks",
    "embedstream.modalities",
    "embedstream.inference.triton",
    "embedstream.inference.shm",
    "embedstream.inference.base",
    "embedstream.kafka_io",
    "embedstream.service",
    "embedstream.config",
    "embedstream.errors",
    "embedstream.metrics",
    "embedstream.health",
    "embedstream.records",
    "embedstream.lineage",
    "embedstream.anomaly",
    "embedstream.encoders._spec",
    "embedstream.encoders._registry",
)
MODEL_SIDE = ("torch", "timm", "transformers", "torchvision", "embedstream.export", "embedstream.training")
TOOLS = ("rich", "matplotlib", "embedstream.local")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Modules imported when this one loads: top-level statements, not functions or TYPE_CHECKING blocks."""
    found: set[str] = set()
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                stack.extend(handler.body)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _load_time_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in modules and m != name} | {
            m for m in imported if not m.startswith("embedstream")
        }
    return graph


GRAPH = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        for w in GRAPH.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_import_graph_has_no_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(WORKER_SIDE)))
def test_the_worker_side_loads_no_model_or_tool_code(module):
    heavy = {m for m in _reachable(module) if m.split(".")[0] in ("torch", "timm", "transformers", "torchvision")}
    heavy |= {m for m in _reachable(module) if m.startswith(MODEL_SIDE + TOOLS)}
    assert heavy == set(), f"{module} loads {sorted(heavy)}"


def test_kafka_clients_are_built_in_one_module():
    constructor = re.compile(r"\b(KafkaConsumer|KafkaProducer|KafkaAdminClient)\(")
    homes = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if constructor.search(p.read_text()))
    assert homes == ["embedstream.kafka_io"]


def _all_imports(path: Path) -> set[str]:
    """Every module a file imports, inside functions too: a lazy import is still a dependency."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("room", ["training", "stores"])
def test_the_model_and_store_side_never_import_the_local_tools(room):
    # local builds on training (fitting the demo's detector) and stores (the demo's sinks), not the other way
    offenders = {
        _module_name(p): sorted(m for m in _all_imports(p) if m.startswith("embedstream.local"))
        for p in (PACKAGE / room).rglob("*.py")
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def _subpackage_edges() -> dict[str, set[str]]:
    """Which subpackage imports which, counting every import, also those inside functions."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2:
            continue  # top-level modules are the rooms between subpackages, not one of them
        src = rel.parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "embedstream" and len(parts) > 1 and parts[1] != src:
                    edges.setdefault(src, set()).add(parts[1])
    return edges


def test_subpackages_import_each_other_one_way_even_inside_functions():
    edges = _subpackage_edges()
    both = sorted((a, b) for a, out in edges.items() for b in out if a < b and a in edges.get(b, set()))
    assert both == []
