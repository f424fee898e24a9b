"""An adaptive study on a 2-node Ray cluster on loopback against the team stack, a node and the driver killed.

Two `ray start` nodes (1 CPU each, own temp folders, own sessions) form the cluster; trials clone a bare Git
remote, pull from the stack's S3 DVC remote, log to its MLflow server, keep the ledger in its PostgreSQL and
push their experiments back. TPE draws each model's learning rates and ASHA stops the trials that trail
after their first epoch. While node 2 trains a trial, every process of node 2 is SIGKILLed (a box going
down); Ray reruns that trial and node 2 is started again. Later, with some trials ended and another
training, the driver is SIGKILLed and started again: it takes over what the dead driver held. Afterwards
the ledger, the Git remote's experiments and MLflow must tell the same story, trial by trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow import MlflowClient

from cifar3study.team import postgres as team_postgres
from cifar3study.team.processes import HOST, free_port
from tests.e2e.conftest import ENV, sh

pytestmark = pytest.mark.skipif(not (team_postgres.POSTGRES_BIN / "pg_ctl").is_file(), reason="needs PostgreSQL 15")

STUDY = {"name": "c3", "space": {"train.lr": {"float": [1e-6, 0.5], "log": True}},
         "search": {"sampler": "tpe", "trials": 4, "seed": 0}, "prune": {"pruner": "asha", "min_epochs": 1, "reduction": 2},
         "set": {"data.holdout": 0.25, "train.epochs": 2, "train.seeds": [0], "train.batch_size": 8},
         "final": {"seeds": [10, 11]}, "resources": {"cpus": 1}}
MODELS = ("fc", "cnn")
RAY = str(Path(sys.executable).parent / "ray")


@dataclasses.dataclass
class Node:
    """One `ray start` in a session of its own: its process group holds every process of the node."""

    temp_dir: Path
    pgid: int
    killed: bool = False  # once dead, its group id may be reused by a stranger: never kill it again

    def processes(self) -> list[psutil.Process]:
        """The node's processes and all they started (a trial's `dvc` runs in a session of its own)."""
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == self.pgid or str(self.temp_dir) in " ".join(process.cmdline()):
                    found[process.pid] = process
                    found.update((child.pid, child) for child in process.children(recursive=True))
            except (psutil.Error, ProcessLookupError):
                continue
        return list(found.values())

    def kill(self) -> None:
        if self.killed:
            return
        self.killed = True
        for _ in range(3):  # a process may start another while we kill
            for process in self.processes():
                with contextlib.suppress(psutil.Error):
                    process.kill()
            time.sleep(0.5)


@dataclasses.dataclass
class Cluster:
    repo: Path
    remote: Path  # the bare Git remote, origin of the repo
    env: dict[str, str]  # the driver's: the stack's exports, Ray's token
    address: str
    nodes: list[Node]

    def start_node(self, head: bool) -> Node:
        temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
        ports = ["--dashboard-agent-listen-port", str(free_port())]
        role = (["--head", "--port", self.address.rsplit(":", 1)[1], "--include-dashboard=false"] if head
                else ["--address", self.address])
        cmd = [RAY, "start", *role, "--node-ip-address", HOST, "--num-cpus", "1", "--object-store-memory",
               str(100 * 1024**2), "--temp-dir", str(temp_dir), "--disable-usage-stats", *ports]
        process = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        node = Node(temp_dir, process.pid)
        self.nodes.append(node)
        output = process.communicate(timeout=180)[0]
        assert process.returncode == 0, output[-3000:]
        return node

    def client(self) -> MlflowClient:
        return MlflowClient(self.env["MLFLOW_TRACKING_URI"])

    def runs(self, filter_string: str = "") -> list:
        experiment = self.client().get_experiment_by_name("cifar3")
        return self.client().search_runs([experiment.experiment_id], filter_string, max_results=1000)

    def study(self) -> subprocess.Popen:
        path = self.repo.parent / "c3.yaml"
        path.write_text(yaml.safe_dump(STUDY), encoding="utf-8")
        cmd = [sys.executable, "-m", "cifar3study.studies.run", str(path), "--address", self.address]
        return subprocess.Popen(cmd, cwd=self.repo, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def trials(self) -> list:
        """Every search and final trial of the study in the ledger (the stack's PostgreSQL)."""
        passfile = {"connect_args": {"passfile": self.env["PGPASSFILE"]}}  # the driver's, not this process's env
        storage = optuna.storages.RDBStorage(self.env["CIFAR3_LEDGER"], engine_kwargs=passfile)
        return [t for s in storage.get_all_studies() if s.study_name.startswith("c3/")
                for t in storage.get_all_trials(s._study_id)]

    def exps(self) -> dict[str, str]:
        """{experiment name: commit} in the Git remote."""
        listed = sh(self.repo, "git", "ls-remote", str(self.remote), "refs/exps/*")
        return {ref.rsplit("/", 1)[1]: sha for sha, ref in (line.split("\t") for line in listed.splitlines())}


def stack(repo: Path, *args: str) -> str:
    return sh(repo, sys.executable, "-m", "cifar3study.team.stack", *args)


@pytest.fixture(scope="module")
def cluster(make_repo: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    repo = make_repo(epochs=1, seeds=[0])
    remote = tmp_path_factory.mktemp("git") / "remote.git"
    sh(repo, "git", "init", "-q", "--bare", str(remote))
    sh(repo, "git", "remote", "add", "origin", str(remote))
    sh(repo, "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    folder = tmp_path_factory.mktemp("team") / "stack"
    exports = stack(repo, "up", "--dir", str(folder))
    env = {**ENV, **dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines()),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster(repo, remote, env, f"{HOST}:{free_port()}", [])
    try:
        cluster.start_node(head=True)
        cluster.start_node(head=False)
        yield cluster
    finally:
        for node in cluster.nodes:
            node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        stack(repo, "down", "--dir", str(folder))


def running_trial(node: Node) -> str | None:
    """The trial name of the `dvc exp run -n NAME` going on in `node`, if any."""
    for process in node.processes():
        try:
            line = process.cmdline()
        except psutil.Error:
            continue
        found = [i for i in range(2, len(line) - 1) if line[i - 2:i + 1] == ["exp", "run", "-n"]]
        if found:
            return line[found[0] + 1]
    return None


def kill_mid_trial(cluster: Cluster, study: subprocess.Popen) -> str:
    """Kill node 2 while it trains a trial (its runs RUNNING); that trial's experiment name."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and study.poll() is None:
        name = running_trial(cluster.nodes[1])
        if name and cluster.runs(f"tags.`dvc.exp_name` = '{name}' and attributes.status = 'RUNNING'"):
            cluster.nodes[1].kill()
            return name
        time.sleep(0.5)
    raise AssertionError(f"node 2 never trained a trial; study: {study.communicate()[1][-3000:]}")


def kill_driver_mid_study(cluster: Cluster, study: subprocess.Popen) -> None:
    """SIGKILL the driver once some trial has ended and another one's runs are RUNNING."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and study.poll() is None:
        states = [t.state.name for t in cluster.trials()]
        if {"COMPLETE", "PRUNED"} & set(states) and cluster.runs("attributes.status = 'RUNNING'"):
            os.killpg(study.pid, signal.SIGKILL)
            study.wait()
            return
        time.sleep(0.5)
    raise AssertionError(f"the study ended before its driver could be killed: {study.communicate()[1][-3000:]}")


@dataclasses.dataclass
class StudyRun:
    killed_trial: str  # the experiment name of the trial node 2 was training when it died
    restarted: subprocess.CompletedProcess  # the driver started again after its SIGKILL
    seconds: float  # from the first start to the restarted driver's end


@pytest.fixture(scope="module")
def finished_study(cluster: Cluster) -> StudyRun:
    """The study with node 2 killed mid-trial (then started again), its driver killed later and started again."""
    started = time.monotonic()
    study = cluster.study()
    try:
        killed = kill_mid_trial(cluster, study)
        cluster.start_node(head=False)  # room for the retry beside the head's trial
        kill_driver_mid_study(cluster, study)
        study = cluster.study()
        out, err = study.communicate(timeout=1500)
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
    return StudyRun(killed, subprocess.CompletedProcess(study.args, study.returncode, out, err),
                    time.monotonic() - started)


def test_ledger_experiments_and_mlflow_agree_trial_by_trial(cluster: Cluster, finished_study: StudyRun) -> None:
    done = finished_study.restarted
    assert done.returncode == 0, done.stderr[-3000:]
    trials = cluster.trials()
    assert sorted(t.state.name for t in trials if t.state.name != "COMPLETE") == ["PRUNED"] * len(
        [t for t in trials if t.state.name == "PRUNED"])  # every trial ended: complete or pruned
    assert [t for t in trials if t.state.name == "PRUNED"], "ASHA stopped no trial"
    complete = {t.user_attrs["name"] for t in trials if t.state.name == "COMPLETE"}
    assert set(cluster.exps()) == complete  # an experiment for each complete trial, none for a pruned one
    for trial in trials:
        parents = cluster.runs(f"tags.trial = '{trial.user_attrs['key']}' and tags.kind = 'model'")
        ended = [r for r in parents if r.info.status == "FINISHED"]
        if trial.state.name == "COMPLETE":
            assert len(ended) == 1 and ended[0].data.metrics[trial.user_attrs["metric"]] == trial.value
        else:
            assert not ended and parents and all(r.data.tags.get("pruned_at_epoch") == "1" for r in parents
                                                 if r.info.status == "KILLED" and "ended_by" not in r.data.tags)
    assert not cluster.runs("attributes.status = 'RUNNING'")
    assert finished_study.killed_trial in complete | {t.user_attrs["name"] for t in trials}
    print(f"adaptive study on 2 nodes, a node and the driver killed: {finished_study.seconds:.0f} s")


def test_a_rerun_of_the_finished_study_runs_nothing(cluster: Cluster, finished_study: StudyRun) -> None:
    before = len(cluster.runs())
    started = time.monotonic()
    again = cluster.study()
    err = again.communicate(timeout=300)[1]
    assert again.returncode == 0, err[-3000:]
    assert "nothing to run" in err and "Ray" not in err
    assert len(cluster.runs()) == before
    print(f"rerun of the finished study on the cluster: {time.monotonic() - started:.1f} s")


def test_a_fresh_clone_pulls_every_experiment_and_restores_a_tuned_model(
        cluster: Cluster, finished_study: StudyRun,
        tmp_path: Path) -> None:
    exps = cluster.exps()
    fresh = tmp_path / "fresh"
    sh(tmp_path, "git", "clone", "-q", "-b", "main", str(cluster.remote), str(fresh))
    config = (cluster.repo / ".dvc" / "config.local").read_text()  # the team's DVC remote, as a newcomer sets it
    (fresh / ".dvc" / "config.local").write_text(config)
    sh(fresh, "dvc", "exp", "pull", "-q", "origin", *exps)
    listed = sh(fresh, "dvc", "exp", "list", "--name-only")
    assert set(listed.split()) == set(exps)
    name, commit = sorted(exps.items())[0]
    model = name.split("-")[1]  # a trial's experiment holds the one model it tuned
    sh(fresh, "dvc", "exp", "branch", name, "tuned")
    sh(fresh, "git", "checkout", "-q", "tuned")
    sh(fresh, "dvc", "pull", "-q", "--with-deps", f"evaluate@{model}")
    assert "up to date" in sh(fresh, "dvc", "status", f"evaluate@{model}")  # its outputs are the trial's own
    metrics = f"data/metrics/{model}.json"
    assert (fresh / metrics).read_text() == sh(fresh, "git", "show", f"{commit}:{metrics}")
