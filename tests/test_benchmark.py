"""The speed benchmark runs every variant in its own process and reports each; it times nothing itself here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, tiny_params


def test_every_variant_of_every_model_is_reported(cifar3_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cifar3study.bench.speed", "--train", str(cifar3_dir / "train.npz"),
           "--stats", str(cifar3_dir / "stats.json"), "--params", str(tiny_params(tmp_path)), "--groups", "1", "2",
           "--vmap-groups", "2", "--epochs", "1", "--warmup", "0", "--json", str(tmp_path / "bench.json")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        (m, v) for m in ("fc", "cnn") for v in ("original loop", "1 seed", "2 seeds", "2 seeds, vmap")]
    for row in rows:
        assert row["per_seed_s"] == row["group_s"] / row["seeds"] and row["peak_rss_mib"] > 0
    assert "speed-up vs original" in done.stderr
