"""Stage `stats`: per-channel mean and sample std of the training images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from stages.cifar3 import write_split
from stages.stats import channel_stats

ROOT = Path(__file__).resolve().parents[1]


def reference(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3), ddof=1)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_channel_stats_match_numpy() -> None:
    images = random_images(50)
    images[:, 1] //= 2  # channels must differ, so a channel mix-up shows
    images[:, 2] = images[:, 2] // 4 + 128
    stats = channel_stats(images)
    mean, std = reference(images)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-6)
    assert all(isinstance(v, float) for v in stats["mean"] + stats["std"])


def test_channel_stats_of_constant_images() -> None:
    stats = channel_stats(np.full((4, 3, 8, 8), 51, dtype=np.uint8))
    np.testing.assert_allclose(stats["mean"], [0.2] * 3, atol=1e-12)
    np.testing.assert_allclose(stats["std"], [0.0] * 3, atol=1e-12)


def test_cli_writes_mean_and_std(tmp_path: Path) -> None:
    images = random_images(20, seed=1)
    write_split(tmp_path / "train.npz", images, np.zeros(20, np.int64), ("a", "b"), "0" * 32)
    cmd = [sys.executable, "-m", "stages.stats", "--train", str(tmp_path / "train.npz"), "--out", str(tmp_path / "stats.json")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert set(stats) == {"mean", "std"} and len(stats["mean"]) == 3 and len(stats["std"]) == 3
    mean, std = reference(images)
    np.testing.assert_allclose(stats["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(stats["std"], std, atol=1e-6)


def test_cli_missing_split_is_one_line_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "stages.stats", "--train", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "stats.json")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: " in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "stats.json").exists()
