"""Fixtures: a synthetic archive, a loopback HTTP server, CIFAR-3 splits made by the real code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cifar3study.data.archive import build_splits
from cifar3study.data.dataset import channel_stats, write_split, write_stats
from tests.helpers import CIFAR3_CLASSES, FileServer, archive_files, serving, write_archive


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: a run with `-p no:xdist` has no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadfile`, but tests/stages/ is one unit: its modules share the session's `outputs` (a real train
    and evaluate of every model), which each worker would otherwise build again. (`--dist loadgroup` cannot do
    it: pytest 9.2 ignores the node-id suffix pytest-xdist 3.8 gives a group.)"""
    from xdist.scheduler import LoadFileScheduling

    class FilesAndStages(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/stages" if path.startswith("tests/stages/") else path

    return FilesAndStages(config, log)


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    """(path, md5) of a small valid synthetic archive."""
    path = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    return path, write_archive(path, archive_files())


@pytest.fixture
def http_server() -> Iterator[FileServer]:
    with serving(FileServer()) as server:
        yield server


@pytest.fixture(scope="session")
def cifar3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.npz, val.npz and stats.json made by the real library from a synthetic archive."""
    out = tmp_path_factory.mktemp("cifar3")
    splits = build_splits(archive_files(n_per_class=8), CIFAR3_CLASSES, "0" * 32)
    for name, split in splits.items():
        write_split(out / f"{name}.npz", split)
    write_stats(out / "stats.json", channel_stats(splits["train"].images))
    return out
