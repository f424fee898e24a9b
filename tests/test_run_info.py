"""The run-info record: every field is checked before a later stage uses it."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from cifar3study.errors import StageError
from cifar3study.training.run_info import RunInfo, read_run_info, write_run_info

INFO = RunInfo("a" * 32, {0: "b" * 32, 7: "c" * 32}, "cpu (x86_64, 2 threads)", 100, 3.0, 1.5, 10_000.0)


def test_round_trip(tmp_path: Path) -> None:
    write_run_info(tmp_path / "r.json", INFO)
    assert read_run_info(tmp_path / "r.json") == INFO


@pytest.mark.parametrize(("change", "needle"), [
    ({"run_id": None}, "run_id is None, not a str"),
    ({"epochs": "100"}, "epochs is '100', not a int"),
    ({"epochs": True}, "epochs is True, not a int"),
    ({"seconds_per_epoch": "fast"}, "seconds_per_epoch is 'fast', not a float"),
    ({"run_id": "../../etc"}, "run_id '../../etc' is not an MLflow run id"),
    ({"seed_runs": {"0": "x"}}, r"seed_runs\[0\] 'x' is not an MLflow run id"),
    ({"seed_runs": {"zero": "b" * 32}}, "seed_runs key 'zero' is not a seed"),
    ({"seed_runs": {}}, "seed_runs must map seeds to run ids"),
    # These died as `unexpected ValueError` in int() (issue 25): '²' passes str.isdigit(), 5,000 digits int()'s limit.
    ({"seed_runs": {"²": "b" * 32}}, r"seed_runs key '²' is not a seed \(0 to 4294967295\)"),
    ({"seed_runs": {"9" * 5000: "b" * 32}}, r"seed_runs key '9{76}\.\.\. is not a seed"),
    ({"seed_runs": {"4294967296": "b" * 32}}, "seed_runs key '4294967296' is not a seed"),
])
def test_malformed_field_is_named(tmp_path: Path, change: dict, needle: str) -> None:
    write_run_info(tmp_path / "r.json", INFO)
    (tmp_path / "r.json").write_text(json.dumps({**json.loads((tmp_path / "r.json").read_text()), **change}))
    with pytest.raises(StageError, match=needle):
        read_run_info(tmp_path / "r.json")


@pytest.mark.parametrize(("text", "needle"), [("{}", "lacks run_id"), ("[1]", "not a run-info record"),
                                              ("{", "cannot read")])
def test_missing_or_unreadable(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(StageError, match=needle):
        read_run_info(tmp_path / "r.json")


def test_an_oversized_record_is_refused_unread(tmp_path: Path) -> None:
    """A 4 MB run_id (a 30 MB one cost 700 MB): refused from the file's size, in bounded memory."""
    write_run_info(tmp_path / "r.json", INFO)
    record = {**json.loads((tmp_path / "r.json").read_text()), "run_id": "a" * (4 << 20)}
    (tmp_path / "r.json").write_text(json.dumps(record))
    tracemalloc.start()
    try:
        with pytest.raises(StageError, match=r"r.json is more than 65,536 bytes, not a run-info record") as refused:
            read_run_info(tmp_path / "r.json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and len(str(refused.value)) < 400


def test_a_long_field_is_quoted_bounded(tmp_path: Path) -> None:
    write_run_info(tmp_path / "r.json", INFO)
    record = {**json.loads((tmp_path / "r.json").read_text()), "run_id": [[1] * 40] * 300}
    (tmp_path / "r.json").write_text(json.dumps(record))
    with pytest.raises(StageError, match=r"run_id is \[\[1, 1, 1, 1, \.\.\.\], .*not a str") as refused:
        read_run_info(tmp_path / "r.json")
    assert len(str(refused.value)) < 400
