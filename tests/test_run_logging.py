"""What runs hold: the same param keys for every model, names that tell setups apart."""

from __future__ import annotations

import dataclasses

import yaml

from cifar3study.params import ModelParams, parse_params
from cifar3study.tracking.run_logging import flatten, params_digest, run_name, shared_model_keys
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
