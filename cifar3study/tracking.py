"""MLflow: where runs go, what each model's run holds, and how it ends.

The default store is SQLite at the repository root. DVC runs queued and
temp-dir experiments in `.dvc/tmp/exps/...` and sets DVC_ROOT to the real
repository, so the root comes from DVC_ROOT first: a relative path would put
the runs in a directory DVC deletes afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from cifar3study.errors import StageError
from cifar3study.history import EpochRecord
from cifar3study.models import count_params, layer_table
from cifar3study.params import Params

EXPERIMENT_NOTE = (
    "CIFAR-3, fully connected net vs small CNN. Each `dvc repro` adds one run per model (tag `model`) "
    "and one `comparison` run. Select the `fc` and `cnn` runs and press Compare to see param_count, "
    "train_acc, val_acc, gap and seconds_per_epoch side by side, and the per-epoch train_loss / val_acc curves."
)


def repo_root(env: Mapping[str, str], cwd: Path) -> Path:
    return Path(env.get("DVC_ROOT") or cwd).resolve()


def tracking_uri(env: Mapping[str, str], root: Path) -> str:
    """MLFLOW_TRACKING_URI if set (a team's server), else SQLite at the repo root."""
    return env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in a second, naming the URI, rather than after MLflow's minutes of retries."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise StageError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it or unset MLFLOW_TRACKING_URI"
            ) from err
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StageError(f"MLflow store {uri}: folder {folder} is missing or not writable; fix MLFLOW_TRACKING_URI")


def connect(env: Mapping[str, str], cwd: Path, experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    root = repo_root(env, cwd)
    uri = tracking_uri(env, root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    # Artifacts of the default store sit beside it, not under whatever cwd DVC used.
    location = None if env.get("MLFLOW_TRACKING_URI") else (root / "mlruns").as_uri()
    # experimentKind makes MLflow 3's UI open on the training-runs table, not its GenAI overview.
    tags = {"mlflow.note.content": EXPERIMENT_NOTE, "mlflow.experimentKind": "custom_model_development"}
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
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def provenance_tags(env: Mapping[str, str], cwd: Path, archive_md5: str, device: str) -> dict[str, str]:
    """Where a run's numbers came from: code, data, pipeline and hardware."""
    commit = _git(cwd, "rev-parse", "HEAD")
    tags = {
        "mlflow.source.git.commit": commit or "unknown",
        "git.dirty": str(bool(_git(cwd, "status", "--porcelain", "--untracked-files=no"))).lower() if commit else "unknown",
        "data.archive_md5": archive_md5,
        "torch.version": torch.__version__,
        "cuda.version": torch.version.cuda or "none",
        "device": device,
    }
    if env.get("DVC_STAGE"):
        tags["dvc.stage"] = env["DVC_STAGE"]
    if env.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = env["DVC_EXP_NAME"]
    return tags


def flatten(prefix: str, value: object) -> dict[str, str]:
    """Dataclasses and dicts as dotted keys, the way params.yaml names them."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    if value is None:  # a setting that does not apply (conv keys of an fc model)
        return {}
    if isinstance(value, (list, tuple)):
        return {prefix: "[" + ", ".join(str(v) for v in value) + "]"}
    return {prefix: str(value)}


def log_model(model: torch.nn.Module, example: np.ndarray, name: str = "model") -> str:
    """Log a CPU model with an image-tensor signature; returns its model URI.

    Saved as a torch.export program (MLflow's "pt2" format: no pickle, loads
    without this repository's code). The example needs a batch of 2 or more,
    or export fixes the batch size at 1. Requirements are given rather than
    inferred, which would re-import the model in a subprocess.
    """
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model, name=name, signature=infer_signature(example, output), input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        serialization_format="pt2",
    )
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri



def log_training_setup(name: str, params: Params, model: torch.nn.Module) -> None:
    """Every value the train stage read, and the model's size, before training starts."""
    n_params = count_params(model)
    mlflow.log_params({**flatten(f"models.{name}", params.models[name]), **flatten("train", params.train),
                       **flatten("evaluate", params.evaluate), **flatten("mlflow", params.mlflow),
                       "data.classes": flatten("", params.data.classes)[""], "param_count": n_params})
    mlflow.log_metric("param_count", n_params)
    mlflow.log_text(layer_table(model), "parameters.md")


def log_epoch(row: EpochRecord) -> None:
    mlflow.log_metrics({"train_loss": row.train_loss, "train_acc_running": row.train_acc_running,
                        "val_loss": row.val_loss, "val_acc": row.val_acc}, step=row.epoch)


def log_evaluation(run_id: str, step: int, metrics: Mapping[str, float], per_class: Mapping[str, Mapping]) -> None:
    """Final metrics at the last epoch's step, so they end the learning curves they share a name with."""
    with run(run_id=run_id):
        mlflow.log_metrics(dict(metrics), step=step)
        mlflow.log_metrics({f"val_f1_{c}": r["f1"] for c, r in per_class.items()}, step=step)
        mlflow.log_dict(dict(per_class), "per_class.json")


def log_figures(run_id: str, figures: dict[str, Figure], folder: str = "") -> None:
    """Figures into a run that may have ended (their PNGs overwrite earlier ones of the same name)."""
    client = MlflowClient()
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"{folder}/{name}" if folder else name)


def log_comparison(experiment_id: str, rows: list[dict], run_ids: dict[str, str], files: list[Path]) -> None:
    """A `comparison` run: each model's headline numbers as `<model>.<metric>`, and the report files."""
    tags = {"kind": "comparison", **{f"run.{name}": rid for name, rid in run_ids.items()}}
    with run(experiment_id, run_name="comparison", tags=tags):
        for row in rows:
            mlflow.log_metrics({f"{row['model']}.{k}": float(v) for k, v in row.items() if k != "model"})
        for path in files:
            if path.is_file():
                mlflow.log_artifact(str(path))
