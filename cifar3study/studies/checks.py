"""A study checked against params.yaml before any work: every bound and choice as the stages would validate it.

Each value a trial could take is applied to params.yaml and parsed by the
same code the stages use, so a trial that would fail its first stage is
refused here, in one line, before Ray or the ledger is touched.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from cifar3study.errors import quote
from cifar3study.params import ParamError, parse_params
from cifar3study.studies.spec import MAX_TRIALS, Study, StudyError, apply_overrides, parse_study, read_yaml, require

MAX_EDGE_COMBOS = 256  # corner combinations validated together (rules that span keys); beyond, one key at a time


def _validate(params: dict, overrides: dict[str, object], path: Path, what: str) -> dict:
    try:
        parse_params(apply_overrides(params, overrides))
    except ParamError as err:
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        raise StudyError(f"{path}: {what} {quote(shown)} is refused: {err}") from err
    return overrides


def _edge_combos(study: Study, model: str) -> list[dict[str, object]]:
    """Every corner of the model's space when there are few, else each value of each key alone."""
    dims = [study.space[k] for k in study.keys_for(model)]
    if math.prod(len(d.edges()) for d in dims) <= MAX_EDGE_COMBOS:
        return [dict(zip([d.key for d in dims], combo, strict=True)) for combo in itertools.product(*(d.edges() for d in dims))]
    return [{d.key: value} for d in dims for value in d.edges()]


def _check_holdout(study: Study, params: dict, path: Path) -> None:
    holdout = study.fixed.get("data.holdout", params["data"].get("holdout", 0.0))
    if study.select == "holdout":
        require(isinstance(holdout, (int, float)) and holdout > 0, path, "select",
                "is holdout, so set a holdout to rank on: set: {data.holdout: 0.2} (or select: val, optimistic)")
    else:
        require(holdout == 0, path, "select", "is val (the test split), so data.holdout must stay 0")


def _search_seeds(study: Study, params: dict) -> set[int]:
    seeds = set(study.fixed.get("train.seeds", params["train"]["seeds"]))
    if "train.seeds" in study.space:
        seeds |= {s for choice in study.space["train.seeds"].choices for s in choice}
    return seeds


def _check_final(study: Study, params: dict, path: Path) -> None:
    if not study.final_seeds:
        return
    shared = sorted(set(study.final_seeds) & _search_seeds(study, params))
    require(not shared, path, "final.seeds", f"shares seeds {shared} with the search; refits need seeds of their own")
    _validate(params, {**study.fixed, **study.final_overrides()}, path, "the final refit")


def check_study(study: Study, params: dict, path: Path) -> None:
    """Refuse, in one line, anything a trial or a final refit of `study` would fail on."""
    _check_holdout(study, params, path)
    for model in study.models:
        require(bool(study.keys_for(model)), path, "models", f"lists {model}, but nothing searched changes it")
        require(study.trials_for(model) <= MAX_TRIALS, path, "grid",
                f"makes {study.trials_for(model)} trials for {model}, more than {MAX_TRIALS}; split the study")
        for combo in _edge_combos(study, model):
            _validate(params, {**combo, **study.fixed}, path, "the trial")
    _check_final(study, params, path)


def load_study(path: Path, params_path: Path) -> tuple[Study, dict]:
    """The study, checked, and the params.yaml mapping its trials' overrides apply to."""
    params = read_yaml(params_path, "params file")
    if not isinstance(params, dict):
        raise StudyError(f"{params_path} is not a mapping; fix params.yaml")
    study = parse_study(read_yaml(path, "study file"), path, params)
    check_study(study, params, path)
    return study, params
