"""dvc.yaml: each stage depends on exactly the modules it runs, and on nothing of its own outputs."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from tests.helpers import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def imported_modules(module: str) -> set[str]:
    """`module` and every cifar3study module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar3study"):
                # `from cifar3study.data import archive` names a module; `from cifar3study.data.archive import x` a name
                submodules = [f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")]
                todo += submodules or [node.module]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("cifar3study.")]
    return {name for name in seen if is_module(name)}


def is_module(name: str) -> bool:
    """A module file, not a package (the packages' __init__.py are docstrings only)."""
    return (ROOT / (name.replace(".", "/") + ".py")).is_file()


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_code_deps_are_exactly_the_imported_modules(name: str) -> None:
    stage = DVC["stages"][name].get("do", DVC["stages"][name])
    module = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
    expected = {m.replace(".", "/") + ".py" for m in imported_modules(module)}
    listed = {d for d in stage["deps"] if d.endswith(".py")}
    assert listed == expected, f"{name}: missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"


def test_no_stage_imports_another() -> None:
    for path in (ROOT / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("stages"), f"{path.name} imports {node.module}"


def test_training_does_not_depend_on_figure_code() -> None:
    deps = set(DVC["stages"]["train"]["do"]["deps"])
    assert not {"cifar3study/reporting/figures.py", "cifar3study/reporting/conv_views.py", "cifar3study/reporting/report.py",
                "cifar3study/reporting/evaluation.py"} & deps


def test_every_stage_built_from_params_runs_after_check_params() -> None:
    """DVC pastes params into these stages' commands and outputs: check_params must stop a bad file first."""
    checked = DVC["stages"]["check_params"]["outs"][0]
    checked = next(iter(checked)) if isinstance(checked, dict) else checked
    assert "${" not in yaml.safe_dump(DVC["stages"]["check_params"])
    interpolated = {name for name, stage in DVC["stages"].items() if "${" in yaml.safe_dump(stage.get("do", stage))}
    assert interpolated >= {"train", "evaluate", "visualize"}
    for name in interpolated:
        stage = DVC["stages"][name].get("do", DVC["stages"][name])
        assert checked in stage["deps"], f"{name} does not depend on {checked}"


def test_check_params_lists_every_params_section() -> None:
    """It validates the whole file, so any params edit must rerun it."""
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert set(DVC["stages"]["check_params"]["params"]) == sections
