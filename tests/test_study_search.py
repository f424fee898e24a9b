"""The ledger's claims: a study's slots handed out once each, to one driver or to two real ones at once.

A real Optuna SQLite ledger in a temporary folder; the drivers are real
processes, so the ledger's lock and Optuna's storage are what keep them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar3study.studies.search import Searches
from cifar3study.studies.spec import Dimension, Prune, Resources, Search, Study, StudyError
from cifar3study.tracking import ledger
from tests.helpers import ROOT

BASE = "c" * 40
SPACE = {"train.lr": Dimension("train.lr", "float", 0.001, 0.1, log=True),
         "train.batch_size": Dimension("train.batch_size", "choice", choices=(32, 64)),
         "models.cnn.channels": Dimension("models.cnn.channels", "choice", choices=([16, 8], [8, 4]))}


def make_study(sampler: str = "tpe", trials: int = 6, seed: int = 0, final: tuple[int, ...] = (10, 11)) -> Study:
    space = SPACE if sampler != "grid" else {k: d for k, d in SPACE.items() if d.kind == "choice"}
    return Study("s", ("fc", "cnn"), space, Search(sampler, trials, seed), Prune(), {"train.epochs": 2}, "holdout",
                 final, Resources())


def searches(tmp_path: Path, study: Study | None = None, lease: float = 60.0) -> Searches:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    found = Searches(ledger.open_storage(url), url, study or make_study(), BASE, lease)
    found.open()
    return found


def claim_all(found: Searches) -> list:
    out = []
    while (claim := found.claim()) is not None:
        out.append(claim)
    return out


def test_each_slot_is_claimed_once_with_its_models_keys_only(tmp_path: Path) -> None:
    found = searches(tmp_path)
    claims = claim_all(found)
    assert [c.model for c in claims].count("fc") == 6 and [c.model for c in claims].count("cnn") == 6
    assert len({(c.model, c.number) for c in claims}) == 12 and len({c.key for c in claims}) == 12
    assert all("models.cnn.channels" not in c.overrides for c in claims if c.model == "fc")
    assert all(c.overrides["models.cnn.channels"] in ([16, 8], [8, 4]) for c in claims if c.model == "cnn")
    assert all(c.overrides["train.epochs"] == 2 and 0.001 <= c.overrides["train.lr"] <= 0.1 for c in claims)
    assert {c.name for c in claims if c.model == "fc"} == {f"s-fc-{n}" for n in range(6)}
    me = ledger.Lease.mine(1).owner
    assert all(ledger.read_lease(found.storage.get_trial(c.trial_id)).owner == me for c in claims)
    assert found.claim() is None  # every slot is held: nothing more is drawn


def test_a_grid_gives_every_combination_exactly_once(tmp_path: Path) -> None:
    found = searches(tmp_path, make_study("grid"))
    claims = claim_all(found)
    cnn = sorted(json.dumps(c.overrides, sort_keys=True) for c in claims if c.model == "cnn")
    assert len(cnn) == 4 and len(set(cnn)) == 4
    assert sorted(c.overrides["train.batch_size"] for c in claims if c.model == "fc") == [32, 64]


def test_a_dead_drivers_trial_is_taken_over_not_redrawn(tmp_path: Path) -> None:
    found = searches(tmp_path)
    first = found.claim()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    dead = ledger.Lease("box:1:1", ledger.Lease.mine(1).host, gone.pid, 1.0, time.time() + 3600)
    ledger.write_lease(found.storage, first.trial_id, dead)
    again = found.claim()
    assert (again.trial_id, again.overrides, again.key) == (first.trial_id, first.overrides, first.key)


def test_a_failed_trial_keeps_its_slot_until_a_rerun_retries_its_configuration(tmp_path: Path) -> None:
    found = searches(tmp_path, make_study(trials=2, final=()))
    claims = claim_all(found)
    ledger.finish(found.storage, claims[0].trial_id, "FAIL", error="boom")
    assert found.claim() is None  # no new draw replaces it in this run
    rerun = searches(tmp_path, make_study(trials=2, final=()))
    retry = rerun.claim()
    assert retry.overrides == claims[0].overrides and retry.number != claims[0].number
    assert rerun.storage.get_trial(retry.trial_id).user_attrs["retry_of"] == claims[0].number
    assert rerun.claim() is None


def test_the_winner_is_refit_once_the_search_is_over_then_the_study_is_finished(tmp_path: Path) -> None:
    study = make_study(trials=2)
    found = searches(tmp_path, study)
    claims = claim_all(found)
    for value, claim in zip([0.5, 0.7, 0.6, 0.4], claims, strict=True):
        ledger.finish(found.storage, claim.trial_id, "COMPLETE", value)
    finals = claim_all(found)
    assert {c.model for c in finals} == {"fc", "cnn"} and {c.phase for c in finals} == {"final"}
    fc_best = max((c for c in claims if c.model == "fc"), key=lambda c: [0.5, 0.7, 0.6, 0.4][claims.index(c)])
    fc_final = next(c for c in finals if c.model == "fc")
    assert fc_final.overrides == {**fc_best.overrides, **study.final_overrides()}
    assert not found.finished()
    for claim in finals:
        ledger.finish(found.storage, claim.trial_id, "COMPLETE", 0.8)
    assert found.finished() and found.claim() is None


def test_a_changed_study_under_the_same_name_is_refused(tmp_path: Path) -> None:
    searches(tmp_path)
    with pytest.raises(StudyError, match="already in the ledger with another definition"):
        searches(tmp_path, make_study(seed=1))


ROUNDS, DRIVERS = 6, 3
CLAIMER = """
import dataclasses, json, sys, time
from cifar3study.studies.search import Searches
from cifar3study.tracking import ledger
sys.path.insert(0, {tests!r})
from tests.test_study_search import make_study
url = {url!r}
mine = []
for round in range({rounds}):  # a study of one slot per model, all drivers reaching for it at the same moment
    study = dataclasses.replace(make_study(trials=1, final=()), name=f"race{{round}}")
    found = Searches(ledger.open_storage(url), url, study, {base!r}, 60.0)
    found.open()
    time.sleep(max(0.0, {start} + round - time.time()))
    while (claim := found.claim()) is not None:
        mine.append([round, claim.model, claim.number])
        ledger.finish(found.storage, claim.trial_id, "COMPLETE", 0.5)  # done: a late driver finds nothing to take over
print(json.dumps(mine))
"""


def test_drivers_started_at_once_share_the_slots_and_none_is_run_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searches(tmp_path)  # the ledger's tables exist before the race
    code = CLAIMER.format(tests=str(ROOT), url=url, base=BASE, rounds=ROUNDS, start=time.time() + 10)
    drivers = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
               for _ in range(DRIVERS)]
    claimed = [json.loads(d.communicate(timeout=300)[0]) for d in drivers]
    assert all(d.returncode == 0 for d in drivers)
    together = [tuple(c) for mine in claimed for c in mine]
    assert sorted(together) == sorted((r, m, 0) for r in range(ROUNDS) for m in ("fc", "cnn"))  # one claim per slot
