"""The study's Ray side and its end: the store made ready, trials scheduled and watched, the report written."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cifar3study.errors import one_line
from cifar3study.studies.spec import Resources, Study, Trial
from cifar3study.studies.trial import TrialOutcome, TrialSpec, run_trial
from cifar3study.tracking import store

log = logging.getLogger("study")
OBJECT_STORE_BYTES = 128 * 1024**2  # trials pass small records; Ray's default would take a third of the memory
MAX_RETRIES = 3  # Ray reruns a trial whose worker or node died this often
RAY_QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}  # Ray listens on every interface


def prepare_store(repo: Path, spec: TrialSpec) -> str:
    """Create the MLflow experiment from the repository first, so the default store keeps artifacts in <repo>/mlruns."""
    env = dict(spec.env)
    if env.get("MLFLOW_TRACKING_URI") == store.tracking_uri({}, repo):
        del env["MLFLOW_TRACKING_URI"]  # connect then sets the artifact location itself, whatever the cwd
    return store.connect(env, repo, spec.experiment)


def _start_ray(address: str | None, num_gpus: float | None) -> None:
    for name, value in RAY_QUIET.items():  # before Ray's first import: it reads its settings then
        os.environ.setdefault(name, value)
    import ray

    package = str(Path(__file__).resolve().parents[1])  # cifar3study, shipped to every node by Ray
    runtime = {"py_modules": [package], "excludes": ["__pycache__"]}
    if address:
        ray.init(address=address, runtime_env=runtime, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=OBJECT_STORE_BYTES, runtime_env=runtime, log_to_driver=False,
                 logging_level=logging.WARNING)


def _slots(resources: Resources) -> int:
    """How many trials the cluster can run at once."""
    import ray

    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) / resources.cpus]
    if resources.gpus > 0:
        fits.append(total.get("GPU", 0) / resources.gpus)
    return max(1, int(min(fits)))


def _outcome(ref: object, spec: TrialSpec) -> TrialOutcome:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:  # the worker died more often than Ray retries, or a bug in the task
        reason = one_line(str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
        return TrialOutcome(spec.trial.key, spec.trial.name, error=f"{type(err).__name__}: {reason}")


def _watch(refs: dict[object, TrialSpec], slots: int, done_before: int, total: int) -> list[TrialOutcome]:
    import ray

    outcomes: list[TrialOutcome] = []
    pending = list(refs)
    # A log file gets a line every half minute, a terminal a live bar.
    with tqdm(total=total, initial=done_before, unit="trial", desc="trials done", dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            outcomes += [_outcome(ref, refs[ref]) for ref in ready]
            failed = sum(o.error is not None for o in outcomes)
            bar.set_postfix(running=min(slots, len(pending)), queued=max(0, len(pending) - slots), failed=failed,
                            refresh=False)
            bar.update(len(ready))
    return outcomes


def run_on_ray(pending: list[TrialSpec], resources: Resources, address: str | None, num_gpus: float | None,
               done_before: int) -> list[TrialOutcome]:
    """Every pending trial as a Ray task; their outcomes, failures included."""
    started = time.monotonic()
    _start_ray(address, num_gpus)
    import ray

    try:
        log.info("Ray ready in %.1f s: %s", time.monotonic() - started, ray.cluster_resources())
        task = ray.remote(num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=MAX_RETRIES)(run_trial)
        refs = {task.options(name=spec.trial.name).remote(spec): spec for spec in pending}
        return _watch(refs, _slots(resources), done_before, done_before + len(pending))
    finally:
        ray.shutdown()


def report(repo: Path, study: Study, todo: list[Trial], outcomes: list[TrialOutcome], experiment_id: str,
           base: str) -> None:
    """The study's report folder and its MLflow run and saved view, over the trials that finished."""
    from cifar3study.reporting.study_report import TrialResult, write_study_report
    from cifar3study.tracking.study_tracking import ensure_study_view, log_study_run

    by_key = {o.key: o for o in outcomes if o.metrics is not None}
    results = [TrialResult(t.key, t.name, t.overrides, by_key[t.key].metrics) for t in todo if t.key in by_key]
    if not results:
        log.error("no trial finished: no report written")
        return
    out_dir = repo / "reports" / "studies" / study.name
    files = write_study_report(out_dir, study.name, study.swept, results, base_commit=base)
    log_study_run(experiment_id, study.name, study.swept, [r.key for r in results], files)
    log.info("report: %s", files[0])
    log.info("MLflow runs of the study: %s", ensure_study_view(experiment_id, study.name, study.swept))
