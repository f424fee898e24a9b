"""`python -m stages.cifar3`: the MD5 is checked before the archive is opened; splits come out whole."""

from __future__ import annotations

import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import ROOT, archive_files, last_line, run_stage, write_archive
from tests.test_archive import bomb, giant_extension
from tests.test_safe_pickle import Reduces, evil_pickles, memo_shared


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


# Runs the stage (argv[1:]) under a 4 GiB address-space cap, so that a regression fails here rather than taking the
# machine; prints its exit status and its peak resident KiB (the wrapper's only child), then its stderr.
PROBE = """import resource, subprocess, sys
cap = 4 << 30
done = subprocess.run(sys.argv[1:], capture_output=True, text=True,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(done.stderr, end="")
"""


def cifar3_measured(tmp_path: Path, archive_path: Path, md5: str) -> tuple[int, int, str]:
    """(exit status, peak resident KiB, stderr) of the stage run in a fresh wrapper process.

    The wrapper's own rusage counts the stage alone, whatever else ran in this pytest worker.
    """
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    args = [sys.executable, "-m", "stages.cifar3", "--params", tmp_path / "params.yaml", "--archive", archive_path,
            "--out-dir", tmp_path / "cifar3"]
    env = {"PATH": "/usr/bin:/bin", "CIFAR10_MD5": md5, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    first, _, stderr = done.stdout.partition("\n")
    status, peak_kib = map(int, first.split())
    return status, peak_kib, stderr


def assert_refused_in_one_short_line(tmp_path: Path, measured: tuple[int, int, str], needle: str) -> None:
    status, peak_kib, stderr = measured
    assert status == 1, stderr[-2000:]
    assert len(stderr) < 1000 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
    assert "error: " in stderr and needle in stderr
    assert peak_kib < 1 << 20  # under 1 GiB
    assert not (tmp_path / "cifar3").exists()


def test_compression_bomb_costs_neither_memory_nor_time(tmp_path: Path) -> None:
    """1 GiB of zeros in a ~1 MB archive with the right MD5: refused from its header, in bounded memory."""
    path = tmp_path / "bomb.tar.gz"
    md5 = bomb(path, 1 << 30)
    status, peak_kib, stderr = cifar3_measured(tmp_path, path, md5)
    assert status == 1 and "more than a CIFAR batch" in stderr
    assert peak_kib < 300 * 1024  # the gigabyte was never inflated
    assert not (tmp_path / "cifar3").exists()


@pytest.mark.parametrize(("kind", "what"), [(tarfile.XHDTYPE, "PAX extended"), (tarfile.GNUTYPE_LONGNAME, "GNU long-name")])
def test_a_giant_tar_header_costs_neither_memory_nor_time(tmp_path: Path, kind: bytes, what: str) -> None:
    """A 2.4 MB archive whose PAX or GNU long-name header is 1.5 GiB of zeros (tarfile read it whole, and passed PAX)."""
    path = tmp_path / "archive.tar.gz"
    md5 = giant_extension(path, kind, 3 << 29)
    assert path.stat().st_size < 3 << 20
    measured = cifar3_measured(tmp_path, path, md5)
    assert_refused_in_one_short_line(tmp_path, measured, f"a {what} header of 1,610,612,736 bytes, more than 65,536")


def test_a_memo_shared_argument_is_refused_in_one_short_line(tmp_path: Path) -> None:
    """A dtype argument whose repr is 800 MB, from a few hundred bytes of pickle (it cost 7.8 GB and 600 MB of stderr)."""
    hostile = pickle.dumps({"data": Reduces(np.dtype, (memo_shared(width=10, depth=8),)), "labels": [0]}, protocol=2)
    assert len(hostile) < 1000
    path = tmp_path / "archive.tar.gz"
    md5 = write_archive(path, {**archive_files(), "data_batch_1": hostile})
    measured = cifar3_measured(tmp_path, path, md5)
    assert_refused_in_one_short_line(tmp_path, measured, "data_batch_1 is not a valid CIFAR batch (refused dtype [[[")
