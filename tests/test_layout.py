"""The package's layout (docs/design.md) holds: every module imports on its own, no import circle (imports inside
functions count too), and no stage imports a later one."""
import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "sft"
# Stages in import order: a module may import its own stage and the ones before it, never a later one.
STAGES = ("base", "model", "data", "run", "training", "check", "results", "commands")
COMMANDS = {"sft", "sft.cli", "sft.cli_output"}  # the public API and the command line sit on top


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str:
    if module in COMMANDS:
        return "commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else "base"


def imports_of(module: str) -> set[str]:
    """The sft modules MODULE imports anywhere in its code, each resolved to the module file it loads."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sft"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sft":
            for alias in node.names:  # `from sft.run import lock` imports the module sft.run.lock
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_imports_on_its_own():
    for module in MODULES:
        importlib.import_module(module)


def test_no_stage_imports_a_later_one():
    later = [f"{module} ({stage_of(module)}) imports {target} ({stage_of(target)})"
             for module, targets in GRAPH.items() for target in targets
             if STAGES.index(stage_of(target)) > STAGES.index(stage_of(module))]
    assert not later, "\n".join(later)


def test_there_is_no_import_circle():
    circles = [circle for circle in _strongly_connected(GRAPH) if len(circle) > 1]
    assert not circles, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in circles)


@pytest.mark.parametrize("graph,expected", [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [{"a", "b"}, {"c"}]),
                                            ({"a": {"b"}, "b": {"c"}, "c": set()}, [{"a"}, {"b"}, {"c"}])])
def test_the_circle_finder_finds_circles(graph, expected):
    assert sorted(_strongly_connected(graph), key=min) == expected


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components: each set of modules that import each other, directly or not."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components
