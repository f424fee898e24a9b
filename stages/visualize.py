"""Stage `visualize`: what the CNN's convolutions learned, and what they do to real images."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from cifar3study import conv_views, figures, run_logging, tracking
from cifar3study.checkpoint import load_checkpoint
from cifar3study.cli import run_stage
from cifar3study.dataset import read_split
from cifar3study.files import atomic_path
from cifar3study.params import load_params
from cifar3study.run_info import read_run_info

log = logging.getLogger("visualize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--params", "--checkpoint", "--val", "--run-info", "--out-dir"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    info = read_run_info(args.run_info)
    model, meta = load_checkpoint(args.checkpoint)
    model = conv_views.require_convnet(model, meta, str(args.checkpoint))
    split = read_split(args.val)
    experiment_id = tracking.connect(os.environ, Path.cwd(), params.mlflow.experiment)  # fails fast, before drawing
    tracking.model_run(info.run_id, experiment_id, params.visualize.model)
    drawn = conv_views.figures(model, meta, split)
    for name, fig in drawn.items():
        with atomic_path(args.out_dir / name) as tmp:
            figures.save_png(fig, tmp)
    run_logging.log_figures(info.run_id, drawn, "visualize")
    log.info("wrote %d figures to %s and logged them to run %s", len(drawn), args.out_dir, info.run_id)


if __name__ == "__main__":
    run_stage(main)
