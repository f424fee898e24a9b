"""The learning-curve file a train stage writes: one typed record per seed and epoch, as CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

from cifar3study.errors import StageError
from cifar3study.files import write_text_atomic


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    seed: int
    epoch: int
    train_loss: float  # mean cross-entropy over the epoch's steps, weighted by batch size
    train_acc_running: float  # accuracy of the predictions made during the epoch, as the weights moved
    val_loss: float
    val_acc: float
    seconds: float  # wall time of the whole seed group's training steps in this epoch (not the validation pass)


FIELDS = [f.name for f in dataclasses.fields(EpochRecord)]


def write_history(path: Path, rows: list[EpochRecord]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(dataclasses.asdict(row) for row in rows)
    write_text_atomic(path, out.getvalue())


def read_history(path: Path) -> list[EpochRecord]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != FIELDS:
                raise ValueError(f"columns {reader.fieldnames}, expected {FIELDS}")
            return [EpochRecord(int(r["seed"]), int(r["epoch"]), *(float(r[k]) for k in FIELDS[2:])) for r in reader]
    except (OSError, ValueError, TypeError) as err:
        raise StageError(f"cannot read learning curves {path} ({err}); rerun its train stage") from err


def by_seed(rows: list[EpochRecord]) -> dict[int, list[EpochRecord]]:
    """The records of each seed, in file order."""
    out: dict[int, list[EpochRecord]] = {}
    for row in rows:
        out.setdefault(row.seed, []).append(row)
    return out
