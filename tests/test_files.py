"""Atomic writes: a target is the old file, the new one, or absent; never half-written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cifar3study.files import atomic_path, file_md5, write_json_atomic


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_new_file_gets_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "sub" / "x.json", [])
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "x.json").stat().st_mode & 0o777 == 0o644


def test_md5_of_a_file_larger_than_one_chunk(tmp_path: Path) -> None:
    blob = os.urandom(3 << 20)
    (tmp_path / "b").write_bytes(blob)
    assert file_md5(tmp_path / "b", chunk=1 << 20) == hashlib.md5(blob).hexdigest()
