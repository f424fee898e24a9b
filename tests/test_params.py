"""params.yaml is validated before any work, and errors name the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import ParamError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_with_reference_defaults(raw: dict) -> None:
    params = parse_params(raw)
    assert params.train.lr == 0.01 and params.train.batch_size == 64 and params.train.epochs == 100
    assert params.data.classes == ("airplane", "automobile", "ship")
    assert set(params.models) == {"fc", "cnn"}
    assert params.models["fc"].hidden == (1024, 512, 128)
    assert params.models["cnn"].channels == (16, 8)


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
    del missing["train"]["seed"]
    with pytest.raises(ParamError, match=r"train\.seed is missing"):
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


def test_bad_param_stops_a_stage_before_work(tmp_path: Path, raw: dict) -> None:
    raw["models"]["cnn"]["activation"] = "sigmoid"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "raw" / "archive.tar.gz"
    done = subprocess.run([sys.executable, "-m", "stages.download", "--params", str(params), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "models.cnn.activation" in last and "tanh" in last
    assert not out.parent.exists()


def test_unreadable_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)
