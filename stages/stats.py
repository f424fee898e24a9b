"""Stage `stats`: per-channel mean and std of the CIFAR-3 training images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.data.dataset import channel_stats, read_split, write_stats

log = logging.getLogger("stats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=Path, required=True, help="train.npz from the cifar3 stage")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stats = channel_stats(read_split(args.train).images)
    write_stats(args.out, stats)
    log.info("mean %s std %s", [round(v, 4) for v in stats.mean], [round(v, 4) for v in stats.std])


if __name__ == "__main__":
    run_stage(main)
