"""params.yaml is validated before any work, and errors name the key."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from cifar3study.data import cifar10_format
from cifar3study.data.dataset import holdout_count
from cifar3study.params import TRAIN_IMAGES_PER_CLASS, ParamError, archive_source, load_params, parse_params
from tests.helpers import ROOT


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_value_in_params_yaml_has_a_trailing_comment() -> None:
    """The file documents itself: each `key: value` line says its unit or meaning."""
    bare = [line for line in (ROOT / "params.yaml").read_text().splitlines()
            if re.match(r"\s*[a-z_]+: \S", line) and "#" not in line]
    assert bare == []


def test_repo_params_load_and_every_field_is_set(raw: dict) -> None:
    params = parse_params(raw)
    assert all(getattr(params.train, f.name) is not None for f in dataclasses.fields(params.train))
    assert params.visualize.model in params.models


@pytest.mark.parametrize(("path", "value", "needle"), [
    (("models", "cnn", "activation"), "sigmoid", "models.cnn.activation"),
    (("train", "lr"), -0.1, "train.lr"),
    (("train", "epochs"), 0, "train.epochs"),
    (("train", "epochs"), 2.5, "train.epochs"),
    (("train", "deterministic"), "yes", "train.deterministic"),
    (("train", "device"), "tpu", "train.device"),
    (("data", "md5"), "abc", "data.md5"),
    (("data", "classes"), ["ship", "ship"], "data.classes"),
    (("models", "fc", "hidden"), [1024, -1], "models.fc.hidden"),
    (("models", "fc", "hidden"), [1024, "x"], "models.fc.hidden[1]"),
    (("models", "cnn", "channels"), "16", "models.cnn.channels"),
    (("models", "fc", "channels"), [16], "models.fc.channels applies only to arch: cnn"),
    (("models", "cnn", "pool"), None, "models.cnn.pool must be an integer"),
    (("visualize", "model"), "fc", "visualize.model must name a model with arch: cnn"),
    (("train", "lr"), float("inf"), "train.lr must be a finite number"),
    (("train", "momentum"), float("inf"), "train.momentum must be a finite number"),
    (("train", "lr"), float("nan"), "train.lr must be a finite number"),
    (("data", "timeout"), float("inf"), "data.timeout must be a finite number"),
    (("data", "deadline"), 1, "data.deadline must be >= data.timeout"),
    # Finite, so accepted: the download then died with an OverflowError traceback from its timer thread (issue 25).
    (("data", "timeout"), 1e300, "data.timeout must be > 0 and at most 3600 seconds"),
    (("data", "deadline"), 1e300, "data.deadline must be >= data.timeout seconds and at most 86400"),
    (("train", "seeds"), [0, 2**32], "train.seeds must be between 0 and 4294967295"),
    (("train", "seeds"), [], "train.seeds must list at least one seed"),
    (("train", "seeds"), [1, 2, 1], "train.seeds must not repeat a seed"),
    (("train", "seeds"), [0, 1.5], "train.seeds[1] must be an integer"),
    (("train", "seeds"), 3, "train.seeds must be a list"),
    (("visualize", "seed"), 9, "visualize.seed must be one of train.seeds"),
    (("visualize", "model"), "wide", "visualize.model must name a model with arch: cnn"),
    # Sizes that are meaningless, or would allocate gigabytes to terabytes before failing (issue 19, item 2).
    (("models", "fc", "hidden"), [1_000_000_000], "models.fc.hidden widths must be 1 to 65536"),
    (("models", "fc", "hidden"), [8] * 65, "models.fc.hidden must list at most 64 layers"),
    (("models", "cnn", "channels"), [100_000], "models.cnn.channels must list 1 to 64 conv channel counts of 1 to 4096"),
    (("models", "cnn", "padding"), 1_000_000, "models.cnn.padding must be >= 0 and < kernel_size"),
    (("models", "cnn", "padding"), 3, "models.cnn.padding must be >= 0 and < kernel_size"),
    (("models", "cnn", "kernel_size"), 33, "models.cnn.kernel_size must be 1 to 32"),
    (("models", "cnn", "pool"), 33, "models.cnn.pool must be 1 to 32"),
    (("models", "cnn", "channels"), [4] * 6, "models.cnn.channels has more conv \\+ pool layers than 32 px"),
    (("train", "seeds"), list(range(100_000)), "train.seeds must list at most 64 seeds"),
    (("train", "epochs"), 10_001, "train.epochs must be 1 to 10000"),
    (("train", "batch_size"), 60_001, "train.batch_size must be 1 to 60000"),
    (("evaluate", "batch_size"), 10**12, "evaluate.batch_size must be 1 to 60000"),
])
def test_bad_value_names_the_key(raw: dict, path: tuple, value: object, needle: str) -> None:
    bad = copy.deepcopy(raw)
    section = bad
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    with pytest.raises(ParamError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_params(bad)


def test_unknown_and_missing_keys_are_named(raw: dict) -> None:
    typo = copy.deepcopy(raw)
    typo["train"]["learning_rate"] = 0.1
    with pytest.raises(ParamError, match=r"train\.learning_rate is not a known key"):
        parse_params(typo)
    missing = copy.deepcopy(raw)
    del missing["train"]["seeds"]
    with pytest.raises(ParamError, match=r"train\.seeds is missing"):
        parse_params(missing)
    conv = copy.deepcopy(raw)
    del conv["models"]["cnn"]["pool"]
    with pytest.raises(ParamError, match=r"models\.cnn\.pool is missing"):
        parse_params(conv)
    extra = copy.deepcopy(raw)
    extra["optimizer"] = {}
    with pytest.raises(ParamError, match="optimizer is not a known section"):
        parse_params(extra)


def test_yaml_1_1_exponent_strings_are_numbers(raw: dict) -> None:
    raw["train"]["lr"] = "1e-2"  # what PyYAML makes of `lr: 1e-2`
    assert parse_params(raw).train.lr == 0.01


def test_unreadable_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)


def test_env_overrides_archive_source(raw: dict) -> None:
    data = parse_params(raw).data
    assert archive_source(data, {}) == (data.url, data.md5)
    env = {"CIFAR10_URL": "file:///m/x.tar.gz", "CIFAR10_MD5": "B" * 32}
    assert archive_source(data, env) == ("file:///m/x.tar.gz", "b" * 32)
    assert archive_source(data, {"CIFAR10_URL": "", "CIFAR10_MD5": ""}) == (data.url, data.md5)


@pytest.mark.parametrize("text", ["train:\n  lr: 0.1\n  lr: 0.2\n", "train: {}\ntrain: {}\n"])
def test_duplicate_yaml_keys_are_named(tmp_path: Path, text: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamError, match=r"key '(lr|train)' is given twice \(line \d\)"):
        load_params(tmp_path / "params.yaml")


def test_yaml_infinity_is_refused(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text().replace("lr: 0.01", "lr: .inf")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamError, match=r"train\.lr must be a finite number"):
        load_params(tmp_path / "params.yaml")


def test_a_huge_unknown_key_still_gives_a_short_message(raw: dict) -> None:
    raw["train"]["x" * 1_000_000] = 1
    with pytest.raises(ParamError) as err:
        parse_params(raw)
    assert len(str(err.value)) < 400 and "is not a known key" in str(err.value)


def test_the_caps_admit_their_own_bounds(raw: dict) -> None:
    """Each cap refuses just past its bound, not at it: five 2 px pools leave 1 px of 32, as does one of 32 px."""
    raw["models"]["fc"]["hidden"] = [65_536] + [8] * 63
    raw["models"]["cnn"]["channels"] = [4_096] + [4] * 4
    raw["models"]["big"] = {**raw["models"]["cnn"], "channels": [4] * 64, "kernel_size": 32, "padding": 31,
                            "pool": 1}
    raw["models"]["one"] = {**raw["models"]["cnn"], "channels": [4], "kernel_size": 32, "padding": 31, "pool": 32}
    raw["train"].update({"seeds": list(range(64)), "epochs": 10_000, "batch_size": 60_000})
    raw["evaluate"]["batch_size"] = 60_000
    parse_params(raw)


@pytest.mark.parametrize("name", ["a;touch pwned;b", "../../../victim", "$(id)", "Fc", "fc-2", "x" * 33, 1, None])
def test_model_names_that_dvc_would_paste_into_commands_are_refused(raw: dict, name: object) -> None:
    raw["models"][name] = raw["models"]["fc"]
    with pytest.raises(ParamError, match=r"models key .* must match \[a-z\]\[a-z0-9_\]\*") as err:
        parse_params(raw)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_32_character_model_name_is_fine(raw: dict) -> None:
    raw["models"]["m" * 32] = raw["models"]["fc"]
    assert "m" * 32 in parse_params(raw).models


@pytest.mark.parametrize(("text", "needle"), [
    ("? [1, 2]\n: x\n", "a key on line 1 is a list or mapping"),
    ("train: {}\n[a]: 1\n", "a key on line 2 is a list or mapping"),
    ("{a: 1}: 2\n", "a key on line 1 is a list or mapping"),
    ("[" * 100_000, "nests deeper than 50 levels"),
    ("- " * 100_000 + "x\n", "nests deeper than 50 levels"),
    ("{a: " * 100_000, "nests deeper than 50 levels"),
])
def test_hostile_yaml_shapes_are_named_refusals(tmp_path: Path, text: str, needle: str) -> None:
    """A list as a key made PyYAML raise TypeError, deep nesting RecursionError: both `unexpected ...` lines."""
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamError, match=re.escape(needle)) as err:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize(("change", "needle"), [
    ({"holdout": 0.6}, "data.holdout must be 0 (none) to 0.5"),
    ({"holdout": -0.1}, "data.holdout must be 0 (none) to 0.5"),
    ({"holdout": "a fifth"}, "data.holdout must be a number"),
    ({"holdout_seed": -1}, "data.holdout_seed must be between 0 and 4294967295"),
    ({"holdout_seed": 2**32}, "data.holdout_seed must be between 0 and 4294967295"),
    ({"holdout_seed": 0.5}, "data.holdout_seed must be an integer"),
    # 5 of each class's 5,000 training images: not one batch of 64 to measure on
    ({"holdout": 0.001}, "data.holdout 0.001 holds out 5 of each class's 5,000 training images, fewer than one batch"),
])
def test_a_bad_holdout_is_one_line_naming_the_key(raw: dict, change: dict, needle: str) -> None:
    raw["data"].update(change)
    with pytest.raises(ParamError, match=re.escape(needle)) as refused:
        parse_params(raw)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400


def test_the_holdout_check_counts_as_the_split_is_carved(raw: dict) -> None:
    """Accepted exactly when carve_holdout would leave a batch of each class in both parts of CIFAR-10's 5,000."""
    assert TRAIN_IMAGES_PER_CLASS == cifar10_format.TRAIN_IMAGES_PER_CLASS
    for batch, fraction in [(64, 0.0128), (64, 0.0127), (64, 0.0126), (2500, 0.5), (2501, 0.5), (1, 0.0001)]:
        raw["data"]["holdout"], raw["train"]["batch_size"] = fraction, batch
        held = holdout_count(TRAIN_IMAGES_PER_CLASS, fraction)
        fits = min(held, TRAIN_IMAGES_PER_CLASS - held) >= batch
        try:
            parse_params(raw)
            accepted = True
        except ParamError:
            accepted = False
        assert accepted == fits, (batch, fraction, held)


def test_holdout_defaults_to_none(raw: dict) -> None:
    params = parse_params(raw)
    assert (params.data.holdout, params.data.holdout_seed) == (0.0, 0)
