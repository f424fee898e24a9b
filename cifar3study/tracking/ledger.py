"""The study ledger: Optuna's relational storage, shared by every driver, Ray worker and train stage of a study.

It holds each model's search (an Optuna study per study, model, phase and
commit), its trials with their sampled overrides, each epoch's holdout score,
and who runs what: a trial is claimed by moving it to RUNNING under the
ledger's lock and carries a lease that its driver renews, so two drivers never
run one trial and a dead driver's trials are taken over, not repeated. The
ledger is a SQLite file beside `mlflow.db` by default (one box), or
CIFAR3_LEDGER's URL (the team stack's PostgreSQL, for several boxes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from cifar3study.errors import StageError, one_line, quote

if TYPE_CHECKING:  # Optuna loads only where a ledger is used
    import optuna

LEDGER_ENV = "CIFAR3_LEDGER"  # URL of the ledger; default sqlite:///<repo>/optuna.db
DEFAULT_FILE = "optuna.db"
LEASE_ENV = "CIFAR3_LEASE_SECONDS"  # how long a claim outlives its driver's last renewal
DEFAULT_LEASE = 120.0
LEASE_ATTR = "cifar3:lease"
STARTED_ATTR = "cifar3:started"  # set by the worker: the trial is running, not queued
PRUNED_ATTR = "cifar3:pruned_at_epoch"  # set by the train stage when the pruner stopped it
SQLITE_WAIT = 60  # seconds a writer waits for SQLite's lock: many trials report epochs into one file
# What the train stage of a trial gets in its environment to report epochs and ask whether to stop.
TRIAL_ENV = ("CIFAR3_LEDGER", "CIFAR3_LEDGER_STUDY", "CIFAR3_LEDGER_TRIAL", "CIFAR3_PRUNER")


def ledger_url(env: Mapping[str, str], repo: Path) -> str:
    return env.get(LEDGER_ENV) or f"sqlite:///{Path(repo).resolve() / DEFAULT_FILE}"


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The ledger at `url`, its tables made on first use (under the lock, so two first users do not race)."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = {"connect_args": {"timeout": SQLITE_WAIT}} if _sqlite_path(url) else {"pool_pre_ping": True}
    try:
        with ledger_lock(url, "schema"):
            return optuna.storages.RDBStorage(url, engine_kwargs=args)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError) as err:
        raise StageError(f"cannot open the study ledger {quote(_shown(url))} ({one_line(err, 160)}); "
                         f"check {LEDGER_ENV} and that its database is up (make team-up)") from err


def _shown(url: str) -> str:
    """The URL without a password, should one be in it."""
    head, _, tail = url.rpartition("@")
    return f"{head.split(':')[0]}:***@{tail}" if ":" in head.split("//", 1)[-1] else url


@contextlib.contextmanager
def ledger_lock(url: str, name: str) -> Iterator[None]:
    """Exclusive across every process using this ledger: a file lock beside SQLite, an advisory lock in PostgreSQL."""
    path = _sqlite_path(url)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock", timeout=600):
            yield
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"cifar3:{name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as db:
            db.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                db.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def env_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A duration setting from the environment, 1 s to a day, refused in one line otherwise."""
    try:
        value = float(env.get(name) or default)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 86_400:
        raise StageError(f"{name} must be 1 to 86400 seconds, not {quote(env.get(name))}; fix or unset it")
    return value


@dataclasses.dataclass(frozen=True)
class Lease:
    """Who runs a claimed trial, and until when the claim holds without renewal."""

    owner: str  # the driver: host, pid and its start time, so a restart on the same box is told apart
    host: str
    pid: int
    started: float
    until: float

    @classmethod
    def mine(cls, seconds: float) -> Lease:
        me = psutil.Process()
        host = socket.gethostname()
        return cls(f"{host}:{me.pid}:{me.create_time():.3f}", host, me.pid, me.create_time(), time.time() + seconds)

    def renewed(self, seconds: float) -> Lease:
        return dataclasses.replace(self, until=time.time() + seconds)

    def stale(self) -> bool:
        """Past its time, or its driver is gone from this very box (no need to wait for the time then)."""
        if time.time() > self.until:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > 0.01
        except psutil.Error:
            return True


def read_lease(trial: optuna.trial.FrozenTrial) -> Lease | None:
    raw = trial.system_attrs.get(LEASE_ATTR)
    try:
        return Lease(**raw) if isinstance(raw, dict) else None
    except TypeError:
        return None


def write_lease(storage: optuna.storages.BaseStorage, trial_id: int, lease: Lease) -> None:
    storage.set_trial_system_attr(trial_id, LEASE_ATTR, dataclasses.asdict(lease))


def make_pruner(spec: Mapping[str, object]) -> optuna.pruners.BasePruner:
    """The pruner a study file names: asha (successive halving), median, or none."""
    import optuna

    kind, min_epochs = spec.get("pruner", "none"), int(spec.get("min_epochs", 1))
    if kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=int(spec["reduction"]),
                                                      min_early_stopping_rate=0)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("startup_trials", 2)),
                                           n_warmup_steps=min_epochs)
    return optuna.pruners.NopPruner()


class EpochReporter:
    """The train stage's line to its trial: each epoch's holdout score in, whether to stop out."""

    def __init__(self, env: Mapping[str, str]) -> None:
        import optuna

        storage = open_storage(env["CIFAR3_LEDGER"])
        pruner = make_pruner(json.loads(env.get("CIFAR3_PRUNER") or "{}"))
        study = optuna.load_study(study_name=env["CIFAR3_LEDGER_STUDY"], storage=storage, pruner=pruner)
        self.trial = optuna.trial.Trial(study, int(env["CIFAR3_LEDGER_TRIAL"]))
        self.storage = storage

    def report(self, epoch: int, score: float) -> bool:
        """Record the epoch's score; True when the pruner says this trial should stop now."""
        self.trial.report(score, epoch)
        if not self.trial.should_prune():
            return False
        self.storage.set_trial_system_attr(self.trial._trial_id, PRUNED_ATTR, epoch)
        return True


def epoch_reporter(env: Mapping[str, str]) -> EpochReporter | None:
    """The reporter of a study trial's train stage; None outside a study (plain `dvc repro`)."""
    if not all(env.get(name) for name in TRIAL_ENV[:3]):
        return None
    return EpochReporter(env)


def trial_env(url: str, study_name: str, trial_id: int, prune: Mapping[str, object]) -> dict[str, str]:
    """What a trial's stages need in their environment to find their trial (see epoch_reporter)."""
    return dict(zip(TRIAL_ENV, (url, study_name, str(trial_id), json.dumps(dict(prune))), strict=True))



def finish(storage: optuna.storages.BaseStorage, trial_id: int, state: str, value: float | None = None,
           **attrs: object) -> str:
    """End a trial COMPLETE, PRUNED or FAIL (a pruned one keeps its last epoch's score), unless it ended already.

    Returns the state it ended in, which is another attempt's when that attempt was first.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    trial = storage.get_trial(trial_id)
    if trial.state.is_finished():
        return trial.state.name
    for key, attr in attrs.items():
        storage.set_trial_user_attr(trial_id, key, attr)
    ending = TrialState[state]
    if ending == TrialState.PRUNED and value is None and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    with contextlib.suppress(UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, ending, None if value is None else [value])
    return storage.get_trial(trial_id).state.name
