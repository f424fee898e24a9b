"""Stage `download`: fetch the CIFAR-10 archive and verify its MD5."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.data.download import Limits, download
from cifar3study.params import archive_source, load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the archive goes")
    args = parser.parse_args()
    data = load_params(args.params).data
    url, md5 = archive_source(data, os.environ)
    download(url, args.out, md5, Limits(data.timeout, data.retries, data.deadline))


if __name__ == "__main__":
    run_stage(main)
