"""Run a study: every trial of a study file as a DVC experiment, scheduled by Ray, then its report.

    python -m cifar3study.studies.run studies/<name>.yaml [--address ADDR]

With no address (and no RAY_ADDRESS) Ray starts on this box, trials share
this repository's DVC cache and log to its MLflow store, as `dvc repro`
does. With an address they run on that cluster: each clones the Git remote,
pulls from the DVC remote, logs to MLFLOW_TRACKING_URI and pushes its
experiment back. Finished trials are found in the Git remote before Ray
starts, so a rerun of a finished study costs seconds.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.errors import StageError, quote
from cifar3study.studies.spec import Study, Trial, load_study, trials
from cifar3study.studies.trial import TrialOutcome, TrialSpec, fetch_exp, recorded_metrics, remote_exps

log = logging.getLogger("study")
# What trials get from the driver's environment: tracking server, its artifact store, a data mirror.
PASSED_ENV = ("MLFLOW_", "AWS_", "CIFAR10_URL", "CIFAR10_MD5")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise StageError(f"git {' '.join(args[:2])} failed in {repo}: {quote(done.stderr.strip())}; "
                         "run the study from the repository root")
    return done.stdout.strip()


def base_commit(repo: Path) -> str:
    """HEAD, refused when tracked files differ from it: trials run the commit, not the working tree."""
    if _git(repo, "status", "--porcelain", "--untracked-files=no"):
        raise StageError("tracked files have uncommitted changes; commit them first (trials run HEAD, a commit)")
    return _git(repo, "rev-parse", "HEAD")


def git_remote(repo: Path, given: str | None, cluster: bool) -> str:
    """One box: this repository itself. A cluster: the remote given, or the repository's `origin`."""
    if not cluster:
        return str(repo)
    if given:
        return given
    try:
        return _git(repo, "remote", "get-url", "origin")
    except StageError as err:
        raise StageError("a cluster needs a Git remote every box can reach: add `origin` or pass --git-remote") from err


def finished(repo: Path, remote: str, base: str, todo: list[Trial], fetch: bool) -> dict[str, str]:
    """{trial name: experiment commit} of the trials already in the Git remote (fetched here when remote)."""
    names = {t.name for t in todo}
    done = {name: sha for name, sha in remote_exps(repo, remote, base).items() if name in names}
    if fetch:
        for name in done:
            fetch_exp(repo, remote, base, name)
    return done


def passed_env(env: dict[str, str], repo: Path, cluster: bool) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k.startswith(PASSED_ENV)}
    if not cluster:  # the repository's own store, exactly where `dvc repro` logs
        out.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    elif not out.get("MLFLOW_TRACKING_URI"):
        raise StageError("a cluster's trials log to a tracking server: set MLFLOW_TRACKING_URI (see `make team-up`)")
    return out


def dvc_cache(repo: Path) -> str:
    done = subprocess.run(["dvc", "cache", "dir"], cwd=repo, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise StageError(f"`dvc cache dir` failed in {repo}: {quote(done.stderr.strip())}; is this a DVC repository?")
    return done.stdout.strip()


def specs(args: argparse.Namespace, repo: Path, study: Study, params: dict, base: str, remote: str,
          todo: list[Trial]) -> list[TrialSpec]:
    cluster = bool(args.address)
    local_config = repo / ".dvc" / "config.local"
    shared = dict(study=study.name, base=base, remote=remote,
                  cache_dir=None if cluster else dvc_cache(repo),
                  dvc_config=local_config.read_text(encoding="utf-8") if cluster and local_config.is_file() else None,
                  env=passed_env(dict(os.environ), repo, cluster), cpus=study.resources.cpus,
                  experiment=params["mlflow"]["experiment"], scratch=args.scratch)
    return [TrialSpec(trial=t, **shared) for t in todo]


def run_study(args: argparse.Namespace, repo: Path) -> bool:
    """Run what is left of the study; True when every trial finished."""
    study, params = load_study(args.study, repo / "params.yaml")
    base = base_commit(repo)
    todo = trials(study, params, base, args.study)
    remote = git_remote(repo, args.git_remote, bool(args.address))
    done = finished(repo, remote, base, todo, fetch=bool(args.address))
    if len(done) == len(todo):
        log.info("study %s: all %d trials already finished at commit %s; nothing to run (reports/studies/%s)",
                 study.name, len(todo), base[:12], study.name)
        return True
    log.info("study %s: %d trials, %d already finished, %d to run, commit %s", study.name, len(todo), len(done),
             len(todo) - len(done), base[:12])
    from cifar3study.studies import runner  # Ray, MLflow and the report: only when there is work

    outcomes = [TrialOutcome(t.key, t.name, recorded_metrics(repo, done[t.name], t.models), skipped=True)
                for t in todo if t.name in done]
    all_specs = specs(args, repo, study, params, base, remote, todo)
    experiment_id = runner.prepare_store(repo, all_specs[0])
    pending = [spec for spec in all_specs if spec.trial.name not in done]
    outcomes += runner.run_on_ray(pending, study.resources, args.address, args.num_gpus, len(done))
    failed = [o for o in outcomes if o.error is not None]
    for outcome in failed:
        log.error("trial %s failed: %s", outcome.name, outcome.error)
    runner.report(repo, study, todo, outcomes, experiment_id, base)
    return not failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="the study file, e.g. studies/lr-momentum.yaml")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="a Ray cluster (host:port); default RAY_ADDRESS, else Ray starts on this box")
    parser.add_argument("--git-remote", help="with --address: the Git remote trials clone and push to (default origin)")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="without --address: GPUs Ray may hand out on this box (default: those it finds)")
    parser.add_argument("--scratch", help="folder for the trials' clones (default: the system's temp folder)")
    args = parser.parse_args()
    if args.num_gpus is not None and (args.address or not math.isfinite(args.num_gpus) or args.num_gpus < 0):
        raise StageError("--num-gpus is for Ray on this box and must be >= 0; a cluster's nodes say their own GPUs")
    if not run_study(args, Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))):
        raise StageError("some trials failed (reasons above); fix them and rerun: finished trials are kept")


if __name__ == "__main__":
    run_stage(main)
