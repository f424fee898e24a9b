"""Run a study: each model's trials as DVC experiments scheduled by Ray, the winners refit, then the report.

    python -m cifar3study.studies.run studies/<name>.yaml [--address ADDR]

With no address (and no RAY_ADDRESS) Ray starts on this box, trials share
this repository's DVC cache, log to its MLflow store and keep their ledger in
`optuna.db` beside it. With an address they run on that cluster: each clones
the Git remote, pulls from the DVC remote, logs to MLFLOW_TRACKING_URI, keeps
the ledger at CIFAR3_LEDGER and pushes its experiment back. The ledger knows
which trials ended, so a rerun of a finished study starts no Ray and costs
seconds, and two drivers of one study share its trials.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from cifar3study.cli import run_stage
from cifar3study.errors import StageError, quote
from cifar3study.studies.checks import load_study
from cifar3study.studies.search import Claim, Searches, unretried_failures
from cifar3study.studies.spec import Study
from cifar3study.studies.trial import TrialSpec
from cifar3study.tracking import ledger

log = logging.getLogger("study")
# What trials get from the driver's environment: tracking server, its artifact store, a data mirror, the ledger's password file.
PASSED_ENV = ("MLFLOW_", "AWS_", "CIFAR10_URL", "CIFAR10_MD5", "PGPASSFILE")


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


def spec_maker(args: argparse.Namespace, repo: Path, study: Study, params: dict, base: str, remote: str,
               url: str) -> Callable[[Claim], TrialSpec]:
    """How a claim becomes the TrialSpec its Ray task runs."""
    cluster = bool(args.address)
    local_config = repo / ".dvc" / "config.local"
    shared = dict(study=study.name, owner=ledger.Lease.mine(1).owner, ledger=url, prune=study.prune.as_dict(),
                  select=study.select, base=base, remote=remote, cache_dir=None if cluster else dvc_cache(repo),
                  dvc_config=local_config.read_text(encoding="utf-8") if cluster and local_config.is_file() else None,
                  env=passed_env(dict(os.environ), repo, cluster), cpus=study.resources.cpus,
                  experiment=params["mlflow"]["experiment"], scratch=args.scratch)
    return lambda claim: TrialSpec(claim=claim, **shared)


def open_searches(args: argparse.Namespace, repo: Path, study: Study, base: str) -> tuple[Searches, str]:
    url = ledger.ledger_url(os.environ, repo)
    if args.address and url.startswith("sqlite"):
        raise StageError(f"a cluster's trials share one ledger: set {ledger.LEDGER_ENV} to a database every box "
                         "reaches (the team stack's, see `make team-up`)")
    lease = ledger.env_seconds(os.environ, ledger.LEASE_ENV, ledger.DEFAULT_LEASE)
    searches = Searches(ledger.open_storage(url), url, study, base, lease)
    searches.open()
    return searches, url


def run_study(args: argparse.Namespace, repo: Path) -> bool:
    """Run what is left of the study, then report; True when no trial failed."""
    study, params = load_study(args.study, repo / "params.yaml")
    base = base_commit(repo)
    remote = git_remote(repo, args.git_remote, bool(args.address))
    searches, url = open_searches(args, repo, study, base)
    if searches.finished():
        log.info("study %s: every trial of %s already ended at commit %s; nothing to run (reports/studies/%s)",
                 study.name, ", ".join(study.models), base[:12], study.name)
        return True
    from cifar3study.studies import report, runner  # Ray, MLflow and the report: only when there is work

    experiment_id = report.prepare_store(repo, params["mlflow"]["experiment"])
    make_spec = spec_maker(args, repo, study, params, base, remote, url)
    outcomes = runner.Driver(searches, make_spec, study.resources, args.address, args.num_gpus).run()
    for outcome in outcomes:
        if outcome.error is not None:
            log.error("trial %s failed: %s", outcome.claim.name, outcome.error)
    report.write(searches, params, repo, remote, experiment_id, fetch=bool(args.address))
    return not any(unretried_failures(searches.trials(m, p)) for m in study.models for p in ("search", "final"))


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
        raise StageError("some trials failed (reasons above); fix them and rerun: ended trials are kept, failed ones retried")


if __name__ == "__main__":
    run_stage(main)
