"""A fresh git + DVC copy of the project, pointed at a synthetic archive on a loopback server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, FileServer, archive_files, serving, write_archive

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
for name in ("MLFLOW_TRACKING_URI", "CIFAR10_URL", "CIFAR10_MD5"):
    ENV.pop(name, None)


def sh(repo: Path, *cmd: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=repo, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def copy_project(repo: Path) -> None:
    """What a commit of the working tree holds: tracked files and untracked ones git does not ignore."""
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    for name in subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)


@pytest.fixture(scope="module")
def archive_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileServer, str]]:
    """(server, md5) of a tiny synthetic archive served on 127.0.0.1 for the module's tests."""
    archive = tmp_path_factory.mktemp("mirror") / "cifar-10-python.tar.gz"
    md5 = write_archive(archive, archive_files(n_per_class=8))
    with serving(FileServer()) as server:
        server.files["/cifar-10-python.tar.gz"] = archive.read_bytes()
        yield server, md5


@pytest.fixture(scope="module")
def archive_server(archive_mirror: tuple[FileServer, str]) -> tuple[str, str]:
    """(url, md5) of the module's archive."""
    server, md5 = archive_mirror
    return server.url("cifar-10-python.tar.gz"), md5


@pytest.fixture(scope="module")
def make_repo(tmp_path_factory: pytest.TempPathFactory, archive_server: tuple[str, str]) -> Callable[..., Path]:
    """Build a committed project copy with short training; `train` overrides train.* params, `data` data.* ones."""
    def build(data: dict | None = None, **train: object) -> Path:
        repo = tmp_path_factory.mktemp("repo")
        copy_project(repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["data"].update({"url": archive_server[0], "md5": archive_server[1], **(data or {})})
        params["train"].update({"epochs": 2, "batch_size": 32, "seeds": [0, 1], **train})
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        sh(repo, "git", "init", "-q")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "test copy")
        return repo
    return build
