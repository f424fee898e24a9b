"""Stage `stats`: per-channel mean and std of the CIFAR-3 training images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from stages.common import run_stage, write_json_atomic
from stages.datasets import load_split

log = logging.getLogger(__name__)


def channel_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Mean and sample std per channel of uint8 N x C x H x W images scaled to [0, 1].

    Sums run in float64 one channel at a time, so 15,000 images need no
    float copy of the whole split.
    """
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean, std = [], []
    for c in range(images.shape[1]):
        x = images[:, c].astype(np.float64) / 255.0
        m = x.sum() / n
        mean.append(float(m))
        std.append(float(np.sqrt(((x - m) ** 2).sum() / (n - 1))))
    return {"mean": mean, "std": std}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="train.npz from the cifar3 stage")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stats = channel_stats(load_split(args.train).images)
    write_json_atomic(args.out, stats)
    log.info("mean %s std %s", [round(v, 4) for v in stats["mean"]], [round(v, 4) for v in stats["std"]])


if __name__ == "__main__":
    run_stage(main)
