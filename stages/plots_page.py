"""Stage `plots_page`: the offline HTML page `dvc plots show` renders into (see .dvc/config)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.files import write_text_atomic
from cifar3study.reporting.vega_page import offline_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write_text_atomic(args.out, offline_page())


if __name__ == "__main__":
    run_stage(main)
