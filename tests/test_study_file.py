"""Study files: a grid of overrides checked against params.yaml; every bad file refused in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cifar3study.studies.spec import MAX_TRIALS, Resources, StudyError, load_study, trial_key, trials
from tests.helpers import ROOT

BASE = "a" * 40
GOOD = {"name": "lr-mom", "grid": {"train.lr": [0.005, 0.01], "train.momentum": [0.0, 0.9]},
        "set": {"train.epochs": 1}, "resources": {"cpus": 0.5, "gpus": 1}}


def write(tmp_path: Path, study: object) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(study if isinstance(study, str) else yaml.safe_dump(study), encoding="utf-8")
    return path


def load(tmp_path: Path, study: object) -> list:
    path = write(tmp_path, study)
    parsed, params = load_study(path, ROOT / "params.yaml")
    return trials(parsed, params, BASE, path)


def refused(tmp_path: Path, study: object) -> str:
    with pytest.raises(StudyError) as caught:
        load(tmp_path, study)
    message = str(caught.value)
    assert "\n" not in message and len(message) <= 400
    return message


def test_a_good_study_gives_every_combination_with_the_fixed_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    study, params = load_study(path, ROOT / "params.yaml")
    assert study.resources == Resources(cpus=0.5, gpus=1.0) and study.swept == ["train.lr", "train.momentum"]
    found = trials(study, params, BASE, path)
    assert [t.overrides for t in found] == [
        {"train.lr": lr, "train.momentum": m, "train.epochs": 1} for lr in (0.005, 0.01) for m in (0.0, 0.9)]
    assert len({t.key for t in found}) == 4 and all(t.name == f"lr-mom-{t.key}" for t in found)
    assert found[0].models == ("fc", "cnn")
    assert found[0].set_args() == ["-S", "train.lr=0.005", "-S", "train.momentum=0.0", "-S", "train.epochs=1"]


def test_the_trial_key_depends_on_study_commit_and_overrides_not_their_order() -> None:
    key = trial_key("s", BASE, {"a.b": 1, "c.d": [0]})
    assert key == trial_key("s", BASE, {"c.d": [0], "a.b": 1})
    assert len({key, trial_key("t", BASE, {"a.b": 1, "c.d": [0]}), trial_key("s", "b" * 40, {"a.b": 1, "c.d": [0]}),
                trial_key("s", BASE, {"a.b": 2, "c.d": [0]})}) == 4


def test_the_example_study_is_valid() -> None:
    study, params = load_study(ROOT / "studies" / "lr-momentum.yaml", ROOT / "params.yaml")
    assert len(trials(study, params, BASE, ROOT / "studies" / "lr-momentum.yaml")) == 6


@pytest.mark.parametrize(("change", "named"), [
    ({"grid": {"train.lrr": [0.1]}}, "grid.train.lrr is not a key of params.yaml"),
    ({"set": {"models.rnn.arch": "rnn"}}, "set.models.rnn.arch is not a key of params.yaml"),
    ({"grid": {"train.lr": [0.01, -1.0]}}, "train.lr must be > 0"),
    ({"grid": {"train.batch_size": ["many"]}}, "train.batch_size must be an integer"),
    ({"grid": {"models.cnn.activation": ["relu", "swish"]}}, "models.cnn.activation must be one of"),
    ({"grid": {}}, "grid is empty"),
    ({"grid": {"train.lr": []}}, "grid.train.lr must be a non-empty list"),
    ({"grid": {"train.lr": [0.1] * 257}}, f"more than the cap of {MAX_TRIALS}"),
    ({"seeds": [0]}, "seeds is not a known key"),
    ({"name": "LR Study"}, "name must be lowercase"),
    ({"name": "../up"}, "name must be lowercase"),
    ({"resources": {"cpus": 0}}, "resources.cpus must be > 0"),
    ({"resources": {"gpus": -1}}, "resources.gpus must be a number >= 0"),
    ({"resources": {"memory": 1}}, "resources.memory is not a known key"),
    ({"set": {"train.lr": 0.1}}, "set.train.lr is also in grid"),
])
def test_a_bad_study_is_refused_in_one_line_naming_the_key(tmp_path: Path, change: dict, named: str) -> None:
    assert named in refused(tmp_path, {**GOOD, **change})


def test_a_duplicate_key_and_bad_yaml_are_refused_in_one_line(tmp_path: Path) -> None:
    assert "'name' is given twice" in refused(tmp_path, "name: a\nname: b\ngrid: {train.lr: [0.1]}\n")
    assert "is not valid YAML" in refused(tmp_path, "name: [a\n")
    assert "must be a mapping" in refused(tmp_path, "- a\n")
