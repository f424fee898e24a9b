"""One trial of a study: a DVC experiment of the base commit, run in a scratch clone (by a Ray task).

A trial needs only the Git remote, the DVC cache or remote and the tracking
store, so it runs the same on this box and on another one. Its experiment is
pushed to the Git remote only after `dvc exp run` succeeded, so an experiment
ref there means "finished": every attempt checks that first, and a retry
after a killed worker ends KILLED the runs the dead attempt left (RUNNING or
FINISHED), so a trial keeps one FINISHED set of runs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from cifar3study.errors import StageError, one_line, quote
from cifar3study.studies.spec import Trial

if TYPE_CHECKING:  # reading metrics pulls in scipy; a rerun of a finished study never does
    from cifar3study.reporting.evaluation import ModelMetrics

log = logging.getLogger("study")
PUSH_ATTEMPTS = 6  # two trials pushing at one moment: one is rejected and tries again
GIT_SECONDS = 600
# The trial's whole process group ends with it: a killed Ray worker leaves no `dvc exp run` training on, and
# the stages, sent SIGTERM, end their runs KILLED (see cli.run_stage).
GUARD = 'trap "trap - TERM; kill -TERM 0" TERM; "$@" & wait $!'
IDENTITY = {"GIT_AUTHOR_NAME": "cifar3 study", "GIT_AUTHOR_EMAIL": "study@localhost",
            "GIT_COMMITTER_NAME": "cifar3 study", "GIT_COMMITTER_EMAIL": "study@localhost"}


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs, on whichever box it lands."""

    study: str
    trial: Trial
    base: str  # the commit every trial of the study runs
    remote: str  # Git remote (URL or path) the clone comes from and the experiment goes to
    cache_dir: str | None  # one box: the repository's DVC cache, shared, so nothing is copied or downloaded again
    dvc_config: str | None  # several boxes: the driver's .dvc/config.local (its DVC remote), for pull and push
    env: dict[str, str]  # tracking store, credentials, data mirror
    cpus: float
    experiment: str  # the MLflow experiment the stages log to
    scratch: str | None = None  # folder for the clone; the system's temp folder when None


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    key: str
    name: str
    metrics: dict[str, ModelMetrics] | None = None
    error: str | None = None  # one line: why the trial failed
    skipped: bool = False  # it had finished before this run of the study


def exp_ref(base: str, name: str) -> str:
    """Where DVC keeps the experiment `name` of commit `base`."""
    return f"refs/exps/{base[:2]}/{base[2:]}/{name}"


def _die_with_parent() -> None:
    os.setsid()
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run(cmd: list[str], cwd: Path | None, env: dict[str, str] | None = None, what: str = "") -> str:
    """Run `cmd`; on failure a StageError naming it, with the most telling line of its output."""
    proc = subprocess.Popen(["bash", "-c", GUARD, "guard", *cmd], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    tail: deque[str] = deque(maxlen=200)
    for line in proc.stdout:
        tail.append(line.rstrip())
    if proc.wait() != 0:
        raise StageError(f"{what or ' '.join(cmd[:3])} failed: {_reason(list(tail))}")
    return "\n".join(tail)


def _reason(lines: list[str]) -> str:
    """A stage's own one-line error when there is one, else the last line of output."""
    for marker in (" error: ", "ERROR: ", "error: ", "fatal: "):
        found = [line for line in lines if marker in line]
        if found:
            return one_line(found[-1].split(marker, 1)[1] if marker == " error: " else found[-1])
    return one_line(next((line for line in reversed(lines) if line.strip()), "no output"))


def remote_exps(cwd: Path, remote: str, base: str) -> dict[str, str]:
    """{experiment name: commit} of the experiments of `base` in the Git remote."""
    prefix = exp_ref(base, "")
    listed = run(["git", "ls-remote", "--refs", remote, f"{prefix}*"], cwd, what="git ls-remote")
    found = (line.split("\t") for line in listed.splitlines() if "\t" in line)
    return {ref.removeprefix(prefix): sha for sha, ref in found if ref.startswith(prefix)}


def recorded_metrics(repo: Path, commit: str, models: tuple[str, ...]) -> dict[str, ModelMetrics]:
    """The metrics a finished experiment committed (they are `cache: false`, so they are in Git)."""
    from cifar3study.reporting.evaluation import read_metrics

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for model in models:
            text = run(["git", "show", f"{commit}:data/metrics/{model}.json"], repo, what="git show")
            (Path(folder) / f"{model}.json").write_text(text, encoding="utf-8")
            out[model] = read_metrics(Path(folder) / f"{model}.json")
    return out


def fetch_exp(repo: Path, remote: str, base: str, name: str) -> None:
    ref = exp_ref(base, name)
    run(["git", "fetch", "-q", remote, f"+{ref}:{ref}"], repo, what="git fetch of the experiment")


def close_leftover_runs(env: dict[str, str], experiment: str, key: str) -> list[str]:
    """End KILLED the runs of this trial that a dead attempt left, RUNNING or FINISHED; their ids.

    An attempt killed between its two models leaves one model's runs FINISHED; the retry trains both again,
    so those would be a second FINISHED set. The trial's experiment is not in the Git remote (checked
    before), so no run of it belongs to a finished trial.
    """
    from mlflow import MlflowClient  # only trials need it; the driver's no-op rerun stays fast

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    leftovers = [r for r in client.search_runs([found.experiment_id], f"tags.trial = '{key}'", max_results=1000)
                 if r.info.status in ("RUNNING", "FINISHED")]
    for leftover in leftovers:
        client.set_tag(leftover.info.run_id, "ended_by", "closed as KILLED: its attempt died; a retry of its trial started")
        client.set_terminated(leftover.info.run_id, "KILLED", end_time=leftover.info.end_time)
    return [r.info.run_id for r in leftovers]


def trial_env(spec: TrialSpec) -> dict[str, str]:
    """The worker's environment (CUDA_VISIBLE_DEVICES as Ray set it), the driver's store, the trial's tags."""
    threads = str(max(1, int(spec.cpus)))  # torch follows the trial's CPU share, not the box's core count
    env = {**IDENTITY, **os.environ, **spec.env, "CIFAR3_STUDY": spec.study, "CIFAR3_TRIAL": spec.trial.key,
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for inherited in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE"):
        env.pop(inherited, None)
    return env


def _clone(spec: TrialSpec, repo: Path, env: dict[str, str]) -> None:
    run(["git", "clone", "-q", "--no-checkout", spec.remote, str(repo)], None, env, what="git clone")
    try:
        run(["git", "-c", "advice.detachedHead=false", "checkout", "-q", spec.base], repo, env, what="git checkout")
    except StageError as err:
        raise StageError(f"commit {spec.base[:12]} is not in the Git remote {quote(spec.remote)} ({err}); "
                         "git push it, then rerun the study") from err


def _share_data(spec: TrialSpec, repo: Path, env: dict[str, str]) -> None:
    if spec.cache_dir is not None:
        run(["dvc", "cache", "dir", "--local", spec.cache_dir], repo, env, what="dvc cache dir")
        return
    if spec.dvc_config is not None:
        local = repo / ".dvc" / "config.local"
        local.touch(mode=0o600)
        local.write_text(spec.dvc_config, encoding="utf-8")
    try:
        run(["dvc", "pull", "-q"], repo, env, what="dvc pull")
    except StageError as err:  # what the remote lacks, the pipeline computes
        log.warning("%s: %s", spec.trial.name, err)


def _push(spec: TrialSpec, repo: Path, env: dict[str, str]) -> None:
    extra = ["--no-cache"] if spec.cache_dir is not None else []
    cmd = ["dvc", "exp", "push", *extra, spec.remote, spec.trial.name]
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            run(cmd, repo, env, what="dvc exp push")
            return
        except StageError:
            if attempt == PUSH_ATTEMPTS:
                raise
            time.sleep(random.uniform(0.5, 2.0) * attempt)


def _attempt(spec: TrialSpec, repo: Path) -> TrialOutcome:
    trial, env = spec.trial, trial_env(spec)
    _clone(spec, repo, env)
    recorded = remote_exps(repo, spec.remote, spec.base).get(trial.name)
    if recorded is not None:  # a worker that died after pushing: the trial is done
        fetch_exp(repo, spec.remote, spec.base, trial.name)
        return TrialOutcome(trial.key, trial.name, recorded_metrics(repo, recorded, trial.models), skipped=True)
    _share_data(spec, repo, env)
    if closed := close_leftover_runs(env, spec.experiment, trial.key):
        log.warning("%s: closed %d runs a dead attempt left", trial.name, len(closed))
    cmd = ["dvc", "exp", "run", "-n", trial.name, *trial.set_args(), *([] if spec.cache_dir else ["--pull"])]
    run(cmd, repo, env, what="dvc exp run")
    from cifar3study.reporting.evaluation import read_metrics

    metrics = {model: read_metrics(repo / "data" / "metrics" / f"{model}.json") for model in trial.models}
    _push(spec, repo, env)
    return TrialOutcome(trial.key, trial.name, metrics)


def run_trial(spec: TrialSpec) -> TrialOutcome:
    """Run (or find finished) one trial; a failure comes back as a one-line reason, not an exception."""
    folder = Path(tempfile.mkdtemp(prefix=f"{spec.trial.name}-", dir=spec.scratch))
    try:
        return _attempt(spec, folder / "repo")
    except StageError as err:
        return TrialOutcome(spec.trial.key, spec.trial.name, error=one_line(err))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
