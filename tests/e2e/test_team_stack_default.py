"""`make team-up` and `make team-down` with their default folder, from a repository under a 0700 parent.

As root PostgreSQL runs as `nobody`, who cannot enter such a parent (root's home,
any `mktemp -d`, pytest's own tmp root): its cluster must live where it can.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cifar3study.team import postgres as team_postgres
from cifar3study.tracking.store import health_error
from tests.e2e.conftest import ENV, copy_project

pytestmark = pytest.mark.skipif(not (team_postgres.POSTGRES_BIN / "pg_ctl").is_file(), reason="needs PostgreSQL 15")
STAMP = ".venv/.installed-requirements"  # `-o`: this venv is ready, make must not rebuild it


def make(repo: Path, target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-o", STAMP, target], cwd=repo, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_make_team_up_and_down_with_the_default_folder_under_a_private_parent(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    (repo / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the running venv, used as is
    assert any(p.stat().st_mode & 0o777 == 0o700 for p in repo.parents)  # others cannot enter: nobody included
    try:
        up = make(repo, "team-up")
        assert up.returncode == 0, up.stderr[-3000:]
        tracking = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())["MLFLOW_TRACKING_URI"]
        assert health_error(tracking, timeout=5) is None
        state = json.loads((repo / ".team" / "state.json").read_text())
        postgres = Path(state["postgres_dir"])
        assert postgres.is_dir() and not postgres.is_relative_to(repo)
        down = make(repo, "team-down")
        assert down.returncode == 0, down.stderr[-3000:]
        assert not (repo / ".team").exists() and not postgres.exists()
        assert not (repo / ".dvc" / "config.local").exists()
    finally:
        if (repo / ".team").exists():
            subprocess.run([sys.executable, "-m", "cifar3study.team.stack", "down"], cwd=repo, env=ENV,
                           capture_output=True, timeout=300)
