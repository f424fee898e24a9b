"""MLflow: which store and experiment, how runs start and end, and which runs a stage may write to.

The default store is SQLite at the repository root. DVC runs queued and
temp-dir experiments in `.dvc/tmp/exps/...` and sets DVC_ROOT to the real
repository, so the root comes from DVC_ROOT first: a relative path would put
the runs in a directory DVC deletes afterwards. Many stages may start at
once (parallel queue workers), so the store's first use is serialised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from cifar3study.errors import Pruned, StageError, quote

EXPERIMENT_NOTE = (
    "CIFAR-3, fully connected net vs small CNN. Each pipeline run adds a parent run per model (tag `model`, "
    "named `<model>-<experiment or params digest>`) with a nested run per seed, and one `comparison` run. "
    "Tick two parent runs and press Compare: param_count, train_acc, val_acc (with its spread over seeds), gap "
    "and seconds_per_epoch sit side by side, with the mean train_loss / val_acc curves per epoch."
)
FIRST_USE_SECONDS = 300  # how long a process waits for another one creating the store or experiment
# A tracking server that went away fails a stage in seconds, not after MLflow's ~4 minutes of retries.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
VIEW_KEY = "comparison"  # the saved runs-table view: open the runs page with viewStateShareKey=comparison
VIEW_COLUMNS = ["tags.`model`", "metrics.`param_count`", "metrics.`train_acc`", "metrics.`val_acc`", "metrics.`gap`",
                "metrics.`seconds_per_epoch`", "params.`train.lr`", "params.`train.epochs`", "tags.`dvc.exp_name`"]


def repo_root(env: Mapping[str, str], cwd: Path) -> Path:
    return Path(env.get("DVC_ROOT") or cwd).resolve()


def tracking_uri(env: Mapping[str, str], root: Path) -> str:
    """MLFLOW_TRACKING_URI if set (a team's server), else SQLite at the repo root."""
    return env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def runs_page(uri: str, experiment_id: str) -> str:
    """Where a person sees the model runs with the comparison columns, for `mlflow ui` on this store.

    MLflow 3.17 opens experiments on its GenAI overview unless the URL (or the
    browser's saved choice) says `workflowType=machine_learning`.
    """
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def health_error(uri: str, timeout: float) -> str | None:
    """Why the tracking server at `uri` does not answer its health check, or None when it does."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read(1024)
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in a second, naming the URI, rather than after MLflow's minutes of retries."""
    if uri.startswith(("http://", "https://")) and (reason := health_error(uri, timeout)) is not None:
        raise StageError(f"MLflow tracking server {quote(uri)} is unreachable ({reason}); "
                         "start it or unset MLFLOW_TRACKING_URI")
    path = sqlite_file(uri)
    if path is not None and not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
        raise StageError(f"MLflow store {quote(uri)}: folder {path.parent} is missing or not writable; "
                         "fix MLFLOW_TRACKING_URI")


@contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise a SQLite store's first use across processes.

    MLflow creates and migrates the schema on first use without a lock: four
    processes starting on a fresh store failed in every trial and could leave
    it half-migrated for good. Creating an experiment by name races too. After
    that, MLflow's sessions wait up to 20 s on a busy database, which is enough.
    """
    path = sqlite_file(uri)
    if path is None:  # a server serialises its own database
        yield
        return
    with FileLock(f"{path}.lock", timeout=FIRST_USE_SECONDS):
        yield


def _saved_view() -> str:
    """The runs-table layout of the `comparison` view: the columns that compare models, newest first.

    Sorting by start time keeps nested runs folded under their parent.
    """
    state = {"selectedColumns": VIEW_COLUMNS, "orderByKey": "attributes.start_time", "orderByAsc": False}
    now = int(time.time() * 1000)
    return json.dumps({"name": "FC vs CNN", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def connect(env: Mapping[str, str], cwd: Path, experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    root = repo_root(env, cwd)
    uri = tracking_uri(env, root)
    # Decided before set_tracking_uri, which writes MLFLOW_TRACKING_URI into os.environ (often `env`).
    own_store = not env.get("MLFLOW_TRACKING_URI")
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_RETRIES.items():
            os.environ.setdefault(name, value)  # MLflow reads its settings from the environment
    mlflow.set_tracking_uri(uri)
    with first_use_lock(uri):
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        # Artifacts of the default store sit beside it, not under whatever cwd DVC used.
        location = (root / "mlruns").as_uri() if own_store else None
        tags = {"mlflow.note.content": EXPERIMENT_NOTE, f"mlflow.sharedViewState.{VIEW_KEY}": _saved_view(),
                "mlflow.experimentKind": "custom_model_development"}  # ignored by 3.17's UI, read by later ones
        return mlflow.create_experiment(experiment, artifact_location=location, tags=tags)


@contextmanager
def run(experiment_id: str | None = None, run_id: str | None = None, **kwargs: object) -> Iterator[mlflow.ActiveRun]:
    """Start (or reopen, with `run_id`) a run that always ends FINISHED, FAILED or KILLED."""
    try:
        active = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, **kwargs)
    except MlflowException as err:
        raise StageError(f"cannot open MLflow run {run_id or ''} in {mlflow.get_tracking_uri()} ({err.message}); "
                         "use the store it was logged to (MLFLOW_TRACKING_URI) or rerun its train stage") from err
    try:
        yield active
    except BaseException as err:
        mlflow.end_run(_end_status(err))
        raise
    mlflow.end_run("FINISHED")


def _end_status(err: BaseException) -> str:
    """Ctrl-C, SIGTERM (see cli) and a study's pruner end a run KILLED; any other exception FAILED."""
    return "KILLED" if isinstance(err, (KeyboardInterrupt, Pruned)) else "FAILED"


@dataclasses.dataclass(frozen=True)
class GroupRuns:
    """A model's parent run and its nested run per seed."""

    parent: str
    seeds: dict[int, str]


def _end_all(client: MlflowClient, run_ids: list[str], status: str) -> None:
    for run_id in run_ids:
        client.set_terminated(run_id, status)


@contextmanager
def group_runs(experiment_id: str, name: str, seeds: tuple[int, ...], tags: Mapping[str, str]) -> Iterator[GroupRuns]:
    """A parent run `name` (the active run) with a nested run per seed; all end FINISHED, FAILED or KILLED together."""
    with run(experiment_id, run_name=name, tags={**tags, "kind": "model"}) as parent:
        client = MlflowClient()
        children = {seed: client.create_run(experiment_id, run_name=f"{name}-seed{seed}", tags={
            **tags, "kind": "seed", "seed": str(seed), "mlflow.parentRunId": parent.info.run_id}).info.run_id
            for seed in seeds}
        try:
            yield GroupRuns(parent.info.run_id, children)
        except BaseException as err:
            if isinstance(err, Pruned):  # searchable: which trials the pruner stopped, and when
                for run_id in (parent.info.run_id, *children.values()):
                    client.set_tag(run_id, "pruned_at_epoch", str(err.epoch))
            _end_all(client, list(children.values()), _end_status(err))
            raise
        _end_all(client, list(children.values()), "FINISHED")


def process_tags() -> dict[str, str]:
    """Which process owns a run, so a later process can tell a live run from one whose process was killed."""
    me = psutil.Process()
    return {"process.host": socket.gethostname(), "process.pid": str(me.pid), "process.started": f"{me.create_time():.3f}"}


def _process_alive(tags: Mapping[str, str]) -> bool:
    try:
        process = psutil.Process(int(tags["process.pid"]))
        return abs(process.create_time() - float(tags["process.started"])) < 1.0  # not a reused pid
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


def close_orphaned_runs(experiment_id: str) -> list[str]:
    """End as KILLED every RUNNING run of this host whose process is gone (SIGKILL, power loss); their ids.

    Runs of other hosts are left alone: their processes cannot be checked from here.
    """
    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    running = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'")
    closed = []
    for found in running:
        if not _process_alive(found.data.tags):
            client.set_tag(found.info.run_id, "ended_by", "closed as KILLED: its process had died")
            client.set_terminated(found.info.run_id, "KILLED")
            closed.append(found.info.run_id)
    return closed


def _get_run(run_id: str) -> Run:
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise StageError(f"MLflow run {quote(run_id)} is not in {mlflow.get_tracking_uri()} ({err.error_code}); "
                         "use the store it was logged to (MLFLOW_TRACKING_URI) or rerun its train stage") from err


def model_run(run_id: str, experiment_id: str, model: str) -> Run:
    """The run `run_id`, refused unless it is the parent run of `model` in this experiment."""
    found = _get_run(run_id)
    tags = found.data.tags
    if found.info.experiment_id != experiment_id or tags.get("model") != model or tags.get("kind") != "model":
        raise StageError(f"MLflow run {quote(run_id)} is a {quote(tags.get('kind'))} run of model "
                         f"{quote(tags.get('model'))} in experiment {found.info.experiment_id}, not the {model} run of "
                         f"experiment {experiment_id}; rerun its train stage")
    return found


def check_group(runs: GroupRuns, experiment_id: str, model: str) -> None:
    """Refuse to write unless `runs` are `model`'s parent run in this experiment and its own nested seed runs."""
    model_run(runs.parent, experiment_id, model)
    for seed, run_id in runs.seeds.items():
        tags = _get_run(run_id).data.tags
        if tags.get("mlflow.parentRunId") != runs.parent or tags.get("seed") != str(seed):
            raise StageError(f"MLflow run {quote(run_id)} is not seed {seed} of run {runs.parent}; rerun its train stage")


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def provenance_tags(env: Mapping[str, str], cwd: Path, archive_md5: str, device: Mapping[str, str]) -> dict[str, str]:
    """Where a run's numbers came from: code, data, pipeline and hardware (`device`: see device.describe)."""
    commit = _git(cwd, "rev-parse", "HEAD")
    tags = {
        "mlflow.source.git.commit": commit or "unknown",
        "git.dirty": str(bool(_git(cwd, "status", "--porcelain", "--untracked-files=no"))).lower() if commit else "unknown",
        "data.archive_md5": archive_md5,
        **device,
    }
    if env.get("DVC_STAGE"):
        tags["dvc.stage"] = env["DVC_STAGE"]
    return {**tags, **context_tags(env)}


# What launched a run, set in the environment by whoever launched it: DVC, a study's trial, a scheduler's GPU share.
CONTEXT_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "CIFAR3_STUDY": "study", "CIFAR3_TRIAL": "trial", "CIFAR3_PHASE": "phase",
                "CUDA_VISIBLE_DEVICES": "cuda_visible_devices"}


def context_tags(env: Mapping[str, str]) -> dict[str, str]:
    """Tags every run of a stage carries (parents, seeds, comparison): experiment name, study and trial, GPUs given."""
    return {tag: env[name] for name, tag in CONTEXT_TAGS.items() if env.get(name)}
