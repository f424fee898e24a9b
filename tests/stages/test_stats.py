"""`python -m stages.stats`: the training split in, stats.json out, or one line and nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cifar3study.data.dataset import Split, write_split
from tests.helpers import last_line, run_stage


def test_writes_mean_and_std(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(20, 3, 32, 32), dtype=np.uint8)
    write_split(tmp_path / "train.npz", Split(images, np.arange(20, dtype=np.int64) % 2, ("a", "b"), "0" * 32))
    done = run_stage("stats", "--train", tmp_path / "train.npz", "--out", tmp_path / "stats.json")
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    x = images / 255.0
    np.testing.assert_allclose(stats["mean"], x.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(stats["std"], x.std(axis=(0, 2, 3), ddof=1), atol=1e-9)


def test_missing_split_is_one_line(tmp_path: Path) -> None:
    line = last_line(run_stage("stats", "--train", tmp_path / "nope.npz", "--out", tmp_path / "stats.json"))
    assert "error: " in line and "nope.npz" in line
    assert not (tmp_path / "stats.json").exists()
