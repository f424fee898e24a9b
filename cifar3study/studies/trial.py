"""One trial of a study: a DVC experiment of the base commit, run in a scratch clone by a Ray task.

A trial needs only the Git remote, the DVC cache or remote, the tracking
store and the ledger, so it runs the same on this box and on another. It
trains and evaluates only the model it tunes (`dvc exp run evaluate@<model>`).
Every attempt first looks for the trial's end: its experiment in the Git
remote (finished) or the pruner's mark in the ledger (pruned); a retry after
a killed worker ends KILLED the runs the dead attempt left, so a trial keeps
one FINISHED set of runs. The worker, not the driver, tells the ledger how the
trial ended, so a driver that dies meanwhile loses nothing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
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

import yaml

from cifar3study.errors import StageError, one_line, quote
from cifar3study.studies.search import Claim
from cifar3study.tracking import ledger

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from cifar3study.reporting.evaluation import ModelMetrics, Spread

log = logging.getLogger("study")
PUSH_ATTEMPTS = 6  # two trials pushing at one moment: one is rejected and tries again
IDENTITY = {"GIT_AUTHOR_NAME": "cifar3 study", "GIT_AUTHOR_EMAIL": "study@localhost",
            "GIT_COMMITTER_NAME": "cifar3 study", "GIT_COMMITTER_EMAIL": "study@localhost"}


# A command's whole process group ends with it: a killed Ray worker leaves no `dvc exp run` training on, and
# the stages, sent SIGTERM, end their runs KILLED (see cli.run_stage).
GUARD = 'trap "trap - TERM; kill -TERM 0" TERM; "$@" & wait $!'


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


def fetch_exp(repo: Path, remote: str, base: str, name: str) -> None:
    ref = exp_ref(base, name)
    run(["git", "fetch", "-q", remote, f"+{ref}:{ref}"], repo, what="git fetch of the experiment")


def recorded_metrics(repo: Path, commit: str, model: str) -> ModelMetrics:
    """The metrics a finished experiment committed (they are `cache: false`, so they are in Git)."""
    from cifar3study.reporting.evaluation import read_metrics

    text = run(["git", "show", f"{commit}:data/metrics/{model}.json"], repo, what="git show")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / f"{model}.json").write_text(text, encoding="utf-8")
        return read_metrics(Path(folder) / f"{model}.json")


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs, on whichever box it lands."""

    study: str
    claim: Claim  # which trial of the ledger, its experiment name and overrides
    owner: str  # the driver's lease: the worker marks the trial started under it
    ledger: str  # the ledger's URL
    prune: dict[str, object]  # the study's pruner, rebuilt by the train stage
    select: str  # holdout | val: the split a search trial is scored on (a final refit: val, the test split)
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
    claim: Claim
    state: str  # COMPLETE | PRUNED | FAIL, as the ledger holds it
    value: float | None = None  # the score it is ranked by
    error: str | None = None  # one line: why the trial failed


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
    env = {**IDENTITY, **os.environ, **spec.env, "CIFAR3_STUDY": spec.study, "CIFAR3_TRIAL": spec.claim.key,
           "CIFAR3_PHASE": spec.claim.phase, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for inherited in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", *ledger.TRIAL_ENV):
        env.pop(inherited, None)
    if spec.claim.phase == "search":  # a final refit reports to no pruner: its epochs are scored on the test split
        env.update(ledger.trial_env(spec.ledger, spec.claim.ledger_study, spec.claim.trial_id, spec.prune))
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
        log.warning("%s: %s", spec.claim.name, err)


def _push(spec: TrialSpec, repo: Path, env: dict[str, str]) -> None:
    extra = ["--no-cache"] if spec.cache_dir is not None else []
    cmd = ["dvc", "exp", "push", *extra, spec.remote, spec.claim.name]
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            run(cmd, repo, env, what="dvc exp push")
            return
        except StageError:
            if attempt == PUSH_ATTEMPTS:
                raise
            time.sleep(random.uniform(0.5, 2.0) * attempt)


def scored_split(spec: TrialSpec) -> str:
    """What the trial is ranked by: the holdout or validation accuracy of a search trial, the test's of a refit."""
    return spec.select if spec.claim.phase == "search" else "val"


def split_accuracy(metrics: ModelMetrics, split: str) -> Spread:
    """The accuracy a trial is judged by, refused when its metrics are on another split than the study ranks on."""
    if metrics.split != split:
        raise StageError(f"the trial's metrics are on the {metrics.split} split, but it is judged on the {split} split; "
                         "was data.holdout changed by hand? rerun the study")
    return metrics.eval_acc


def score(metrics: ModelMetrics, spec: TrialSpec) -> float:
    return split_accuracy(metrics, scored_split(spec)).mean


def _finished(spec: TrialSpec, repo: Path, storage: BaseStorage) -> TrialOutcome | None:
    """How an earlier attempt ended the trial, if it did: pushed its experiment, was pruned, or was told."""
    claim = spec.claim
    recorded = remote_exps(repo, spec.remote, spec.base).get(claim.name)
    if recorded is not None:  # a worker that died after pushing: the trial is done
        fetch_exp(repo, spec.remote, spec.base, claim.name)
        value = score(recorded_metrics(repo, recorded, claim.model), spec)
        return TrialOutcome(claim, ledger.finish(storage, claim.trial_id, "COMPLETE", value, exp_commit=recorded,
                                                  metric=f"{scored_split(spec)}_acc"), value)
    trial = storage.get_trial(claim.trial_id)
    if trial.state.is_finished():
        return TrialOutcome(claim, trial.state.name, trial.value)
    if ledger.PRUNED_ATTR in trial.system_attrs:
        return TrialOutcome(claim, ledger.finish(storage, claim.trial_id, "PRUNED"))
    return None


def _attempt(spec: TrialSpec, repo: Path, storage: BaseStorage) -> TrialOutcome:
    claim, env = spec.claim, trial_env(spec)
    _clone(spec, repo, env)
    if (ended := _finished(spec, repo, storage)) is not None:
        return ended
    _share_data(spec, repo, env)
    if closed := close_leftover_runs(env, spec.experiment, claim.key):
        log.warning("%s: closed %d runs a dead attempt left", claim.name, len(closed))
    storage.set_trial_system_attr(claim.trial_id, ledger.STARTED_ATTR, spec.owner)
    forget_lock(repo, claim.model)
    cmd = ["dvc", "exp", "run", "-n", claim.name, *set_args(claim.overrides),
           *([] if spec.cache_dir else ["--pull"]), f"evaluate@{claim.model}"]
    try:
        run(cmd, repo, env, what="dvc exp run")
    except StageError:
        if ledger.PRUNED_ATTR in storage.get_trial(claim.trial_id).system_attrs:
            return TrialOutcome(claim, ledger.finish(storage, claim.trial_id, "PRUNED"))
        raise
    from cifar3study.reporting.evaluation import read_metrics

    value = score(read_metrics(repo / "data" / "metrics" / f"{claim.model}.json"), spec)
    _push(spec, repo, env)
    commit = run(["git", "rev-parse", exp_ref(spec.base, claim.name)], repo, env, what="git rev-parse").strip()
    return TrialOutcome(claim, ledger.finish(storage, claim.trial_id, "COMPLETE", value, exp_commit=commit,
                                                  metric=f"{scored_split(spec)}_acc"), value)


def forget_lock(repo: Path, model: str) -> None:
    """Drop the baseline's lock entries of the stages the trial runs, so they run even when its overrides change
    nothing (a trial equal to the baseline would otherwise reuse the baseline's outputs and log no runs of its own)."""
    path = repo / "dvc.lock"
    if not path.is_file():
        return
    lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for stage in (f"train@{model}", f"evaluate@{model}"):
        lock.get("stages", {}).pop(stage, None)
    path.write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")


def set_args(overrides: dict[str, object]) -> list[str]:
    """`-S key=value` arguments; JSON is YAML, so DVC reads each value back as written."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def run_trial(spec: TrialSpec) -> TrialOutcome:
    """Run (or find ended) one trial and tell the ledger; a failure comes back as a one-line reason."""
    folder = Path(tempfile.mkdtemp(prefix=f"{spec.claim.name}-", dir=spec.scratch))
    storage = ledger.open_storage(spec.ledger)
    try:
        return _attempt(spec, folder / "repo", storage)
    except StageError as err:
        reason = one_line(err)
        return TrialOutcome(spec.claim, ledger.finish(storage, spec.claim.trial_id, "FAIL", error=reason), error=reason)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
