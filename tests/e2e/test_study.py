"""Studies on one box with Ray's local default: real Ray, DVC experiments, the repository's MLflow store and ledger.

The main study is a grid of 2 configurations per model, ranked on a holdout, whose winners are refit from 3
final seeds and judged on the test split; two drivers run it at once, as two teammates would. A second repo,
whose archive has other test images, runs the same search: its scores must not move. A third study has a
trial that fails at run time. Everything trains 1 epoch of tiny data.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tests.e2e.conftest import ENV, sh
from tests.helpers import FileServer, archive_files, synthetic_batch, write_archive

MODELS = ("fc", "cnn")
GRID = {"name": "grid", "grid": {"train.lr": [0.005, 0.05]},
        "set": {"data.holdout": 0.25, "train.epochs": 1, "train.seeds": [0], "train.batch_size": 8},
        "final": {"seeds": [10, 11, 12]}, "resources": {"cpus": 1}}


def start_study(repo: Path, study: dict, *extra: str) -> subprocess.Popen:
    """The study driver in `repo`, on a study file beside it."""
    path = repo.parent / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    env = {**ENV, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "cifar3study.studies.run", str(path), *extra], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(driver: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = driver.communicate(timeout=1800)
    return subprocess.CompletedProcess(driver.args, driver.returncode, out, err)


def runs(repo: Path, filter_string: str = "") -> list:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar3")
    return client.search_runs([experiment.experiment_id], filter_string, max_results=1000)


def ledger_trials(repo: Path, study: str, model: str, phase: str = "search") -> list:
    storage = optuna.storages.RDBStorage(f"sqlite:///{repo / 'optuna.db'}")
    names = [s.study_name for s in storage.get_all_studies()
             if s.study_name.startswith(f"{study}/{model}/") and s.study_name.endswith("/final") == (phase == "final")]
    assert len(names) == 1, names
    return storage.get_all_trials(storage.get_study_id_from_name(names[0]))


def exp_names(repo: Path) -> set[str]:
    return set(sh(repo, "dvc", "exp", "list", "--name-only").split())


@pytest.fixture(scope="module")
def two_drivers(make_repo: Callable[..., Path]) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """The grid study started by two drivers at the same moment."""
    repo = make_repo()
    drivers = [start_study(repo, GRID) for _ in range(2)]
    return repo, [finish(d) for d in drivers]


def test_two_drivers_share_the_study_and_run_each_trial_once(two_drivers: tuple) -> None:
    repo, done = two_drivers
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    parents = runs(repo, "tags.study = 'grid' and tags.kind = 'model'")
    assert {r.info.status for r in parents} == {"FINISHED"}
    search = [r for r in parents if r.data.tags["phase"] == "search"]
    final = [r for r in parents if r.data.tags["phase"] == "final"]
    assert sorted(r.data.tags["model"] for r in search) == sorted(MODELS * 2)  # one run set per trial
    assert sorted(r.data.tags["model"] for r in final) == sorted(MODELS)  # one per refit
    assert len({r.data.tags["trial"] for r in parents}) == 6
    for model in MODELS:
        assert [t.state.name for t in ledger_trials(repo, "grid", model)] == ["COMPLETE", "COMPLETE"]
        assert [t.state.name for t in ledger_trials(repo, "grid", model, "final")] == ["COMPLETE"]
    assert exp_names(repo) == {r.data.tags["dvc.exp_name"] for r in parents}
    assert len(runs(repo, "tags.study = 'grid' and tags.kind = 'study'")) == 1


def test_search_trials_never_touch_the_test_split_and_refits_are_judged_on_it(two_drivers: tuple) -> None:
    repo, _ = two_drivers
    for parent in runs(repo, "tags.study = 'grid' and tags.kind = 'model'"):
        metrics = set(parent.data.metrics)
        if parent.data.tags["phase"] == "search":
            assert "holdout_acc" in metrics and not any(k.startswith("val_") for k in metrics), metrics
            assert parent.data.params["data.holdout"] == "0.25"
        else:
            assert "val_acc" in metrics and "holdout_acc" not in metrics
            assert parent.data.params["train.seeds"] == "[10, 11, 12]"


def test_the_report_gives_the_fair_comparison(two_drivers: tuple) -> None:
    repo, done = two_drivers
    folder = repo / "reports" / "studies" / "grid"
    report = (folder / "report.md").read_text()
    for item in ("holdout of 25%", "Final phase", "optimism", "cnn − fc", "P(b > a)", "Search cost"):
        assert item in report, item
    final = (folder / "final.csv").read_text().splitlines()
    assert len(final) == 3 and final[0].startswith("model")
    assert any(str(folder / "report.md") in d.stderr for d in done)
    assert any("viewStateShareKey=study-grid-final" in d.stderr for d in done)


def test_a_rerun_of_the_finished_study_does_nothing_and_starts_no_ray(two_drivers: tuple) -> None:
    repo, _ = two_drivers
    before = len(runs(repo))
    started = time.monotonic()
    again = finish(start_study(repo, GRID))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to run" in again.stderr and "Ray" not in again.stderr
    assert len(runs(repo)) == before
    print(f"rerun of a finished study: {time.monotonic() - started:.1f} s")


def other_test_images(server: FileServer, folder: Path) -> tuple[str, str]:
    """(url, md5) of an archive with the same training batches and other test images."""
    files = archive_files(n_per_class=8)
    files["test_batch"] = pickle.dumps(synthetic_batch(8, 1234), protocol=2)
    md5 = write_archive(folder / "other.tar.gz", files)
    server.files["/other.tar.gz"] = (folder / "other.tar.gz").read_bytes()
    return server.url("other.tar.gz"), md5


def test_other_test_images_leave_every_search_score_unchanged(two_drivers: tuple, make_repo: Callable[..., Path],
                                                              archive_mirror: tuple, tmp_path: Path) -> None:
    """Selection reads no test image: a repo whose archive differs only in its test batch ranks identically.

    The cnn's search only: both models read their data through the same code, and each trial costs a run.
    """
    repo, _ = two_drivers
    url, md5 = other_test_images(archive_mirror[0], tmp_path)
    other = make_repo(data={"url": url, "md5": md5})
    done = finish(start_study(other, {**GRID, "models": ["cnn"], "final": "none", "resources": {"cpus": 1, "gpus": 1}},
                              "--num-gpus", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    first = {t.number: (t.params, t.value) for t in ledger_trials(repo, "grid", "cnn")}
    again = {t.number: (t.params, t.value) for t in ledger_trials(other, "grid", "cnn")}
    assert again == first and len(first) == 2
    gpus = {r.data.tags["trial"]: r.data.tags.get("cuda_visible_devices") for r in runs(other, "tags.kind = 'model'")}
    assert set(gpus.values()) <= {"0", "1"} and len(gpus) == 2  # Ray gave each trial one of the two GPUs


def test_a_trial_failing_at_run_time_is_one_line_and_the_others_finish(make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    # A class name passes params validation; only the archive says CIFAR-10 has no dragons.
    study = {**GRID, "name": "broken", "models": ["cnn"], "final": "none",
             "grid": {"data.classes": [["airplane", "automobile", "ship"], ["airplane", "dragon"]]}}
    done = finish(start_study(repo, study))
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if "failed:" in line and "trial broken-" in line]
    assert len(failed) == 1 and "data.classes names unknown class 'dragon'" in failed[0]
    assert done.stderr.strip().splitlines()[-1].endswith("failed ones retried")
    finished = runs(repo, "tags.study = 'broken' and tags.kind = 'model'")
    assert len(finished) == 1 and finished[0].info.status == "FINISHED"
    assert not runs(repo, "attributes.status = 'RUNNING'")
    assert (repo / "reports" / "studies" / "broken" / "report.md").is_file()
    assert sorted(t.state.name for t in ledger_trials(repo, "broken", "cnn")) == ["COMPLETE", "FAIL"]
    print(json.dumps({"failed": failed[0][:200]}))


@pytest.mark.parametrize("resources", [{"cpus": 64}, {"cpus": 1, "gpus": 1}])
def test_resources_no_node_offers_are_refused_before_any_trial(make_repo: Callable[..., Path], resources: dict) -> None:
    repo = make_repo()
    started = time.monotonic()
    done = finish(start_study(repo, {**GRID, "name": "greedy", "resources": resources}))
    assert done.returncode == 1 and time.monotonic() - started < 120
    last = done.stderr.strip().splitlines()[-1]
    assert "no node of this cluster offers" in last and "nodes offer" in last, done.stderr[-2000:]
    assert not [t for m in MODELS for t in ledger_trials(repo, "greedy", m)]  # nothing was claimed
    assert not (repo / "mlflow.db").exists() or not runs(repo, "tags.study = 'greedy'")
