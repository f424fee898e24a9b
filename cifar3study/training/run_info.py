"""What a train stage hands to later stages about its MLflow runs and speed: a typed record, one writer, one reader."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from cifar3study.errors import StageError, one_line, quote
from cifar3study.files import read_capped, write_json_atomic
from cifar3study.params import MAX_SEED

RUN_ID = re.compile(r"[0-9a-f]{32}")
SEED_KEY = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() passes '²', which int() refuses
MAX_RECORD_BYTES = 64 << 10  # a real record is under 4 KiB even with a hundred seeds; a bigger file is not read at all


@dataclasses.dataclass(frozen=True)
class RunInfo:
    run_id: str  # the model's parent run
    seed_runs: dict[int, str]  # each seed's nested run, in training order
    device: str  # what trained the models, e.g. "cpu (x86_64, 2 threads)"
    epochs: int
    group_seconds_per_epoch: float  # median wall time of one epoch of the whole seed group
    seconds_per_epoch: float  # the group's time divided by its size: what one epoch of one seed costs
    images_per_second: float  # training images per second, all seeds together


_SCALARS = {"run_id": str, "device": str, "epochs": int, "group_seconds_per_epoch": float, "seconds_per_epoch": float,
            "images_per_second": float}


def write_run_info(path: Path, info: RunInfo) -> None:
    record = dataclasses.asdict(info)
    record["seed_runs"] = {str(seed): run for seed, run in info.seed_runs.items()}
    write_json_atomic(path, record)


def _field(path: Path, raw: dict, key: str, kind: type) -> object:
    if key not in raw:
        raise StageError(f"{path} lacks {key}; rerun its train stage")
    value = raw[key]
    if not ((isinstance(value, kind) and not isinstance(value, bool)) or (kind is float and type(value) is int)):
        raise StageError(f"{path}: {key} is {quote(value)}, not a {kind.__name__}; rerun its train stage")
    return kind(value)


def _run_id(path: Path, value: object, what: str) -> str:
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise StageError(f"{path}: {what} {quote(value)} is not an MLflow run id; rerun its train stage")
    return value


def _seed(path: Path, key: str) -> int:
    if not (SEED_KEY.fullmatch(key) and int(key) <= MAX_SEED):
        raise StageError(f"{path}: seed_runs key {quote(key)} is not a seed (0 to {MAX_SEED}); rerun its train stage")
    return int(key)


def read_run_info(path: Path) -> RunInfo:
    """The record, every field checked for presence and type before anyone uses it."""
    try:
        data = read_capped(path, MAX_RECORD_BYTES)
    except ValueError as err:
        raise StageError(f"{path} is {err}, not a run-info record; rerun its train stage") from err
    except OSError as err:
        raise StageError(f"cannot read {path} ({one_line(err, 160)}); rerun its train stage") from err
    try:
        raw = json.loads(data.decode("utf-8"))
    except ValueError as err:
        raise StageError(f"cannot read {path} ({one_line(err, 160)}); rerun its train stage") from err
    if not isinstance(raw, dict):
        raise StageError(f"{path} is not a run-info record; rerun its train stage")
    scalars = {key: _field(path, raw, key, kind) for key, kind in _SCALARS.items()}
    _run_id(path, scalars["run_id"], "run_id")
    seeds = _field(path, raw, "seed_runs", dict)
    if not seeds:
        raise StageError(f"{path}: seed_runs must map seeds to run ids; rerun its train stage")
    seed_runs = {_seed(path, seed): _run_id(path, run, f"seed_runs[{seed}]") for seed, run in seeds.items()}
    return RunInfo(seed_runs=seed_runs, **scalars)
