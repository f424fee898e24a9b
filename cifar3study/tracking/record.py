"""What a model's MLflow runs record so that the run can be rebuilt and judged: written by train, read by reproduce.

The parent run already holds the commit, the archive's MD5, `params.yaml`
and every `train.*` param. This module adds what a rerun needs to prove
itself: a digest of the train stage's code (the `.py` deps dvc.yaml lists for
it, each file's MD5 as DVC computes it, plus the table in `code_files.json`
so a refusal can name the file), the DVC experiment's baseline commit, and
each seed's final weights digest. The environment that changes numerics
comes from `device.describe`'s tags. A run is judged on the split it was
evaluated on: `val_acc` for the validation split, `holdout_acc` for a run
trained with data.holdout > 0 (a param its runs carry only then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from cifar3study.errors import StageError, quote
from cifar3study.files import file_md5
from cifar3study.tracking.store import GroupRuns

CODE_FILES = "code_files.json"  # artifact of the parent run: {path: md5} of the train stage's code
TAG_CODE = "code.digest"
TAG_BASELINE = "dvc.exp_baseline"
TAG_WEIGHTS = "weights.sha256"
UNKNOWN = "unknown"


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state dict in key order: names, dtypes, shapes and the bytes (contiguous, on the CPU)."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}\n".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def code_table(root: Path, stage: str = "train") -> dict[str, str]:
    """{path: md5} of the `.py` deps dvc.yaml at `root` lists for `stage`; empty without a dvc.yaml."""
    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    entry = stages.get(stage) or {}
    deps = entry.get("do", entry).get("deps", [])
    return {dep: file_md5(root / dep) if (root / dep).is_file() else "missing"
            for dep in sorted(d for d in deps if isinstance(d, str) and d.endswith(".py"))}


def code_digest(table: Mapping[str, str]) -> str:
    """One digest of a code table (sha256 of its sorted `md5  path` lines); `unknown` for an empty one."""
    if not table:
        return UNKNOWN
    return hashlib.sha256("".join(f"{md5}  {path}\n" for path, md5 in sorted(table.items())).encode()).hexdigest()


def log_record(runs: GroupRuns, models: Mapping[int, nn.Module], root: Path, env: Mapping[str, str]) -> None:
    """Train's part of the record: code digest and table, experiment baseline on the parent; weights per seed."""
    client = MlflowClient()
    table = code_table(root)
    tags = {TAG_CODE: code_digest(table)}
    if env.get("DVC_EXP_BASELINE_REV"):
        tags[TAG_BASELINE] = env["DVC_EXP_BASELINE_REV"]
    for key, value in tags.items():
        client.set_tag(runs.parent, key, value)
    client.log_dict(runs.parent, table, CODE_FILES)
    for seed, model in models.items():
        client.set_tag(runs.seeds[seed], TAG_WEIGHTS, weights_digest(model))


@dataclasses.dataclass(frozen=True)
class Environment:
    """What a run's numbers depend on besides code, data and params: equal on both sides, a rerun is bitwise."""

    device_type: str
    device: str
    cpu_capability: str
    torch: str
    numpy: str
    onednn: str
    cuda: str
    cudnn: str
    threads: str
    deterministic: str
    channels_last: str
    tf32: str

    @staticmethod
    def from_run(tags: Mapping[str, str], params: Mapping[str, str]) -> Environment:
        return Environment(
            tags.get("device.type", UNKNOWN), tags.get("device", UNKNOWN), tags.get("cpu.capability", UNKNOWN),
            tags.get("torch.version", UNKNOWN), tags.get("numpy.version", UNKNOWN), tags.get("onednn.version", UNKNOWN),
            tags.get("cuda.version", "none"), tags.get("cudnn.version", "none"), tags.get("torch.threads", UNKNOWN),
            params.get("train.deterministic", UNKNOWN), params.get("train.channels_last", UNKNOWN),
            params.get("train.tf32", UNKNOWN))


@dataclasses.dataclass(frozen=True)
class SeedRecord:
    run_id: str
    weights: str  # sha256 of the final weights (`unknown` for runs older than this record)
    train_acc: float | None  # None until the evaluate stage ran
    eval_acc: float | None  # on the run's evaluation split: its val_acc, or holdout_acc (RunRecord.split)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # every metric's latest value


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One model's parent run and its seed runs, as a rerun needs them."""

    run_id: str
    name: str
    experiment_id: str
    model: str
    commit: str
    dirty: str
    exp_name: str | None
    exp_baseline: str | None
    archive_md5: str
    code_digest: str
    code_files: dict[str, str]
    seeds: dict[int, SeedRecord]
    env: Environment
    ci95: dict[str, tuple[float, float] | None]  # recorded 95% interval of each of `accuracies`' means, by name
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the parent's metrics, latest values
    split: str = "val"  # the evaluation split: "val", or "holdout" for a run trained with data.holdout > 0

    @property
    def accuracies(self) -> tuple[str, str]:
        """The names of what SeedRecord.train_acc and .eval_acc hold: train_acc and val_acc or holdout_acc."""
        return "train_acc", f"{self.split}_acc"

    @property
    def evaluated(self) -> bool:
        return all(s.eval_acc is not None and s.train_acc is not None for s in self.seeds.values())


def evaluation_split(params: Mapping[str, str], run_id: str) -> str:
    """"holdout" for a run whose params hold data.holdout > 0 (logged only then), else "val"."""
    value = params.get("data.holdout", "0")
    try:
        return "holdout" if float(value) > 0 else "val"
    except ValueError as err:
        raise StageError(f"MLflow run {quote(run_id)} records data.holdout {quote(value)}, not a number; "
                         "give a run its train stage logged") from err


def _seed_runs(client: MlflowClient, experiment_id: str, parent: str, split: str) -> dict[int, SeedRecord]:
    found = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and tags.kind = 'seed'")
    return {int(r.data.tags["seed"]): SeedRecord(r.info.run_id, r.data.tags.get(TAG_WEIGHTS, UNKNOWN),
                                                 r.data.metrics.get("train_acc"), r.data.metrics.get(f"{split}_acc"),
                                                 dict(r.data.metrics))
            for r in found}


def _ci(metrics: Mapping[str, float], key: str) -> tuple[float, float] | None:
    low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    return (low, high) if low is not None and high is not None else None


def _code_files(client: MlflowClient, run_id: str, scratch: Path) -> dict[str, str]:
    try:
        return json.loads(Path(client.download_artifacts(run_id, CODE_FILES, str(scratch))).read_text())
    except (MlflowException, OSError, ValueError):
        return {}


def read_record(client: MlflowClient, run_id: str, scratch: Path) -> RunRecord:
    """The record of parent run `run_id` (artifacts land in `scratch`); refused unless it is a model's parent run."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise StageError(f"MLflow run {quote(run_id)} is not in {mlflow.get_tracking_uri()}; "
                         "set MLFLOW_TRACKING_URI to the store it was logged to") from err
    tags, params = run.data.tags, run.data.params
    if tags.get("kind") != "model":
        raise StageError(f"MLflow run {quote(run_id)} is a {quote(tags.get('kind'))} run, not a model's parent run; "
                         "give the parent run (tag kind=model)")
    exp_name, split = tags.get("dvc.exp_name"), evaluation_split(params, run_id)
    return RunRecord(
        run_id, run.info.run_name or "", run.info.experiment_id, tags.get("model", UNKNOWN),
        tags.get("mlflow.source.git.commit", UNKNOWN), tags.get("git.dirty", UNKNOWN), exp_name,
        tags.get(TAG_BASELINE), tags.get("data.archive_md5", UNKNOWN), tags.get(TAG_CODE, UNKNOWN),
        _code_files(client, run_id, scratch), _seed_runs(client, run.info.experiment_id, run_id, split),
        Environment.from_run(tags, params), {k: _ci(run.data.metrics, k) for k in ("train_acc", f"{split}_acc")},
        dict(run.data.metrics), split)


def download_params(client: MlflowClient, run_id: str, scratch: Path) -> Path:
    """The run's own `params.yaml` (its artifact), downloaded into `scratch`."""
    try:
        return Path(client.download_artifacts(run_id, "params.yaml", str(scratch)))
    except (MlflowException, OSError) as err:
        raise StageError(f"MLflow run {quote(run_id)} has no params.yaml artifact ({type(err).__name__}); "
                         "check that its artifact store is reachable") from err
