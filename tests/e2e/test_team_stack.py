"""The team stack (PostgreSQL, S3, MLflow server, DVC remote) end to end, and its faults.

Runs in file order on one stack and one repo: later tests change them. Each
fault ends in a one-line error and a non-zero exit, and the rerun after the
fault clears succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import mlflow
import psutil
import psycopg2
import pytest
from mlflow import MlflowClient

from cifar3study.team import postgres as team_postgres
from cifar3study.team import stack as team_stack
from cifar3study.team import state as team_state
from tests.e2e.conftest import ENV, ran, sh
from tests.e2e.test_queue import LRS, run_queue

pytestmark = pytest.mark.skipif(not (team_postgres.POSTGRES_BIN / "pg_ctl").is_file(), reason="needs PostgreSQL 15")


@dataclasses.dataclass
class Team:
    repo: Path
    folder: Path
    env: dict[str, str]  # what `eval "$(make -s team-up)"` exports

    @property
    def stack(self) -> team_state.Stack:
        return team_state.open_stack(self.folder)

    def client(self) -> MlflowClient:
        return MlflowClient(self.env["MLFLOW_TRACKING_URI"])

    def s3(self) -> object:
        stack = self.stack
        return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=stack.s3_key, aws_secret_access_key=stack.s3_secret)

    def stack_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cifar3study.team.stack", *args, "--dir", str(self.folder)],
                              cwd=self.repo, env=ENV, capture_output=True, text=True, timeout=300)

    def train(self, out: Path, epochs: int) -> subprocess.Popen:
        params = out / "params.yaml"
        out.mkdir(parents=True, exist_ok=True)
        params.write_text((self.repo / "params.yaml").read_text().replace("epochs: 1", f"epochs: {epochs}"))
        data = self.repo / "data" / "cifar3"
        cmd = [sys.executable, "-m", "stages.train", "--params", str(params), "--model", "cnn", "--train",
               str(data / "train.npz"), "--val", str(data / "val.npz"), "--stats", str(data / "stats.json"),
               "--checkpoint", str(out / "cnn.pt"), "--history", str(out / "h.csv"), "--run-info", str(out / "r.json")]
        return subprocess.Popen(cmd, cwd=self.repo, env={**ENV, **self.env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)


def exports(output: str) -> dict[str, str]:
    pairs = [line.removeprefix("export ").split("=", 1) for line in output.splitlines()]
    return dict(pairs)


def one_line_failure(process: subprocess.Popen | subprocess.CompletedProcess, timeout: float = 180) -> str:
    stderr = process.communicate(timeout=timeout)[1] if isinstance(process, subprocess.Popen) else process.stderr
    assert process.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def team(make_repo: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    repo = make_repo(epochs=1, seeds=[0])
    folder = tmp_path_factory.mktemp("team") / "stack"  # under pytest's 0700 root: PostgreSQL's cluster lives elsewhere
    output = sh(repo, sys.executable, "-m", "cifar3study.team.stack", "up", "--dir", str(folder))
    team = Team(repo, folder, exports(output))
    yield team
    if folder.exists():  # the last test takes it down; this is for a run that stopped early
        sh(repo, sys.executable, "-m", "cifar3study.team.stack", "down", "--dir", str(folder))


def test_up_prints_the_variables_and_a_second_up_changes_nothing(team: Team) -> None:
    assert team.env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    again = exports(sh(team.repo, sys.executable, "-m", "cifar3study.team.stack", "up", "--dir", str(team.folder)))
    assert again["MLFLOW_TRACKING_URI"] == team.env["MLFLOW_TRACKING_URI"]
    config = (team.repo / ".dvc" / "config.local").read_text()
    assert "url = s3://cifar3/dvc" in config and team.stack.s3_endpoint in config
    assert "config.local" in (team.repo / ".dvc" / ".gitignore").read_text()  # nothing machine-specific is committed


def psql_select_one(team: Team, password: str | None) -> subprocess.CompletedProcess:
    """`select 1` as role mlflow over TCP; without a password, as another local user where the test runs as root."""
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", **({"PGPASSWORD": password} if password else {})}
    other = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] if os.geteuid() == 0 else []
    cmd = [*other, str(team_postgres.POSTGRES_BIN / "psql"), "-w", "-h", "127.0.0.1", "-p", str(team.stack.ports["postgres"]),
           "-U", "mlflow", "-d", "mlflow", "-Atc", "select 1"]
    return subprocess.run(cmd, cwd="/", env=env, capture_output=True, text=True, timeout=60)


def test_secrets_are_private_and_postgres_wants_the_password(team: Team) -> None:
    for secret_file in (team.folder / "state.json", team.repo / ".dvc" / "config.local"):
        assert secret_file.stat().st_mode & 0o777 == 0o600, secret_file
    stack = team.stack
    assert stack.s3_secret in (team.repo / ".dvc" / "config.local").read_text()
    assert not Path(stack.postgres_dir).is_relative_to(team.repo)
    refused = psql_select_one(team, password=None)
    assert refused.returncode != 0 and "password" in refused.stderr, refused.stdout + refused.stderr
    assert psql_select_one(team, stack.postgres_password).stdout.strip() == "1"
    for process in psutil.process_iter(["cmdline"]):  # the servers got the secrets some other way
        line = " ".join(process.info["cmdline"] or [])
        assert stack.postgres_password not in line and stack.s3_secret not in line, line


def test_repro_logs_runs_to_postgres_and_artifacts_to_the_bucket(team: Team) -> None:
    output = sh(team.repo, "dvc", "repro", env=team.env)
    assert {"train@cnn", "evaluate@cnn", "compare"} <= ran(output)
    stack = team.stack
    with psycopg2.connect(host="127.0.0.1", port=stack.ports["postgres"], user="mlflow", dbname="mlflow",
                          password=stack.postgres_password) as db, db.cursor() as cursor:
        cursor.execute("select t.value, r.status from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'kind'")
        rows = cursor.fetchall()
    assert sorted(rows) == [("comparison", "FINISHED")] + [("model", "FINISHED")] * 2 + [("seed", "FINISHED")] * 2
    keys = [o["Key"] for o in team.s3().list_objects_v2(Bucket="cifar3", Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("/learning_curves.png") for k in keys) and any("/model" in k for k in keys)
    run_id = json.loads((team.repo / "data" / "runs" / "cnn.json").read_text())["seed_runs"]["0"]
    os.environ.update(team.env)
    try:  # the logged model loads back through the server
        model = mlflow.pytorch.load_model(team.client().get_run(run_id).data.tags["model_uri"])
    finally:
        for name in team.env:
            os.environ.pop(name, None)
        mlflow.set_tracking_uri(None)
    assert model(__import__("torch").zeros(2, 3, 32, 32)).shape == (2, 3)


def test_push_then_a_fresh_clone_pulls_and_has_nothing_to_run(team: Team, tmp_path: Path) -> None:
    sh(team.repo, "git", "add", "-A")
    sh(team.repo, "git", "commit", "-qm", "results")
    sh(team.repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(team.repo), str(clone))
    shutil.copy(team.repo / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    sh(clone, "dvc", "pull")
    assert (clone / "data" / "models" / "cnn.pt").read_bytes() == (team.repo / "data" / "models" / "cnn.pt").read_bytes()
    assert json.loads(sh(clone, "dvc", "status", "--json")) == {}
    assert ran(sh(clone, "dvc", "repro")) == set()


def test_two_queued_experiments_against_the_server(team: Team) -> None:
    """One per queue worker (`-j 2`); test_queue.py runs four on SQLite, where the store's first use races."""
    lrs = LRS[:2]
    statuses = run_queue(team.repo, lrs, env=team.env)
    assert statuses == {f"lr-{lr}": "Success" for lr in lrs}
    client = team.client()
    experiment = client.get_experiment_by_name("cifar3").experiment_id
    queued = [r for r in client.search_runs([experiment], "tags.kind = 'model'") if "dvc.exp_name" in r.data.tags]
    assert sorted(r.data.tags["dvc.exp_name"] for r in queued) == sorted(f"lr-{lr}" for lr in lrs)
    assert {r.info.status for r in queued} == {"FINISHED"}


def wait_for_running_run(team: Team, process: subprocess.Popen) -> str:
    client, deadline = team.client(), time.monotonic() + 120
    experiment = client.get_experiment_by_name("cifar3").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    while True:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        new = [r for r in client.search_runs([experiment], "attributes.status = 'RUNNING'") if r.info.run_id not in before]
        if any(client.get_metric_history(r.info.run_id, "val_acc") for r in new):  # an epoch has been logged
            return next(r.info.run_id for r in new if r.data.tags.get("kind") == "model")
        time.sleep(0.5)


def test_fault_server_stops_in_the_middle_of_training(team: Team, tmp_path: Path) -> None:
    training = team.train(tmp_path / "killed", epochs=500)
    run_id = wait_for_running_run(team, training)
    team.stack_cli("stop", "mlflow")
    started = time.monotonic()
    assert "MLflow request failed" in one_line_failure(training)
    assert time.monotonic() - started < 120
    assert team.stack_cli("start", "mlflow").returncode == 0
    rerun = team.train(tmp_path / "rerun", epochs=1)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-2000:]
    assert team.client().get_run(run_id).info.status == "KILLED"  # closed by the rerun: its process had died


def test_fault_postgres_is_down_when_the_server_starts(team: Team) -> None:
    team.stack_cli("stop", "mlflow")
    team.stack_cli("stop", "postgres")
    line = one_line_failure(team.stack_cli("start", "mlflow"))
    assert "PostgreSQL at 127.0.0.1:" in line and "is down" in line
    assert team.stack_cli("start", "postgres").returncode == 0
    assert team.stack_cli("start", "mlflow").returncode == 0
    assert team.client().get_experiment_by_name("cifar3") is not None


def test_fault_the_bucket_is_missing(team: Team, tmp_path: Path) -> None:
    s3 = team.s3()
    for found in s3.list_objects_v2(Bucket="cifar3").get("Contents", []):
        s3.delete_object(Bucket="cifar3", Key=found["Key"])
    s3.delete_bucket(Bucket="cifar3")
    assert "MLflow request failed" in one_line_failure(team.train(tmp_path / "no-bucket", epochs=1), timeout=300)
    assert team.stack_cli("up").returncode == 0  # makes the bucket again
    rerun = team.train(tmp_path / "rerun", epochs=1)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-2000:]


def test_fault_wrong_s3_credentials(team: Team, tmp_path: Path) -> None:
    (team.repo / "notes.bin").write_bytes(os.urandom(4096))  # something new, so the push must upload
    sh(team.repo, "dvc", "add", "notes.bin")
    sh(team.repo, "dvc", "remote", "modify", "--local", "team", "secret_access_key", "wrong")
    pushed = subprocess.run(["dvc", "push", "notes.bin"], cwd=team.repo, env=ENV, capture_output=True, text=True)
    assert pushed.returncode != 0 and "Forbidden" in pushed.stderr
    assert team.stack_cli("up").returncode == 0  # writes the right key again
    assert "1 file pushed" in sh(team.repo, "dvc", "push", "notes.bin")
    stack = team.stack
    team.stack_cli("stop", "mlflow")
    team_stack.start_mlflow(stack, s3_secret="wrong")  # the server itself holds a wrong key
    try:
        assert "MLflow request failed" in one_line_failure(team.train(tmp_path / "bad-key", epochs=1), timeout=300)
    finally:
        team.stack_cli("stop", "mlflow")
    assert team.stack_cli("start", "mlflow").returncode == 0
    rerun = team.train(tmp_path / "rerun", epochs=1)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-2000:]


def test_down_removes_what_up_wrote(team: Team) -> None:
    postgres = Path(team.stack.postgres_dir)
    assert postgres.is_dir()
    sh(team.repo, sys.executable, "-m", "cifar3study.team.stack", "down", "--dir", str(team.folder))
    assert not team.folder.exists() and not postgres.exists()
    assert not (team.repo / ".dvc" / "config.local").exists()  # up made it: nothing of the user's was in it
    assert "team" not in sh(team.repo, "dvc", "remote", "list")
