"""The study's searches in the ledger: each model's Optuna study, which trial runs next, and who holds it.

Every decision that hands out work (a new trial sampled, a failed one retried,
a dead driver's trial taken over, the winner's final refit) is taken under the
ledger's lock, so drivers started at once on one study share its trials and
none is run twice. A model's search has a fixed number of slots: a failed
trial keeps its slot until a later run of the study retries it with the same
configuration; a pruned one keeps it for good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from cifar3study.studies.spec import Dimension, Study, StudyError, trial_key
from cifar3study.tracking.ledger import STARTED_ATTR, Lease, ledger_lock, read_lease, write_lease

PHASES = ("search", "final")
SCALARS = (bool, int, float, str, type(None))  # what Optuna keeps as a choice; lists go in as JSON text


def encode(value: object) -> object:
    return value if isinstance(value, SCALARS) else json.dumps(value)


def decode(dim: Dimension, value: object) -> object:
    return next(c for c in dim.choices if encode(c) == value) if dim.kind == "choice" else value


def suggest(trial: optuna.Trial, dim: Dimension) -> object:
    """Draw (or, for a queued trial, read back) one dimension's value through Optuna's public API."""
    if dim.kind == "float":
        return trial.suggest_float(dim.key, float(dim.low), float(dim.high), log=dim.log)
    if dim.kind == "int":
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_categorical(dim.key, [encode(c) for c in dim.choices])


def make_sampler(study: Study, model: str, position: int) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded by the trial's position, so a restarted driver does not replay earlier draws."""
    seed = int.from_bytes(hashlib.sha256(f"{study.search.seed}/{model}/{position}".encode()).digest()[:4], "big")
    if study.search.sampler == "grid":
        return optuna.samplers.GridSampler({k: [encode(c) for c in study.space[k].choices] for k in study.keys_for(model)},
                                           seed=study.search.seed)
    if study.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(1, min(10, study.search.trials // 3))  # random draws before TPE models the scores
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A trial this driver runs now: where it is in the ledger and what it overrides."""

    model: str
    phase: str
    ledger_study: str
    trial_id: int
    number: int
    key: str
    name: str  # its DVC experiment
    overrides: dict[str, object]


def ledger_name(study: Study, model: str, phase: str, base: str) -> str:
    return f"{study.name}/{model}/{base[:12]}" + ("/final" if phase == "final" else "")


def slots_used(trials: list[FrozenTrial]) -> int:
    """Trials that hold a slot: all but the failed ones a later trial retries."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(not (t.state == TrialState.FAIL and t.number in retried) for t in trials)


def unretried_failures(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]


def winner(trials: list[FrozenTrial]) -> FrozenTrial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


class Searches:
    """Every model's search and final refit of one study at one commit, in one ledger."""

    def __init__(self, storage: optuna.storages.BaseStorage, url: str, study: Study, base: str, lease: float) -> None:
        self.storage, self.url, self.study, self.base, self.lease = storage, url, study, base, lease

    def _name(self, model: str, phase: str) -> str:
        return ledger_name(self.study, model, phase, self.base)

    def trials(self, model: str, phase: str) -> list[FrozenTrial]:
        try:
            study_id = self.storage.get_study_id_from_name(self._name(model, phase))
        except KeyError:
            return []
        return self.storage.get_all_trials(study_id, deepcopy=False)

    def open(self) -> None:
        """Create or load each model's studies (refusing one started with another definition); queue retries."""
        with ledger_lock(self.url, f"study:{self.study.name}"):
            for model in self.study.models:
                for phase in PHASES:
                    self._ensure(model, phase)
                    for failed in unretried_failures(self.trials(model, phase)):
                        self._load(model, phase).enqueue_trial(failed.params, user_attrs={
                            **failed.user_attrs, "retry_of": failed.number})

    def _ensure(self, model: str, phase: str) -> None:
        name = self._name(model, phase)
        found = optuna.create_study(study_name=name, storage=self.storage, direction="maximize", load_if_exists=True)
        attrs = found.user_attrs
        if not attrs:
            for key, value in {"definition": self.study.digest(), "study": self.study.name, "model": model,
                               "phase": phase, "base": self.base}.items():
                found.set_user_attr(key, value)
        elif attrs.get("definition") != self.study.digest():
            raise StudyError(f"study {self.study.name} at commit {self.base[:12]} is already in the ledger with another "
                             "definition; give the changed study a new name, or commit the change")

    def _load(self, model: str, phase: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
        return optuna.load_study(study_name=self._name(model, phase), storage=self.storage, sampler=sampler)

    def claim(self) -> Claim | None:
        """The next trial for this driver: a dead driver's, a queued one, a new draw, or a final refit; None if none."""
        with ledger_lock(self.url, f"study:{self.study.name}"):
            for model in self.study.models:
                for phase in PHASES:
                    found = self._stale(model, phase) or self._take(model, phase)
                    if found is not None:
                        return found
        return None

    def _stale(self, model: str, phase: str) -> Claim | None:
        for trial in self.trials(model, phase):
            if trial.state != TrialState.RUNNING:
                continue
            lease = read_lease(trial)
            orphan = lease is None and time.time() - trial.datetime_start.timestamp() > self.lease
            if orphan or (lease is not None and lease.stale()):
                return self._hold(model, phase, trial)
        return None

    def _take(self, model: str, phase: str) -> Claim | None:
        trials = self.trials(model, phase)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if phase == "search":
            if not waiting and slots_used(trials) >= self.study.trials_for(model):
                return None
            sampler = make_sampler(self.study, model, len(trials))
        elif not waiting and not self._queue_final(model, trials):
            return None
        else:
            sampler = optuna.samplers.RandomSampler()  # a final refit's params are fixed: nothing is drawn
        asked = self._load(model, phase, sampler).ask()
        for key in self.study.keys_for(model):
            suggest(asked, self.study.space[key])
        return self._hold(model, phase, self.storage.get_trial(asked._trial_id))

    def _queue_final(self, model: str, finals: list[FrozenTrial]) -> bool:
        """Queue the winner's refit once its search is over; True when one was queued."""
        best = self.search_over(model)
        if best is None or not self.study.final_seeds or any(t.user_attrs.get("refit_of") == best.number for t in finals):
            return False
        self._load(model, "final").enqueue_trial(best.params, user_attrs={"refit_of": best.number})
        return True

    def search_done(self, model: str) -> bool:
        """Every slot of the model's search has ended, and none in a failure still to retry."""
        trials = self.trials(model, "search")
        return (slots_used(trials) >= self.study.trials_for(model) and not unretried_failures(trials)
                and all(t.state.is_finished() for t in trials))

    def search_over(self, model: str) -> FrozenTrial | None:
        """The search's winner once it is done; None before, or when every trial was pruned."""
        return winner(self.trials(model, "search")) if self.search_done(model) else None

    def _hold(self, model: str, phase: str, trial: FrozenTrial) -> Claim:
        write_lease(self.storage, trial._trial_id, Lease.mine(self.lease))
        dims = {k: self.study.space[k] for k in self.study.keys_for(model)}
        overrides = {**self.study.fixed, **{k: decode(dims[k], trial.params[k]) for k in dims}}
        if phase == "final":
            overrides.update(self.study.final_overrides())
        key = trial_key(self.study.name, self.base, model, phase, trial.number)
        name = f"{self.study.name}-{model}-{'final' if phase == 'final' else ''}{trial.number}"
        for attr, value in (("name", name), ("key", key)):  # how to find its experiment and runs, from the ledger
            self.storage.set_trial_user_attr(trial._trial_id, attr, value)
        return Claim(model, phase, self._name(model, phase), trial._trial_id, trial.number, key, name, overrides)

    def renew(self, claims: list[Claim]) -> None:
        """Extend this driver's leases on the trials it runs (a trial that ended meanwhile is left alone)."""
        me = Lease.mine(self.lease).owner
        for claim in claims:
            trial = self.storage.get_trial(claim.trial_id)
            lease = read_lease(trial)
            if trial.state == TrialState.RUNNING and lease is not None and lease.owner == me:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    write_lease(self.storage, claim.trial_id, lease.renewed(self.lease))

    def finished(self) -> bool:
        """Every search over and every final refit of its winner complete."""
        return all(self._model_done(model) for model in self.study.models)

    def _model_done(self, model: str) -> bool:
        if not self.search_done(model):
            return False
        best = self.search_over(model)
        if best is None or not self.study.final_seeds:  # nothing to refit
            return True
        finals = [t for t in self.trials(model, "final") if t.user_attrs.get("refit_of") == best.number]
        return any(t.state == TrialState.COMPLETE for t in finals)

    def active(self) -> Iterator[FrozenTrial]:
        """Trials some driver still works on (RUNNING or queued), in every model and phase."""
        for model in self.study.models:
            for phase in PHASES:
                yield from (t for t in self.trials(model, phase) if not t.state.is_finished())


def started(trial: FrozenTrial) -> bool:
    """Its worker began under the current claim (a trial Ray has not placed yet is queued, not running)."""
    lease = read_lease(trial)
    return lease is not None and trial.system_attrs.get(STARTED_ATTR) == lease.owner
