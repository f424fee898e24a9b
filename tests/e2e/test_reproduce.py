"""`reproduce`: a recorded run rerun from its record in a scratch copy and judged (real git, DVC and MLflow).

One committed project copy and one trained cnn run (1 epoch, seeds 0 and 1,
tiny data) serve every test, because each rerun costs a `dvc repro`. A record
that lies is a copy of the store (SQLite's backup) rewritten with SQL, as
anyone with write access to it could.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from cifar3study.data.dataset import carve_holdout, read_split
from tests.e2e.conftest import ENV, sh
from tests.helpers import archive_files, last_line, write_archive


def reproduce(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar3study.reproduction.run", *args], cwd=repo,
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=900)


def client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def parent_run(repo: Path, model: str = "cnn") -> str:
    return json.loads((repo / "data" / "runs" / f"{model}.json").read_text())["run_id"]


def snapshot(repo: Path, run_id: str) -> list:
    """Everything a run and its seed runs hold: a reproduction must leave it as it was."""
    c = client(repo)
    parent = c.get_run(run_id)
    runs = [parent, *c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")]
    return [(r.info.run_id, r.info.status, r.info.end_time, r.data.tags, r.data.params, r.data.metrics,
             sorted(a.path for a in c.list_artifacts(r.info.run_id))) for r in runs]


def reproductions(repo: Path, run_id: str) -> list:
    return reproductions_in(client(repo), run_id)


def reproductions_in(c: MlflowClient, run_id: str) -> list:
    return c.search_runs([e.experiment_id for e in c.search_experiments()], f"tags.reproduces = '{run_id}'")


def store_copy(repo: Path, folder: Path, *edits: tuple[str, tuple]) -> dict[str, str]:
    """A copy of the repo's store with SQL `edits` applied; the environment that points reproduce at it."""
    db = folder / "copy.db"
    with closing(sqlite3.connect(repo / "mlflow.db")) as src, closing(sqlite3.connect(db)) as dst:
        src.backup(dst)
        with dst:
            for sql, args in edits:
                assert dst.execute(sql, args).rowcount >= 1, sql
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}


def copy_client(env: dict[str, str]) -> MlflowClient:
    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def all_runs(c: MlflowClient) -> list:
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


@pytest.fixture(scope="module")
def trained(make_repo: Callable[..., Path]) -> tuple[Path, str]:
    repo = make_repo(epochs=1, seeds=[0, 1])
    sh(repo, "dvc", "repro", "evaluate@cnn")
    return repo, parent_run(repo)


def test_record_holds_code_as_dvc_hashed_it_and_each_seeds_weights(trained: tuple[Path, str], tmp_path: Path) -> None:
    repo, run_id = trained
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train@cnn"]["deps"]
    table = json.loads(Path(client(repo).download_artifacts(run_id, "code_files.json", str(tmp_path))).read_text())
    assert table == {d["path"]: d["md5"] for d in lock if d["path"].endswith(".py")}
    seeds = client(repo).search_runs([client(repo).get_run(run_id).info.experiment_id],
                                   f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert len({r.data.tags["weights.sha256"] for r in seeds}) == 2
    tags = client(repo).get_run(run_id).data.tags
    assert {"code.digest", "torch.threads", "onednn.version", "numpy.version", "cpu.capability"} <= set(tags)


def test_same_box_is_bitwise_and_linked(trained: tuple[Path, str]) -> None:
    repo, run_id = trained
    before = snapshot(repo, run_id)
    done = reproduce(repo, run_id)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("bitwise: "), done.stdout
    [linked] = reproductions(repo, run_id)
    assert linked.data.tags["kind"] == "reproduction" and linked.data.tags["verdict"] == "bitwise"
    assert linked.data.params["original.threads"] == linked.data.params["rerun.threads"]
    report = (repo / "reports" / "reproductions" / f"{run_id}.md").read_text()
    assert "bitwise" in report and "| thread count |" in report
    assert snapshot(repo, run_id) == before


def test_other_thread_count_is_not_bitwise_names_it_and_is_judged(trained: tuple[Path, str]) -> None:
    repo, run_id = trained
    threads = client(repo).get_run(run_id).data.tags["torch.threads"]
    other = "1" if threads != "1" else "2"
    done = reproduce(repo, run_id, "--threads", other)
    line = done.stdout.strip().splitlines()[-1]
    assert line.split(":")[0] in ("equivalent", "differs"), line
    assert done.returncode == (1 if line.startswith("differs") else 0), done.stderr[-2000:]
    assert f"explained by thread count {threads} → {other}" in line
    assert "tolerance ±0.01" in line or "95% CI" in line  # judged against the record's spread, saying how
    verdicts = {r.data.tags["verdict"] for r in reproductions(repo, run_id)}
    assert line.split(":")[0] in verdicts


def test_a_dvc_experiment_on_a_holdout_is_reproduced_bitwise_from_its_record(trained: tuple[Path, str]) -> None:
    """One experiment for two claims (each rerun costs a `dvc repro`): the experiment's own params, and a holdout run
    judged on its holdout metrics."""
    repo, _ = trained
    rest, held = carve_holdout(read_split(repo / "data" / "cifar3" / "train.npz"), 0.25, 0)
    assert min(np.bincount(held.labels).min(), np.bincount(rest.labels).min()) >= 8  # a batch of each class in each
    sh(repo, "dvc", "exp", "run", "--temp", "-n", "held", "-S", "train.lr=0.05", "-S", "data.holdout=0.25",
       "-S", "train.batch_size=8", "evaluate@cnn")
    run = client(repo).search_runs([e.experiment_id for e in client(repo).search_experiments()],
                                   "tags.`dvc.exp_name` = 'held' and tags.kind = 'model'")[0]
    run_id = run.info.run_id
    assert run.data.params["train.lr"] == "0.05" and "lr: 0.01" in (repo / "params.yaml").read_text()
    assert run.data.params["data.holdout"] == "0.25" and "holdout_acc" in run.data.metrics
    assert "val_acc" not in run.data.metrics  # evaluated on the held-out part only: the record has no val_ key
    before = snapshot(repo, run_id)
    done = reproduce(repo, "held")
    # Bitwise only if the rerun trained with the experiment's lr and holdout, not the workspace's.
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("bitwise: "), done.stdout
    [linked] = reproductions(repo, run_id)
    assert linked.data.tags["verdict"] == "bitwise"
    assert {"holdout_acc_delta_seed0", "holdout_acc_delta_seed1"} <= set(linked.data.metrics)
    report = (repo / "reports" / "reproductions" / f"{run_id}.md").read_text()
    assert "| holdout_acc (record) | holdout_acc (rerun) |" in report and "val_acc" not in report
    assert snapshot(repo, run_id) == before


def test_a_recorded_metric_that_lies_differs_though_the_weights_are_equal(trained: tuple[Path, str],
                                                                          tmp_path: Path) -> None:
    repo, run_id = trained
    latest = "(SELECT step, timestamp FROM latest_metrics WHERE run_uuid = ? AND key = 'val_acc')"
    env = store_copy(repo, tmp_path,
                     ("UPDATE latest_metrics SET value = 0.99 WHERE run_uuid = ? AND key = 'val_acc'", (run_id,)),
                     (f"UPDATE metrics SET value = 0.99 WHERE run_uuid = ? AND key = 'val_acc' AND (step, timestamp) = "
                      f"{latest}", (run_id, run_id)))
    assert copy_client(env).get_run(run_id).data.metrics["val_acc"] == 0.99
    earlier = len(reproductions_in(copy_client(env), run_id))
    done = reproduce(repo, run_id, env=env)
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 1 and line.startswith("differs: "), line
    assert "weights equal bit for bit" in line and "val_acc 0.99 recorded" in line, line
    assert "seconds_per_epoch" not in line and "train_acc" not in line  # timing is not compared; the rest matched
    newest, *rest = reproductions_in(copy_client(env), run_id)  # newest first
    assert newest.data.tags["verdict"] == "differs" and len(rest) == earlier


def test_a_weights_digest_that_lies_on_an_identical_box_differs(trained: tuple[Path, str], tmp_path: Path) -> None:
    repo, run_id = trained
    assert client(repo).get_run(run_id).data.params["train.deterministic"] == "True"
    seed0 = client(repo).search_runs([client(repo).get_run(run_id).info.experiment_id],
                                     f"tags.`mlflow.parentRunId` = '{run_id}' and tags.seed = '0'")[0].info.run_id
    env = store_copy(repo, tmp_path, ("UPDATE tags SET value = ? WHERE run_uuid = ? AND key = 'weights.sha256'",
                                      ("0" * 64, seed0)))
    done = reproduce(repo, run_id, env=env)
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 1 and line.startswith("differs: "), line
    assert "not bitwise (seeds 0)" in line and "environment is identical and train.deterministic is true" in line
    assert "the record or the code is not what it says" in line, line


def test_a_name_several_runs_share_is_refused_listing_their_ids(trained: tuple[Path, str], tmp_path: Path) -> None:
    repo, run_id = trained
    env = store_copy(repo, tmp_path)
    copy = copy_client(env)
    original = copy.get_run(run_id)
    for _ in range(5):  # older namesakes: the newest is the real run, which the old lookup took silently
        copy.create_run(original.info.experiment_id, start_time=1, run_name=original.info.run_name,
                        tags={"kind": "model", "model": "cnn"})
    named = copy.search_runs([original.info.experiment_id], f"attributes.run_name = '{original.info.run_name}' and "
                             "tags.kind = 'model'", order_by=["attributes.start_time DESC"])
    ids = [r.info.run_id for r in named]
    reports = sorted((repo / "reports").rglob("*"))
    before = [(r.info.run_id, r.info.status, r.data.tags) for r in all_runs(copy)]
    line = last_line(reproduce(repo, original.info.run_name, env=env))
    assert f"'{original.info.run_name}' names {len(ids)} runs, newest first: {', '.join(ids[:4])} and " \
           f"{len(ids) - 4} more; give the run id" in line, line
    assert [(r.info.run_id, r.info.status, r.data.tags) for r in all_runs(copy)] == before
    assert sorted((repo / "reports").rglob("*")) == reports


def test_unknown_run_is_refused(trained: tuple[Path, str]) -> None:
    repo, run_id = trained
    before = snapshot(repo, run_id), len(reproductions(repo, run_id))
    line = last_line(reproduce(repo, "no-such-run"))
    assert "no run 'no-such-run'" in line and "MLFLOW_TRACKING_URI" in line
    assert (snapshot(repo, run_id), len(reproductions(repo, run_id))) == before


def test_archive_with_another_md5_is_refused(trained: tuple[Path, str], tmp_path: Path) -> None:
    repo, run_id = trained
    other = tmp_path / "other.tar.gz"
    md5 = write_archive(other, archive_files(n_per_class=5))
    before = snapshot(repo, run_id), len(reproductions(repo, run_id))
    done = reproduce(repo, run_id, env={"CIFAR10_URL": other.as_uri(), "CIFAR10_MD5": md5})
    line = last_line(done)
    assert f"gives MD5 {md5}" in line and "CIFAR10_URL" in line, line
    assert (snapshot(repo, run_id), len(reproductions(repo, run_id))) == before


def test_code_changed_since_the_run_is_refused(trained: tuple[Path, str]) -> None:
    repo, _ = trained
    models = repo / "cifar3study" / "training" / "models.py"
    models.write_text(models.read_text() + "# an uncommitted change\n")
    sh(repo, "dvc", "repro", "-s", "train@cnn")  # recorded on a dirty tree
    sh(repo, "git", "checkout", "-q", "--", "cifar3study/training/models.py")
    dirty = parent_run(repo)
    before = snapshot(repo, dirty)
    line = last_line(reproduce(repo, dirty))
    assert "differs from its commit" in line and "cifar3study/training/models.py" in line, line
    assert "uncommitted changes" in line
    assert snapshot(repo, dirty) == before and not reproductions(repo, dirty)


def test_run_whose_commit_is_not_in_this_repo_is_refused(trained: tuple[Path, str]) -> None:
    repo, _ = trained
    sh(repo, "git", "checkout", "-q", "-b", "gone")
    (repo / "NOTE.txt").write_text("a commit that will be deleted\n")
    sh(repo, "git", "add", "NOTE.txt")
    sh(repo, "git", "commit", "-qm", "gone")
    gone = sh(repo, "git", "rev-parse", "HEAD").strip()
    sh(repo, "dvc", "repro", "-s", "-f", "train@cnn")
    sh(repo, "git", "checkout", "-q", "-")
    sh(repo, "git", "branch", "-qD", "gone")
    sh(repo, "git", "reflog", "expire", "--expire-unreachable=now", "--all")
    sh(repo, "git", "gc", "-q", "--prune=now")
    run_id = parent_run(repo)
    assert client(repo).get_run(run_id).data.tags["mlflow.source.git.commit"] == gone
    before = snapshot(repo, run_id)
    line = last_line(reproduce(repo, run_id))
    assert f"commit '{gone}'" in line and "not in this repository" in line and "git fetch" in line, line
    assert snapshot(repo, run_id) == before and not reproductions(repo, run_id)

