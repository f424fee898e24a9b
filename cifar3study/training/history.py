"""The learning-curve file a train stage writes: one typed record per seed and epoch, as CSV.

The evaluation split's columns are named after it: `val_loss`/`val_acc` for
the validation split (the CIFAR-10 test batch), `holdout_loss`/`holdout_acc`
for a part held out of the training split (data.holdout).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

from cifar3study.errors import StageError, one_line
from cifar3study.files import write_text_atomic

SPLITS = ("val", "holdout")


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    seed: int
    epoch: int
    train_loss: float  # mean cross-entropy over the epoch's steps, weighted by batch size
    train_acc_running: float  # accuracy of the predictions made during the epoch, as the weights moved
    val_loss: float  # on the evaluation split, which `split` names (the CSV column is `<split>_loss`)
    val_acc: float  # likewise `<split>_acc`
    seconds: float  # wall time of the whole seed group's training steps in this epoch (not the validation pass)
    split: str = "val"  # "val" (the CIFAR-10 test batch) or "holdout" (held out of the training split)


def columns(split: str) -> list[str]:
    """The CSV header of a history evaluated on `split`."""
    return ["seed", "epoch", "train_loss", "train_acc_running", f"{split}_loss", f"{split}_acc", "seconds"]


FIELDS = columns("val")


def write_history(path: Path, rows: list[EpochRecord]) -> None:
    splits = {row.split for row in rows} or {"val"}
    if len(splits) != 1 or not splits <= set(SPLITS):
        raise ValueError(f"records of splits {sorted(splits)}; a history has one of {SPLITS}")
    split = splits.pop()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns(split))
    writer.writerows([r.seed, r.epoch, r.train_loss, r.train_acc_running, r.val_loss, r.val_acc, r.seconds]
                     for r in rows)
    write_text_atomic(path, out.getvalue())


def _record(row: list[str], split: str) -> EpochRecord:
    if len(row) != 7:
        raise ValueError(f"a row of {len(row)} fields, expected 7")
    return EpochRecord(int(row[0]), int(row[1]), *map(float, row[2:]), split)


def read_history(path: Path) -> list[EpochRecord]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            split = next((s for s in SPLITS if header == columns(s)), None)
            if split is None:
                raise ValueError(f"columns {one_line(header, 160)}, expected {FIELDS} or holdout_* for val_*")
            return [_record(row, split) for row in reader]
    except (OSError, ValueError, TypeError, csv.Error) as err:
        raise StageError(f"cannot read learning curves {path} ({one_line(err, 200)}); rerun its train stage") from err


def by_seed(rows: list[EpochRecord]) -> dict[int, list[EpochRecord]]:
    """The records of each seed, in file order."""
    out: dict[int, list[EpochRecord]] = {}
    for row in rows:
        out.setdefault(row.seed, []).append(row)
    return out
