"""What a train stage hands to later stages about its run: a typed record, one writer, one reader."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from cifar3study.errors import StageError, quote
from cifar3study.files import write_json_atomic


@dataclasses.dataclass(frozen=True)
class RunInfo:
    run_id: str  # the MLflow run the train stage logged to
    device: str  # what trained the model, e.g. "cpu (x86_64, 2 threads)"
    epochs: int
    seconds_per_epoch: float  # median over epochs: the first pays one-off warm-up costs
    images_per_second: float


RUN_ID = re.compile(r"[0-9a-f]{32}")
_TYPES = {"run_id": str, "device": str, "epochs": int, "seconds_per_epoch": float, "images_per_second": float}


def write_run_info(path: Path, info: RunInfo) -> None:
    write_json_atomic(path, dataclasses.asdict(info))


def read_run_info(path: Path) -> RunInfo:
    """The record, every field checked for presence and type before anyone uses it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StageError(f"cannot read {path} ({err}); rerun its train stage") from err
    if not isinstance(raw, dict):
        raise StageError(f"{path} is not a run-info record; rerun its train stage")
    missing = [key for key in _TYPES if key not in raw]
    if missing:
        raise StageError(f"{path} lacks {', '.join(missing)}; rerun its train stage")
    for key, kind in _TYPES.items():
        value = raw[key]
        ok = (isinstance(value, kind) and not isinstance(value, bool)) or (kind is float and type(value) is int)
        if not ok:
            raise StageError(f"{path}: {key} is {quote(value)}, not a {kind.__name__}; rerun its train stage")
    if not RUN_ID.fullmatch(raw["run_id"]):
        raise StageError(f"{path}: run_id {quote(raw['run_id'])} is not an MLflow run id; rerun its train stage")
    return RunInfo(**{key: kind(raw[key]) for key, kind in _TYPES.items()})
