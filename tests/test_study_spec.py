"""Study files: a grid or a space per model, selection, final refits, checked against params.yaml in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cifar3study.studies.checks import load_study
from cifar3study.studies.spec import MAX_TRIALS, Dimension, Resources, StudyError, trial_key
from tests.helpers import ROOT

GRID = {"name": "lr-mom", "grid": {"train.lr": [0.005, 0.01], "train.momentum": [0.0, 0.9]},
        "set": {"train.epochs": 1, "data.holdout": 0.2}, "resources": {"cpus": 0.5, "gpus": 1}}
SPACE = {"name": "tpe", "space": {"train.lr": {"float": [0.001, 0.1], "log": True},
                                  "train.batch_size": {"choice": [32, 64]},
                                  "models.cnn.channels": {"choice": [[16, 8], [8, 4]]}},
         "search": {"sampler": "tpe", "trials": 6, "seed": 3}, "prune": {"pruner": "asha", "min_epochs": 2, "reduction": 3},
         "set": {"data.holdout": 0.2, "train.epochs": 4}, "final": {"seeds": [10, 11, 12]}}


def load(tmp_path: Path, study: object) -> object:
    path = tmp_path / "study.yaml"
    path.write_text(study if isinstance(study, str) else yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return load_study(path, ROOT / "params.yaml")[0]


def refused(tmp_path: Path, study: object) -> str:
    with pytest.raises(StudyError) as caught:
        load(tmp_path, study)
    message = str(caught.value)
    assert "\n" not in message and len(message) <= 400
    return message


def test_a_grid_is_a_space_of_choices_searched_per_model(tmp_path: Path) -> None:
    study = load(tmp_path, GRID)
    assert study.search.sampler == "grid" and study.models == ("fc", "cnn")
    assert study.space["train.lr"] == Dimension("train.lr", "choice", choices=(0.005, 0.01))
    assert study.trials_for("fc") == study.trials_for("cnn") == 4
    assert study.resources == Resources(cpus=0.5, gpus=1.0) and study.select == "holdout"
    assert study.final_seeds == (10, 11, 12, 13, 14)  # the default final phase


def test_a_space_gives_each_model_only_the_keys_that_change_it(tmp_path: Path) -> None:
    study = load(tmp_path, SPACE)
    assert study.keys_for("cnn") == ["train.lr", "train.batch_size", "models.cnn.channels"]
    assert study.keys_for("fc") == ["train.lr", "train.batch_size"]
    assert study.space["train.lr"].log and study.trials_for("fc") == 6
    assert study.final_overrides() == {"data.holdout": 0.0, "train.seeds": [10, 11, 12], "visualize.seed": 10}
    only_cnn = load(tmp_path, {**SPACE, "space": {"models.cnn.hidden": {"choice": [[32], [64]]}}})
    assert only_cnn.models == ("cnn",)  # fc has nothing to search, so it is not searched


def test_the_digest_and_trial_key_tell_studies_and_trials_apart(tmp_path: Path) -> None:
    a, b = load(tmp_path, SPACE), load(tmp_path, {**SPACE, "search": {**SPACE["search"], "seed": 4}})
    assert a.digest() != b.digest()
    assert a.digest() == load(tmp_path, {**SPACE, "resources": {"cpus": 2}}).digest()  # resources change no result
    keys = {trial_key("s", "a" * 40, "cnn", "search", 0), trial_key("s", "b" * 40, "cnn", "search", 0),
            trial_key("s", "a" * 40, "fc", "search", 0), trial_key("s", "a" * 40, "cnn", "final", 0),
            trial_key("s", "a" * 40, "cnn", "search", 1)}
    assert len(keys) == 5


def test_the_example_studies_are_valid() -> None:
    for path in (ROOT / "studies").glob("*.yaml"):
        load_study(path, ROOT / "params.yaml")


@pytest.mark.parametrize(("change", "named"), [
    ({"space": {"train.lrr": {"float": [0.1, 1.0]}}}, "space.train.lrr is not a key of params.yaml"),
    ({"space": {"train.lr": {"float": [0.1]}}}, "space.train.lr.float must be [low, high]"),
    ({"space": {"train.lr": {"float": [0.1, 0.01]}}}, "space.train.lr.float must be [low, high] with low < high"),
    ({"space": {"train.lr": {"float": [0.0, 0.1], "log": True}}}, "must be > 0 on a log scale"),
    ({"space": {"train.lr": {"float": [-1.0, 0.1]}}}, "train.lr must be > 0"),
    ({"space": {"train.lr": {"float": [0.01, "big"]}}}, "space.train.lr.float must be [low, high]"),
    ({"space": {"train.epochs": {"int": [1, 2.5]}}, "set": {"data.holdout": 0.2}}, "space.train.epochs.int must be [low"),
    ({"space": {"train.epochs": {"int": [1, 100000]}}, "set": {"data.holdout": 0.2}}, "train.epochs must be 1 to 10000"),
    ({"space": {"train.lr": {"uniform": [0.1, 1.0]}}}, "space.train.lr must be one of"),
    ({"space": {"train.lr": {"float": [0.01, 0.1], "int": [1, 2]}}}, "space.train.lr must be one of"),
    ({"space": {"train.batch_size": {"choice": []}}}, "space.train.batch_size.choice must be a non-empty list"),
    ({"space": {"models.cnn.activation": {"choice": ["relu", "swish"]}}}, "models.cnn.activation must be one of"),
    ({"space": {"train.batch_size": {"choice": [32], "log": True}}}, "log must be true or false (ranges only)"),
    ({"space": {"data.holdout": {"float": [0.1, 0.3]}}}, "space.data.holdout cannot be searched"),
    ({"search": {"sampler": "bayes", "trials": 3}}, "search.sampler must be one of"),
    ({"search": {"sampler": "tpe", "trials": 0}}, f"search.trials must be 1 to {MAX_TRIALS}"),
    ({"search": {"sampler": "grid"}}, "grid needs choice dimensions only"),
    ({"prune": {"pruner": "hyperband"}}, "prune.pruner must be one of"),
    ({"prune": {"pruner": "asha", "min_epochs": 0}}, "prune.min_epochs must be an integer >= 1"),
    ({"prune": {"pruner": "asha", "reduction": 1}}, "prune.reduction must be an integer >= 2"),
    ({"select": "test"}, "select must be holdout"),
    ({"set": {"train.epochs": 4}}, "set a holdout to rank on"),
    ({"select": "val"}, "data.holdout must stay 0"),
    ({"set": {"data.holdout": 0.7, "train.epochs": 4}}, "data.holdout"),
    ({"final": {"seeds": [0, 10]}}, "final.seeds shares seeds [0] with the search"),
    ({"final": {"seeds": [10]}}, "final.seeds must list 2 to 64 distinct seeds"),
    ({"models": ["rnn"]}, "models must list distinct models of params.yaml"),
    ({"models": ["fc"], "space": {"models.cnn.hidden": {"choice": [[32]]}}}, "lists fc, but nothing searched changes it"),
    ({"grid": {"train.lr": [0.1]}}, "grid or space: give exactly one"),
    ({"set": {"train.lr": 0.1, "data.holdout": 0.2}}, "set.train.lr is also searched"),
    ({"resources": {"cpus": 0}}, "resources.cpus must be > 0"),
    ({"name": "../up"}, "name must be lowercase"),
])
def test_a_bad_space_is_refused_in_one_line_naming_the_key(tmp_path: Path, change: dict, named: str) -> None:
    assert named in refused(tmp_path, {**SPACE, **change})


@pytest.mark.parametrize(("change", "named"), [
    ({"grid": {"train.lr": [0.01, -1.0]}}, "train.lr must be > 0"),
    ({"grid": {}}, "grid must map dotted params keys"),
    ({"grid": {"train.lr": []}}, "grid.train.lr must be a non-empty list"),
    ({"grid": {"train.lr": [0.1 * i for i in range(1, 18)], "train.momentum": [0.0] * 16}},
     f"more than {MAX_TRIALS}"),
    ({"search": {"sampler": "tpe", "trials": 3}}, "must be grid (or left out) for a grid"),
    ({"seeds": [0]}, "seeds is not a known key"),
])
def test_a_bad_grid_is_refused_in_one_line_naming_the_key(tmp_path: Path, change: dict, named: str) -> None:
    assert named in refused(tmp_path, {**GRID, **change})


def test_a_duplicate_key_and_bad_yaml_are_refused_in_one_line(tmp_path: Path) -> None:
    assert "'name' is given twice" in refused(tmp_path, "name: a\nname: b\ngrid: {train.lr: [0.1]}\n")
    assert "is not valid YAML" in refused(tmp_path, "name: [a\n")
    assert "must be a mapping" in refused(tmp_path, "- a\n")
