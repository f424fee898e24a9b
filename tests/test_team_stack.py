"""The team stack's files, without its servers: secrets readable by their owner only, `down` undoing `up`.

The servers themselves run in tests/e2e/test_team_stack.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cifar3study.errors import StageError
from cifar3study.team import postgres as team_postgres
from cifar3study.team import stack as team_stack
from cifar3study.team import state as team_state

DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that hides nothing: what is private must be made so on purpose."""
    old = os.umask(0)
    yield
    os.umask(old)


def stack_with_secret(folder: Path) -> team_state.Stack:
    stack = team_state.open_stack(folder)
    stack.s3_key, stack.s3_secret = "AKIATEAM", "the-s3-secret"
    return stack


def dvc_repo(folder: Path) -> Path:
    folder.mkdir()
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=folder, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return folder


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_state_is_private(tmp_path: Path, open_umask: None) -> None:
    stack = stack_with_secret(tmp_path / "stack")
    stack.save()
    assert mode(tmp_path / "stack" / "state.json") == 0o600
    assert mode(tmp_path / "stack") == 0o700
    assert team_state.open_stack(tmp_path / "stack").s3_secret == "the-s3-secret"


def test_remote_config_is_private_and_down_removes_it(tmp_path: Path, open_umask: None) -> None:
    repo = dvc_repo(tmp_path / "repo")
    stack = stack_with_secret(tmp_path / "stack")
    team_stack.configure_dvc_remote(stack, repo)
    local = repo / ".dvc" / "config.local"
    assert mode(local) == 0o600 and "the-s3-secret" in local.read_text()
    team_stack.down(stack)
    assert not local.exists() and not (tmp_path / "stack").exists()


def test_down_keeps_the_users_own_local_settings(tmp_path: Path) -> None:
    repo = dvc_repo(tmp_path / "repo")
    local = repo / ".dvc" / "config.local"
    local.write_text("['remote \"mine\"']\n    url = /somewhere\n")
    stack = stack_with_secret(tmp_path / "stack")
    team_stack.configure_dvc_remote(stack, repo)
    assert mode(local) == 0o600
    team_stack.down(stack)
    text = local.read_text()
    assert "mine" in text and "team" not in text and "the-s3-secret" not in text


@pytest.mark.skipif(os.geteuid() != 0 or not (team_postgres.POSTGRES_BIN / "pg_ctl").is_file(),
                    reason="PostgreSQL runs as nobody only when started as root")
def test_a_temporary_folder_nobody_can_enter_is_refused_in_one_line(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with pytest.raises(StageError, match="set TMPDIR") as refused:
        team_stack.start_postgres(team_state.open_stack(tmp_path / "stack"))
    assert "\n" not in str(refused.value) and not list(private.iterdir())
