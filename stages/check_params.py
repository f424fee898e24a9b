"""Stage `check_params`: params.yaml validated whole, and every model group's memory checked against the device.

DVC pastes `models` keys and `visualize.model` into the commands and output paths of train@, evaluate@ and
visualize (and removes a stage's outputs before running it), before any code of ours runs. Each of those stages
depends on this stage's output, so DVC runs this first and a bad params.yaml stops the pipeline here.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.files import write_text_atomic
from cifar3study.params import load_params
from cifar3study.training.budget import check_budget, estimate
from cifar3study.training.device import resolve_device

log = logging.getLogger("check_params")
# The same bytes for every valid params.yaml: DVC hashes this output, so a valid edit reruns no other stage.
VALID = "params.yaml is valid\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="written, always with the same text, when valid")
    args = parser.parse_args()
    params = load_params(args.params)
    device = resolve_device(params.train.device)
    for model in params.models:
        check_budget(params, model, device)
        log.info("%s: about %.2f GiB on %s", model, estimate(params, model).total / 2**30, device.type)
    write_text_atomic(args.out, VALID)


if __name__ == "__main__":
    run_stage(main)
