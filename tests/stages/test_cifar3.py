"""`python -m stages.cifar3`: the MD5 is checked before the archive is opened; splits come out whole."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import yaml

from tests.helpers import ROOT, archive_files, last_line, run_stage, write_archive
from tests.test_safe_pickle import evil_pickles


def cifar3(tmp_path: Path, archive_path: Path, md5: str, classes: list[str]) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["classes"] = classes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return run_stage("cifar3", "--params", tmp_path / "params.yaml", "--archive", archive_path,
                     "--out-dir", tmp_path / "cifar3", env={"CIFAR10_MD5": md5})


def test_writes_train_and_val(archive, tmp_path: Path) -> None:
    done = cifar3(tmp_path, *archive, ["automobile", "airplane", "ship"])
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "cifar3" / "train.npz", allow_pickle=False) as z:
        assert z["images"].shape == (60, 3, 32, 32) and np.bincount(z["labels"]).tolist() == [20, 20, 20]
        assert z["classes"].tolist() == ["automobile", "airplane", "ship"]
    with np.load(tmp_path / "cifar3" / "val.npz", allow_pickle=False) as z:
        assert z["images"].shape == (12, 3, 32, 32) and str(z["source_md5"]) == archive[1]
    assert sorted(p.name for p in (tmp_path / "cifar3").iterdir()) == ["train.npz", "val.npz"]


def test_md5_mismatch_stops_before_anything_is_read(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "archive.tar.gz"
    write_archive(path, {**archive_files(), "data_batch_1": evil_pickles(marker)[0], "batches.meta": b"not a pickle"})
    done = cifar3(tmp_path, path, "0" * 32, ["airplane", "ship"])
    line = last_line(done)
    assert "error: " in line and "expected " + "0" * 32 in line
    assert "not a valid CIFAR batch" not in done.stderr  # stopped before reading any batch
    assert not marker.exists() and not (tmp_path / "cifar3").exists()


def test_garbage_with_the_right_md5_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(b"garbage")
    import hashlib

    line = last_line(cifar3(tmp_path, path, hashlib.md5(b"garbage").hexdigest(), ["airplane", "ship"]))
    assert "is not a readable .tar.gz" in line
    assert not (tmp_path / "cifar3").exists()


def test_compression_bomb_costs_neither_memory_nor_time(tmp_path: Path) -> None:
    """1 GiB of zeros in a ~1 MB archive with the right MD5: refused from its header, in bounded memory."""
    import hashlib
    import subprocess
    import sys

    from tests.test_archive import bomb

    path = tmp_path / "bomb.tar.gz"
    bomb(path, 1 << 30)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    probe = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(done.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "stages.cifar3", "--params",
                           str(tmp_path / "params.yaml"), "--archive", str(path), "--out-dir", str(tmp_path / "cifar3")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                                       "CIFAR10_MD5": md5})
    status, peak_kib = map(int, done.stdout.split("\n")[0].split())
    assert status == 1 and "more than a CIFAR batch" in done.stdout
    assert peak_kib < 300 * 1024  # the gigabyte was never inflated
    assert not (tmp_path / "cifar3").exists()
