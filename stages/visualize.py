"""Stage `visualize`: what one seed of the CNN learned in its convolutions, and what they do to real images."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.data.dataset import read_split
from cifar3study.errors import StageError
from cifar3study.files import atomic_path
from cifar3study.params import load_params, model_params
from cifar3study.reporting import conv_views, figures
from cifar3study.tracking import run_logging, store
from cifar3study.training.checkpoint import load_checkpoint
from cifar3study.training.run_info import read_run_info

log = logging.getLogger("visualize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--params", "--checkpoint", "--val", "--run-info", "--out-dir"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    name, seed = params.visualize.model, params.visualize.seed
    info = read_run_info(args.run_info)
    models, meta = load_checkpoint(args.checkpoint, model_params(params, name), name)
    if seed not in models or seed not in info.seed_runs:
        raise StageError(f"{args.checkpoint} holds seeds {list(models)}, not visualize.seed {seed}; "
                         f"rerun train@{name} or pick one of those")
    model = conv_views.require_convnet(models[seed], meta, str(args.checkpoint))
    split = read_split(args.val)
    experiment_id = store.connect(os.environ, Path.cwd(), params.mlflow.experiment)  # fails fast, before drawing
    store.check_group(store.GroupRuns(info.run_id, info.seed_runs), experiment_id, name)
    drawn = {args.out_dir / file_name: fig for file_name, fig in conv_views.figures(model, meta, split).items()}
    for path, fig in drawn.items():
        with atomic_path(path) as tmp:
            figures.save_png(fig, tmp)
    # The written PNGs, not log_figure: drawing each figure again for MLflow took 4 of visualize's 21 s.
    run_logging.log_files(info.seed_runs[seed], list(drawn), "visualize")
    log.info("wrote %d figures of %s seed %d to %s and logged them to its run", len(drawn), name, seed, args.out_dir)


if __name__ == "__main__":
    run_stage(main)
