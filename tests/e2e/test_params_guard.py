"""The real `dvc` CLI on a params.yaml whose models key DVC would paste into a shell command or an output path.

DVC builds train@<key> (its cmd and outs) from the key before any code of ours runs, and removes a stage's
outs before running it; the check_params stage, which every such stage depends on, must stop the pipeline first.
Tests run in file order on one repo, whose parent folder is this module's own (the `../` key reaches it).
`dvc repro -s <stage>` skips upstream stages, and so this guard; the stage's own name check still refuses later.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import ENV, copy_project, ran, sh

SHELL_KEY = "a;touch pwned;b"
PATH_KEY = "../../../victim"  # data/models/../../../victim.pt is the repository's parent folder
VICTIMS = ("victim.pt", "victim.json", "victim.csv", "victim/per_class.json")  # where train@/evaluate@ would write


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, archive_server: tuple[str, str]) -> Path:
    repo = tmp_path_factory.mktemp("guard") / "repo"
    repo.mkdir()
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update({"url": archive_server[0], "md5": archive_server[1]})
    params["train"].update({"epochs": 1, "batch_size": 32, "seeds": [0]})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "test copy")
    sh(repo, "dvc", "repro", "stats")  # the data stages read the whole params.yaml: done before the key appears
    return repo


def with_model_key(repo: Path, key: str) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    # First, so that its train@ stage comes first among the per-model stages (the others would fail on the key too)
    params["models"] = {key: {"arch": "fc", "hidden": [8], "activation": "tanh"}, **params["models"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True, timeout=900)


def refusal_lines(done: subprocess.CompletedProcess, key: str) -> list[str]:
    assert done.returncode != 0, done.stdout[-3000:]
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    return [line for line in output.splitlines() if f"models key {key!r} must match [a-z][a-z0-9_]*" in line]


def test_repro_refuses_a_key_that_runs_a_shell_command(repo: Path) -> None:
    with_model_key(repo, SHELL_KEY)
    done = dvc(repo, "repro")
    assert not (repo / "pwned").exists()
    assert len(refusal_lines(done, SHELL_KEY)) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert not any(name.startswith("train@") for name in ran(done.stdout))


def test_exp_run_refuses_it_too(repo: Path) -> None:
    done = dvc(repo, "exp", "run")
    assert not (repo / "pwned").exists()
    assert len(refusal_lines(done, SHELL_KEY)) == 1, done.stdout[-3000:] + done.stderr[-3000:]


def test_repro_refuses_a_key_that_points_outside_the_repository(repo: Path) -> None:
    """Today DVC itself refuses any `..` key first (runs/<key>.json and metrics/<key>.json become one path);
    either way nothing outside the repository may be touched."""
    sh(repo, "git", "checkout", "-q", "params.yaml")
    with_model_key(repo, PATH_KEY)
    for name in VICTIMS:
        (repo.parent / name).parent.mkdir(parents=True, exist_ok=True)
        (repo.parent / name).write_text("precious")
    done = dvc(repo, "repro")
    overlap = "is specified in:" in done.stderr and "train@../../../victim" in done.stderr
    assert len(refusal_lines(done, PATH_KEY)) == 1 or overlap, done.stdout[-3000:] + done.stderr[-3000:]
    assert [(repo.parent / name).read_text() for name in VICTIMS] == ["precious"] * len(VICTIMS)
