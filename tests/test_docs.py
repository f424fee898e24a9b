"""The README and docs/ stay true to the repository: commands name real modules, links resolve, every page is reachable.

Modules move (operations/ became studies/, reproduction/, team/ and bench/); a page
that still names the old path would send a reader to `No module named ...`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 220  # a front page, not a manual: the long sections live under docs/
COMMAND = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # links inside code are text, not links


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def modules_named(text: str) -> set[str]:
    """Every module a `python -m` command in `text` runs (a sentence's full stop is not part of it)."""
    return {name.rstrip(".") for name in COMMAND.findall(text)}


def module_exists(name: str) -> bool:
    """A module of this repository (a .py file, or a package with __main__.py), else an installed one."""
    path = ROOT.joinpath(*name.split("."))
    if (ROOT / name.split(".")[0]).is_dir() or path.with_suffix(".py").is_file():
        return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is not installed
        return False


def missing_modules(text: str) -> set[str]:
    return {name for name in modules_named(text) if not module_exists(name)}


def relative_links(page: Path) -> list[str]:
    """The targets of `page`'s markdown links that point into the repository, without their #fragment."""
    targets = LINK.findall(CODE.sub("", page.read_text()))
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def broken_links(page: Path) -> list[str]:
    return [t for t in relative_links(page) if not (page.parent / t).exists()]


def test_there_are_pages_and_commands_to_check() -> None:
    assert DOCS.is_dir() and list(DOCS.glob("*.md")), "docs/ holds no pages"
    assert modules_named("".join(p.read_text() for p in pages())), "no `python -m` command found: the pattern broke"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_m_command_names_a_module_that_exists(page: Path) -> None:
    missing = missing_modules(page.read_text())
    assert not missing, f"{page.relative_to(ROOT)}: `python -m` names no module: {sorted(missing)}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t).resolve() for t in relative_links(README) if t}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link these docs pages: {unlinked}"


def test_the_readme_stays_a_front_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move a section to docs/ (limit {MAX_README_LINES})"


def test_the_checks_themselves_catch_a_moved_module_and_a_dead_link(tmp_path: Path) -> None:
    assert missing_modules("run `python -m cifar3study.operations.study x.yaml`.") == {"cifar3study.operations.study"}
    assert missing_modules("python -m cifar3study.studies python -m no_such_pkg.tool") == {
        "cifar3study.studies", "no_such_pkg.tool"}  # a package without __main__.py does not run
    assert not missing_modules("`python -m cifar3study.studies.run`. python3 -m http.server; python -m pytest")
    page = tmp_path / "page.md"
    page.write_text("[a](gone.md) [b](page.md#top) [c](https://x.org) [d](#here) `[e](code.md)`\n")
    assert broken_links(page) == ["gone.md"]
