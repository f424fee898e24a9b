"""The study's Ray side: claim a trial when a slot is free, run it as a Ray task, renew its lease, show progress.

Ray starts first and must offer what one trial asks for, or the study stops
before any trial is claimed. The driver then claims trials one by one from
the ledger (search.Searches), only when Ray has room to start one, so the
sampler draws each configuration as late as possible, after the latest
scores. When every remaining trial is held by another driver, this one waits
for them (taking over any whose driver dies) and then reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from cifar3study.errors import one_line
from cifar3study.studies import cluster
from cifar3study.studies.search import Claim, Searches, started
from cifar3study.studies.spec import Resources
from cifar3study.studies.trial import TrialOutcome, TrialSpec, run_trial
from cifar3study.tracking import ledger

log = logging.getLogger("study")
MAX_RETRIES = 3  # Ray reruns a trial whose worker or node died this often
POLL_SECONDS = 2.0
UNSCHEDULABLE_ENV = "CIFAR3_UNSCHEDULABLE_SECONDS"  # how long a trial may wait for a node that fits it
DEFAULT_UNSCHEDULABLE = 300.0


class Progress:
    """One bar per model: trials ended out of its slots, and what the ledger says of the rest."""

    def __init__(self, searches: Searches) -> None:
        self.searches = searches
        interval = 0.5 if sys.stderr.isatty() else 30  # a log file gets a line every half minute
        self.bars = {m: tqdm(total=searches.study.trials_for(m) + bool(searches.study.final_seeds), desc=m,
                             unit="trial", position=i, dynamic_ncols=True, mininterval=interval)
                     for i, m in enumerate(searches.study.models)}

    def refresh(self) -> None:
        for model, bar in self.bars.items():
            search, finals = self.searches.trials(model, "search"), self.searches.trials(model, "final")
            states = [t.state.name for t in search]
            running = sum(t.state.name == "RUNNING" and started(t) for t in search + finals)
            queued = sum(not t.state.is_finished() for t in search + finals) - running
            done = [t.value for t in search if t.state.name == "COMPLETE"]
            bar.n = sum(t.state.is_finished() for t in search) + any(t.state.name == "COMPLETE" for t in finals)
            bar.set_postfix(complete=states.count("COMPLETE"), pruned=states.count("PRUNED"), running=running,
                            queued=queued, failed=states.count("FAIL"), best=f"{max(done):.4f}" if done else "-",
                            refresh=False)
            bar.update(0)  # drawn when mininterval allows: live on a terminal, every half minute in a log

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class Driver:
    """Claims, submits and watches trials until none is left to this driver or to any other."""

    def __init__(self, searches: Searches, make_spec: Callable[[Claim], TrialSpec], resources: Resources,
                 address: str | None, num_gpus: float | None) -> None:
        self.searches, self.make_spec, self.resources = searches, make_spec, resources
        self.address, self.num_gpus = address, num_gpus
        self.in_flight: dict[object, tuple[Claim, float]] = {}
        self.outcomes: list[TrialOutcome] = []
        self.ray = contextlib.ExitStack()
        self.task = None
        self.slots = 0
        self.unschedulable = ledger.env_seconds(os.environ, UNSCHEDULABLE_ENV, DEFAULT_UNSCHEDULABLE)

    def run(self) -> list[TrialOutcome]:
        with self.ray:
            self._start_ray()
            progress = Progress(self.searches)
            try:
                self._loop(progress)
            finally:
                progress.close()
        return self.outcomes

    def _loop(self, progress: Progress) -> None:
        renewed = time.monotonic()
        while True:
            self._fill()
            if not self.in_flight and not any(self.searches.active()):
                return
            if self.in_flight:
                self._collect()
            else:  # every trial left is another driver's: wait, and take over any whose driver dies
                time.sleep(POLL_SECONDS)
            if time.monotonic() - renewed > self.searches.lease / 4:
                self.searches.renew([claim for claim, _ in self.in_flight.values()])
                renewed = time.monotonic()
            self._fail_unschedulable()
            progress.refresh()

    def _fill(self) -> None:
        while len(self.in_flight) < self.slots:
            claim = self.searches.claim()
            if claim is None:
                return
            ref = self.task.options(name=claim.name).remote(self.make_spec(claim))
            self.in_flight[ref] = (claim, time.monotonic())

    def _start_ray(self) -> None:
        started_at = time.monotonic()
        package = str(Path(__file__).resolve().parents[1])  # cifar3study, shipped to every node by Ray
        self.ray.enter_context(cluster.ray_session(self.address, self.num_gpus,
                                                   {"py_modules": [package], "excludes": ["__pycache__"]}))
        cluster.check_resources(self.resources.cpus, self.resources.gpus)
        import ray

        log.info("Ray ready in %.1f s: %s", time.monotonic() - started_at, ray.cluster_resources())
        self.task = ray.remote(num_cpus=self.resources.cpus, num_gpus=self.resources.gpus,
                               max_retries=MAX_RETRIES)(run_trial)
        self.slots = _slots(self.resources)

    def _collect(self) -> None:
        import ray

        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=POLL_SECONDS)
        for ref in ready:
            claim, _ = self.in_flight.pop(ref)
            self.outcomes.append(self._outcome(ref, claim))

    def _outcome(self, ref: object, claim: Claim) -> TrialOutcome:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as err:  # the worker died more often than Ray retries, or a bug in the task
            lines = str(err).strip().splitlines()
            return self._fail(claim, f"{type(err).__name__}: {one_line(lines[-1] if lines else '')}")

    def _fail(self, claim: Claim, reason: str) -> TrialOutcome:
        state = ledger.finish(self.searches.storage, claim.trial_id, "FAIL", error=reason)
        return TrialOutcome(claim, state, error=reason)

    def _fail_unschedulable(self) -> None:
        """A trial still unplaced after the bound, with no node left that fits it, fails with that reason."""
        for ref, (claim, since) in list(self.in_flight.items()):
            if time.monotonic() - since < self.unschedulable or started(self.searches.storage.get_trial(claim.trial_id)):
                continue
            reason = cluster.unschedulable_reason(self.resources.cpus, self.resources.gpus)
            if reason is not None:
                import ray

                ray.cancel(ref, force=True)
                del self.in_flight[ref]
                self.outcomes.append(self._fail(claim, reason))


def _slots(resources: Resources) -> int:
    """How many trials the cluster can run at once: what each node fits, summed (a trial runs on one node)."""
    def fits(cpus: float, gpus: float) -> int:
        return int(min(cpus // resources.cpus, gpus // resources.gpus if resources.gpus > 0 else float("inf")))

    return max(1, sum(fits(cpus, gpus) for _, cpus, gpus in cluster.node_offers()))
