"""End to end: the real `dvc` CLI runs the whole pipeline in a temp copy of the repo.

The archive is a tiny synthetic one served over loopback HTTP, and training
is two short epochs, so the full pipeline runs in about a minute. Tests run
in file order on one repo: later ones change it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import ran, sh


@pytest.fixture(scope="module")
def repo(make_repo: Callable[..., Path]) -> Path:
    return make_repo()


@pytest.fixture(scope="module")
def first_repro(repo: Path) -> str:
    return sh(repo, "dvc", "repro")


def test_repro_builds_every_output(repo: Path, first_repro: str) -> None:
    assert {"download", "cifar3", "stats", "train@fc", "train@cnn", "evaluate@fc", "evaluate@cnn", "compare",
            "visualize", "plots_page"} <= ran(first_repro)
    for path in ("dvc.lock", "data/metrics/fc.json", "data/metrics/cnn.json", "reports/comparison.md",
                 "reports/comparison.csv", "reports/learning_curves.csv", "reports/accuracy_vs_params.png",
                 "data/history/cnn.csv", "data/runs/cnn.json", "data/plots/kernels.png"):
        assert (repo / path).is_file(), path
    table = (repo / "reports/comparison.md").read_text()
    assert "3,737,603" in table and "18,123" in table


def test_mlflow_store_holds_each_model_with_its_seeds(repo: Path, first_repro: str) -> None:
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute("select m.value, k.value, r.status from runs r join tags m on m.run_uuid = r.run_uuid "
                          "join tags k on k.run_uuid = r.run_uuid where m.key = 'model' and k.key = 'kind'").fetchall()
    assert sorted(rows) == sorted([(m, "model", "FINISHED") for m in ("cnn", "fc")] +
                                  [(m, "seed", "FINISHED") for m in ("cnn", "fc") for _ in (0, 1)])
    assert (repo / "mlruns").is_dir()


def test_second_repro_runs_nothing(repo: Path, first_repro: str) -> None:
    output = sh(repo, "dvc", "repro")
    assert ran(output) == set()
    assert "up to date" in output


def test_metrics_show_lists_both_models(repo: Path, first_repro: str) -> None:
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    assert files["data/metrics/fc.json"]["data"]["params"] == 3_737_603
    cnn = files["data/metrics/cnn.json"]["data"]
    assert cnn["params"] == 18_123 and cnn["val_acc_n"] == 2 and {"val_acc_std", "val_acc_seed1"} <= cnn.keys()


def test_plots_render_offline(repo: Path, first_repro: str) -> None:
    """`dvc plots show` writes a page with Vega inlined: nothing to fetch from a CDN on an air-gapped box."""
    sh(repo, "dvc", "plots", "show", "-o", "plots_out")
    page = (repo / "plots_out" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src" not in page
    assert "vegaEmbed" in page and page.count("min-max band)") == 2  # the two learning-curve charts
    assert "data/eval/cnn/confusion.csv" in page


def stale(repo: Path) -> set[str]:
    """Stages `dvc status` says would rerun."""
    return set(json.loads(sh(repo, "dvc", "status", "--json")))


def test_editing_figure_code_reruns_no_training(repo: Path, first_repro: str) -> None:
    figures = repo / "cifar3study" / "reporting" / "figures.py"
    original = figures.read_text()
    edited = original.replace('ylabel="cross-entropy"', 'ylabel="cross-entropy loss"')
    assert edited != original  # the edit must change the figure code, or the test proves nothing
    figures.write_text(edited)
    try:
        assert stale(repo) == {"compare", "visualize"}
    finally:
        figures.write_text(original)
    assert stale(repo) == set()


def test_experiment_reruns_only_training_and_is_listed(repo: Path, first_repro: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline results")
    output = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.02")
    assert ran(output) >= {"train@fc", "train@cnn", "evaluate@fc", "evaluate@cnn", "compare"}
    assert ran(output).isdisjoint({"download", "cifar3", "stats"})
    shown = json.dumps(json.loads(sh(repo, "dvc", "exp", "show", "--json")))
    assert '"lr": 0.02' in shown and '"lr": 0.01' in shown
    with sqlite3.connect(repo / "mlflow.db") as db:
        names = db.execute("select r.name from runs r join tags m on m.run_uuid = r.run_uuid join tags k on "
                           "k.run_uuid = r.run_uuid where m.key = 'model' and m.value = 'cnn' and k.key = 'kind' "
                           "and k.value = 'model'").fetchall()
    assert len(names) == 2 and names[0] != names[1]  # the two setups are told apart in the runs table


@pytest.fixture(scope="module")
def one_seed(repo: Path, first_repro: str) -> str:
    """A one-seed cnn experiment run with `--temp` (in .dvc/tmp/exps/...): one run serves two tests."""
    sh(repo, "dvc", "exp", "run", "--temp", "-S", "train.seeds=[0]", "-n", "one-seed", "evaluate@cnn")
    return "one-seed"


def test_a_one_seed_experiment_runs_and_is_listed(repo: Path, one_seed: str) -> None:
    experiments = json.loads(sh(repo, "dvc", "exp", "show", "--json"))[1]["experiments"]
    (one,) = [e for e in experiments if e["name"] == one_seed]
    data = one["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["seeds"] == [0]
    assert data["metrics"]["data/metrics/cnn.json"]["data"]["val_acc_n"] == 1


def test_temp_experiment_logs_to_the_repo_store(repo: Path, one_seed: str) -> None:
    """`--temp` runs in .dvc/tmp/exps/...; its MLflow runs must still land in the repo's store."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        uris = db.execute("select r.artifact_uri from runs r join tags t on t.run_uuid = r.run_uuid "
                          "where t.key = 'dvc.exp_name' and t.value = ?", (one_seed,)).fetchall()
    assert len(uris) == 2  # the cnn's parent run and its seed run
    assert all(uri.removeprefix("file://").startswith(str(repo / "mlruns")) for (uri,) in uris)


def test_a_new_params_entry_is_trained_evaluated_and_compared(repo: Path, first_repro: str) -> None:
    """The model list lives in params.yaml only: no dvc.yaml edit."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["small_fc"] = {"arch": "fc", "hidden": [16], "activation": "relu"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = sh(repo, "dvc", "repro")
    assert {"train@small_fc", "evaluate@small_fc", "compare"} <= ran(output)
    assert ran(output).isdisjoint({"train@fc", "train@cnn", "evaluate@fc", "evaluate@cnn"})
    assert "small_fc" in (repo / "reports/comparison.md").read_text()
