"""The package's import graph: no two modules import each other (directly or round a longer loop), and rollout/,
which RL and `rlhfkit eval` share, takes nothing from train/. Imports inside functions count as well: a lazy
import hides a cycle from Python's start-up, not from a reader."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, whether it is a package's __init__)."""
    out = {}
    for path in (SRC / "rlhfkit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imported_modules(module: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from pkg import name` imports the module pkg.name when there is one, else a name from pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a name inside a module: that module
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: imported_modules(m, path, is_pkg, set(modules)) for m, (path, is_pkg) in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the modules along it (depth-first search for edges back into the path)."""
    found, done = [], set()

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def test_the_graph_sees_relative_lazy_and_submodule_imports():
    graph = import_graph()
    assert "rlhfkit.engine.distributed" in graph["rlhfkit.train.common"]  # from ..engine import distributed as D
    assert "rlhfkit.rewards.verifiers" in graph["rlhfkit.rewards.sources"]  # from . import verifiers
    assert "rlhfkit.engine.precision" in graph["rlhfkit.models.loading"]  # imported inside a function
    assert "rlhfkit.train.sft" in graph["rlhfkit.cli"]  # from .train.sft import run_sft, inside a function


def test_cycles_finds_a_loop_through_three_modules():
    loop = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(loop) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_round_a_loop():
    assert cycles(import_graph()) == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("below", ["rlhfkit.rollout", "rlhfkit.engine", "rlhfkit.sequences", "rlhfkit.models"])
def test_shared_layers_take_nothing_from_train_even_through_other_modules(below):
    graph = import_graph()
    uses = {m: sorted(t for t in reachable(graph, m) if t.startswith("rlhfkit.train"))
            for m in graph if m == below or m.startswith(below + ".")}
    assert {m: t for m, t in uses.items() if t} == {}
