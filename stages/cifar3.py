"""Stage `cifar3`: the chosen CIFAR-10 classes, relabelled 0..k-1, as a train and a validation split."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from cifar3study.cli import run_stage
from cifar3study.data import archive
from cifar3study.data.dataset import write_split
from cifar3study.params import archive_source, load_params

log = logging.getLogger("cifar3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    data = load_params(args.params).data
    _, md5 = archive_source(data, os.environ)
    archive.verify(args.archive, md5)  # before anything in it is read
    splits = archive.build_splits(archive.read_batches(args.archive), data.classes, md5)
    for name, split in splits.items():
        write_split(args.out_dir / f"{name}.npz", split)
        log.info("%s: %d images, per class %s", name, len(split.labels), np.bincount(split.labels).tolist())


if __name__ == "__main__":
    run_stage(main)
