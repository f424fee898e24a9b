"""The library's import graph: one folder per concern, imports only run down the layers, no circle.

Imports inside functions count too (they are how heavy modules load late), so
a lazy import cannot hide a layer violation or a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "cifar3study"
# Lower layers never import higher ones; folders on one layer never import each other; bench measures them all.
LAYERS = {"base": 0, "data": 1, "training": 2, "tracking": 3, "reporting": 3,
          "studies": 4, "reproduction": 4, "team": 4, "bench": 5}
MAX_MODULES = 8  # a folder that holds more wants splitting by concern


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py" and ".venv" not in path.parts:
            found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return found


def concern(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "base"


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules `path` imports, wherever in the file the import stands."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar3study"):
            named = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            out |= named or ({node.module} & set(known))
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & set(known)
    return out


GRAPH = {name: imports(path, modules()) for name, path in modules().items()}


def test_every_module_belongs_to_one_known_concern_or_the_base() -> None:
    for name, path in modules().items():
        assert concern(name) in LAYERS, f"{name}: folder {concern(name)!r} is not a known concern"
        assert len(path.relative_to(PACKAGE).parts) <= 2, f"{name}: concern folders do not nest"


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_folder_holds_more_than_a_handful_of_modules(folder: str) -> None:
    count = sum(concern(name) == folder for name in modules())
    assert count <= MAX_MODULES, f"{folder} holds {count} modules; split it by concern"


def test_imports_run_down_the_layers_only() -> None:
    wrong = [f"{src} imports {dst}" for src, targets in GRAPH.items() for dst in targets
             if concern(src) != concern(dst) and LAYERS[concern(dst)] >= LAYERS[concern(src)]]
    assert not wrong, "imports up a layer or across sibling concerns:\n" + "\n".join(sorted(wrong))


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_two_modules_import_each_other_even_through_others() -> None:
    found = cycle(GRAPH)
    assert found is None, "import circle: " + " -> ".join(found)


def test_the_check_itself_finds_a_circle_and_an_upward_import() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert LAYERS[concern("cifar3study.studies.run")] > LAYERS[concern("cifar3study.tracking.store")]
    assert concern("cifar3study.params") == "base"
