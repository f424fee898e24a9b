"""What runs hold: the same param keys for every model, names that tell setups apart."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import yaml

from cifar3study.params import ModelParams, parse_params
from cifar3study.tracking.run_logging import (
    curve_names,
    data_keys,
    flatten,
    params_digest,
    run_name,
    shared_model_keys,
)
from tests.helpers import CIFAR3_CLASSES, ROOT

PARAMS = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))


def test_fc_and_cnn_share_every_param_key() -> None:
    fc, cnn = shared_model_keys("fc", PARAMS.models["fc"]), shared_model_keys("cnn", PARAMS.models["cnn"])
    assert fc.keys() == cnn.keys()
    assert fc["model.channels"] == "none" and cnn["model.channels"] == "[16, 8]"
    assert fc["model.name"] == "fc" and fc["model.hidden"] == "[1024, 512, 128]"


def test_flatten_names_keys_as_params_yaml_does() -> None:
    cfg = ModelParams(arch="fc", activation="tanh", hidden=(8, 4))
    assert flatten("m", cfg)["m.hidden"] == "[8, 4]" and flatten("m", cfg)["m.pool"] == "none"
    assert flatten("", list(CIFAR3_CLASSES)) == {"": "[airplane, automobile, ship]"}


def test_run_names_tell_experiments_and_setups_apart() -> None:
    digest = params_digest("cnn", PARAMS)
    faster = dataclasses.replace(PARAMS, train=dataclasses.replace(PARAMS.train, lr=0.02))
    assert len(digest) == 7 and params_digest("cnn", faster) != digest
    assert params_digest("fc", PARAMS) != digest
    assert run_name("cnn", {"DVC_EXP_NAME": "bally-hunk"}, digest) == "cnn-bally-hunk"
    assert run_name("cnn", {}, digest) == f"cnn-{digest}"


def test_without_a_holdout_names_and_keys_are_what_they_always_were() -> None:
    """The digest of a run without a holdout is the one computed before data.holdout existed: run names stay."""
    read = {"model": dataclasses.asdict(PARAMS.models["cnn"]), "train": dataclasses.asdict(PARAMS.train),
            "classes": PARAMS.data.classes}
    assert params_digest("cnn", PARAMS) == hashlib.sha1(json.dumps(read, sort_keys=True).encode()).hexdigest()[:7]
    assert data_keys(PARAMS) == {"data.classes": "[airplane, automobile, ship]"}
    assert curve_names("val") == {"train_loss": "train_loss", "train_acc_running": "train_acc_running",
                                  "val_loss": "val_loss", "val_acc": "val_acc"}


def test_a_holdout_names_its_curves_and_changes_the_run_name() -> None:
    held = dataclasses.replace(PARAMS, data=dataclasses.replace(PARAMS.data, holdout=0.2, holdout_seed=1))
    assert params_digest("cnn", held) != params_digest("cnn", PARAMS)
    other_seed = dataclasses.replace(held, data=dataclasses.replace(held.data, holdout_seed=2))
    assert params_digest("cnn", other_seed) != params_digest("cnn", held)
    assert data_keys(held) == {"data.classes": "[airplane, automobile, ship]", "data.holdout": "0.2",
                               "data.holdout_seed": "1"}
    assert list(curve_names("holdout").values()) == ["train_loss", "train_acc_running", "holdout_loss", "holdout_acc"]
