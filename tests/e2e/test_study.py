"""A study on one box with Ray's local default: real Ray, real DVC experiments, the repository's own MLflow store.

One 4-trial study (1 epoch, one seed, tiny data) is shared by the tests below. Its Ray node is told it has two
GPUs and each trial asks for one, so two trials run at once, each with its own CUDA_VISIBLE_DEVICES (training
falls back to the CPU here). A second, 2-trial study has one trial that fails at run time.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.e2e.conftest import ENV, sh

GRID = {"train.lr": [0.005, 0.01], "train.momentum": [0.0, 0.9]}
MODELS = ("fc", "cnn")


def run_study(repo: Path, study: dict) -> tuple[subprocess.CompletedProcess, float]:
    """Run the study driver in `repo` on a study file beside it; (its process, seconds it took)."""
    path = repo.parent / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    # A token of its own: Ray's token auth stays on without writing ~/.ray/auth_token.
    env = {**ENV, "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cifar3study.studies.run", str(path), "--num-gpus", "2"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    return done, time.monotonic() - started


def runs(repo: Path, filter_string: str = "") -> list:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar3")
    return client.search_runs([experiment.experiment_id], filter_string, max_results=1000)


@pytest.fixture(scope="module")
def study(make_repo: Callable[..., Path]) -> tuple[Path, subprocess.CompletedProcess]:
    repo = make_repo(epochs=1, seeds=[0])
    done, _ = run_study(repo, {"name": "grid4", "grid": GRID, "resources": {"cpus": 1, "gpus": 1}})
    return repo, done


def trial_names(repo: Path) -> set[str]:
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    return {e["name"] for e in shown[0].get("experiments") or []} | {
        e["name"] for entry in shown for e in entry.get("experiments") or []}


def test_every_trial_is_an_experiment_with_one_finished_run_per_model(study: tuple[Path, subprocess.CompletedProcess]
                                                                       ) -> None:
    repo, done = study
    assert done.returncode == 0, done.stderr[-3000:]
    parents = runs(repo, "tags.study = 'grid4' and tags.kind = 'model'")
    keys = {r.data.tags["trial"] for r in parents}
    assert len(keys) == 4
    assert sorted((r.data.tags["trial"], r.data.tags["model"]) for r in parents) == sorted(
        (key, model) for key in keys for model in MODELS)
    assert {r.info.status for r in parents} == {"FINISHED"}
    assert trial_names(repo) >= {f"grid4-{key}" for key in keys}
    for found in runs(repo, "tags.kind != 'study'"):  # seeds and comparisons too
        assert found.data.tags.get("study") == "grid4" and found.data.tags.get("trial") in keys
        assert found.info.status == "FINISHED" and found.data.tags.get("dvc.exp_name") == f"grid4-{found.data.tags['trial']}"
        local = Path(found.info.artifact_uri.removeprefix("file://"))
        assert local.is_relative_to(repo / "mlruns")  # the repository's store, as `dvc repro` uses


def test_concurrent_trials_see_different_gpus(study: tuple[Path, subprocess.CompletedProcess]) -> None:
    repo, _ = study
    spans: dict[str, list] = {}
    for found in runs(repo, "tags.study = 'grid4'"):
        if "trial" in found.data.tags:
            span = spans.setdefault(found.data.tags["trial"], [found.info.start_time, found.info.end_time, set()])
            span[0], span[1] = min(span[0], found.info.start_time), max(span[1], found.info.end_time)
            span[2].add(found.data.tags.get("cuda_visible_devices"))
    assert all(len(gpus) == 1 for _, _, gpus in spans.values())  # one GPU per trial, on every run of it
    assert {next(iter(gpus)) for _, _, gpus in spans.values()} == {"0", "1"}
    overlapping = [(a, b) for a in spans.values() for b in spans.values() if a is not b and a[0] < b[1] and b[0] < a[1]]
    assert overlapping  # two trials did run at once
    assert all(a[2] != b[2] for a, b in overlapping)


def test_the_report_and_its_run_are_written(study: tuple[Path, subprocess.CompletedProcess]) -> None:
    repo, done = study
    folder = repo / "reports" / "studies" / "grid4"
    assert {"report.md", "trials.csv", "val_acc_vs_train.lr.png", "val_acc_vs_train.momentum.png"} <= {
        p.name for p in folder.iterdir()}
    assert len((folder / "trials.csv").read_text().strip().splitlines()) > 4  # a header and a row per trial and model
    assert len(runs(repo, "tags.study = 'grid4' and tags.kind = 'study'")) == 1
    assert str(folder / "report.md") in done.stderr and "viewStateShareKey=study-grid4" in done.stderr


def test_a_rerun_of_the_finished_study_does_nothing_and_says_so(study: tuple[Path, subprocess.CompletedProcess]
                                                                 ) -> None:
    repo, _ = study
    before = len(runs(repo))
    again, seconds = run_study(repo, {"name": "grid4", "grid": GRID, "resources": {"cpus": 1, "gpus": 1}})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all 4 trials already finished" in again.stderr and "Ray" not in again.stderr
    assert len(runs(repo)) == before
    print(f"rerun of a finished 4-trial study: {seconds:.1f} s")


def test_a_trial_failing_at_run_time_is_one_line_and_the_others_finish(make_repo: Callable[..., Path]) -> None:
    repo = make_repo(epochs=1, seeds=[0])
    # A class name passes params validation; only the archive says CIFAR-10 has no dragons.
    classes = [["airplane", "automobile", "ship"], ["airplane", "dragon"]]
    done, _ = run_study(repo, {"name": "broken", "grid": {"data.classes": classes}, "set": {"train.lr": 0.02}})
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if "failed:" in line and "trial broken-" in line]
    assert len(failed) == 1 and "data.classes names unknown class 'dragon'" in failed[0]
    assert done.stderr.strip().splitlines()[-1].endswith("finished trials are kept")
    finished = runs(repo, "tags.study = 'broken' and tags.kind = 'comparison'")
    assert len(finished) == 1
    parents = runs(repo, f"tags.trial = '{finished[0].data.tags['trial']}' and tags.kind = 'model'")
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    assert not runs(repo, "attributes.status = 'RUNNING'")
    assert (repo / "reports" / "studies" / "broken" / "report.md").is_file()
