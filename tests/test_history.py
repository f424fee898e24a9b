"""The learning-curve CSV: typed records round-trip; a foreign file fails in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar3study.errors import StageError
from cifar3study.training.history import EpochRecord, by_seed, read_history, write_history


def test_round_trip_and_split_by_seed(tmp_path: Path) -> None:
    rows = [EpochRecord(0, 1, 1.0986, 0.34, 1.05, 0.41, 2.5), EpochRecord(0, 2, 0.9, 0.5, 0.95, 0.52, 2.25),
            EpochRecord(5, 1, 1.1, 0.33, 1.06, 0.40, 2.5)]
    write_history(tmp_path / "h.csv", rows)
    header = (tmp_path / "h.csv").read_text().splitlines()[0]
    assert header == "seed,epoch,train_loss,train_acc_running,val_loss,val_acc,seconds"
    assert read_history(tmp_path / "h.csv") == rows
    assert by_seed(rows) == {0: rows[:2], 5: rows[2:]}


@pytest.mark.parametrize("text", ["epoch,loss\n1,2\n",
                                  "seed,epoch,train_loss,train_acc_running,val_loss,val_acc,seconds\n0,1,x,0,0,0,0\n"])
def test_foreign_file_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "h.csv").write_text(text)
    with pytest.raises(StageError, match="rerun its train stage"):
        read_history(tmp_path / "h.csv")


def test_a_holdout_history_names_its_columns_after_the_split(tmp_path: Path) -> None:
    rows = [EpochRecord(0, 1, 1.0986, 0.34, 1.05, 0.41, 2.5, "holdout"), EpochRecord(3, 1, 0.9, 0.5, 0.95, 0.52, 2.5, "holdout")]
    write_history(tmp_path / "h.csv", rows)
    header = (tmp_path / "h.csv").read_text().splitlines()[0]
    assert header == "seed,epoch,train_loss,train_acc_running,holdout_loss,holdout_acc,seconds"
    back = read_history(tmp_path / "h.csv")
    assert back == rows and {r.split for r in back} == {"holdout"}


def test_one_history_holds_one_split(tmp_path: Path) -> None:
    rows = [EpochRecord(0, 1, 1.0, 0.3, 1.0, 0.4, 2.5), EpochRecord(1, 1, 1.0, 0.3, 1.0, 0.4, 2.5, "holdout")]
    with pytest.raises(ValueError, match="a history has one of"):
        write_history(tmp_path / "h.csv", rows)
    assert not (tmp_path / "h.csv").exists()
