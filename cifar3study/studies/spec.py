"""A study file (`studies/<name>.yaml`): a grid of `dvc exp run -S` overrides, checked against params.yaml.

Every trial's overrides are applied to params.yaml and validated as the
stages would, so a bad key or value stops the study before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
from pathlib import Path

import yaml

from cifar3study.errors import StageError, quote
from cifar3study.params import ParamError, parse_params

MAX_TRIALS = 256  # a larger grid is almost always a typo; split it into several studies
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # used in experiment names, tags and report folders
KNOWN_KEYS = ("name", "grid", "set", "resources")
RESOURCE_KEYS = ("cpus", "gpus")


class StudyError(StageError):
    """The study file is unreadable or asks for something params.yaml refuses."""


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for; fractions share a CPU or GPU between trials."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    grid: dict[str, list[object]]
    fixed: dict[str, object]  # the file's `set`: the same override in every trial
    resources: Resources

    @property
    def swept(self) -> list[str]:
        return list(self.grid)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One combination of the grid: its key (study, base commit, overrides) names its experiment and runs."""

    key: str
    name: str
    overrides: dict[str, object]
    models: tuple[str, ...]

    def set_args(self) -> list[str]:
        """`-S key=value` arguments; JSON is YAML, so DVC reads each value back as written."""
        return [arg for key, value in self.overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise StudyError(f"key {quote(key)} is given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str) -> object:
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except OSError as err:
        raise StudyError(f"cannot read {what} {path}: {err.strerror}; check the path") from err
    except yaml.YAMLError as err:
        raise StudyError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix its syntax") from err


def _require(ok: bool, path: Path, key: str, why: str) -> None:
    if not ok:
        raise StudyError(f"{path}: {quote(key).strip(chr(39))} {why}; fix the study file")


def _overrides(raw: object, path: Path, section: str, params: dict) -> dict[str, object]:
    if raw is None and section == "set":
        return {}
    _require(isinstance(raw, dict), path, section, "must map dotted params keys (train.lr) to values")
    for key in raw:
        _require(isinstance(key, str) and _has_key(params, key), path, f"{section}.{key}",
                 "is not a key of params.yaml (dotted, as in `dvc exp run -S train.lr=...`)")
    return dict(raw)


def _has_key(params: object, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(params, dict) or part not in params:
            return False
        params = params[part]
    return True


def _resources(raw: object, path: Path) -> Resources:
    if raw is None:
        return Resources()
    _require(isinstance(raw, dict), path, "resources", "must be a mapping like {cpus: 1, gpus: 0}")
    values = {}
    for key, value in raw.items():
        _require(key in RESOURCE_KEYS, path, f"resources.{key}", f"is not a known key (known: {', '.join(RESOURCE_KEYS)})")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        _require(ok, path, f"resources.{key}", "must be a number >= 0 (fractions share a device)")
        values[key] = float(value)
    _require(values.get("cpus", 1.0) > 0, path, "resources.cpus", "must be > 0")
    return Resources(**values)


def parse_study(raw: object, path: Path, params: dict) -> Study:
    """Validate a study mapping against the params.yaml mapping `params` (as read from YAML)."""
    _require(isinstance(raw, dict), path, "(top level)", "must be a mapping with name and grid")
    for key in raw:
        _require(key in KNOWN_KEYS, path, str(key), f"is not a known key (known: {', '.join(KNOWN_KEYS)})")
    name = raw.get("name")
    _require(isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None, path, "name",
             "must be lowercase letters, digits and -, starting with a letter or digit (at most 64)")
    grid = _overrides(raw.get("grid"), path, "grid", params)
    _require(len(grid) > 0, path, "grid", "is empty; list at least one key with its values")
    for key, values in grid.items():
        _require(isinstance(values, list) and len(values) > 0, path, f"grid.{key}", "must be a non-empty list of values")
    fixed = _overrides(raw.get("set"), path, "set", params)
    for key in fixed:
        _require(key not in grid, path, f"set.{key}", "is also in grid; keep it in one of them")
    count = math.prod(len(values) for values in grid.values())
    _require(count <= MAX_TRIALS, path, "grid", f"makes {count} trials, more than the cap of {MAX_TRIALS}; split the study")
    return Study(name, grid, fixed, _resources(raw.get("resources"), path))


def _apply(params: dict, overrides: dict[str, object]) -> dict:
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return out


def trial_key(study: str, base: str, overrides: dict[str, object]) -> str:
    text = json.dumps([study, base, sorted(overrides.items())], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trials(study: Study, params: dict, base: str, path: Path) -> list[Trial]:
    """Every combination of the grid, each validated as params.yaml would be after its overrides."""
    out = []
    for combo in itertools.product(*study.grid.values()):
        overrides = {**dict(zip(study.grid, combo)), **study.fixed}
        try:
            parsed = parse_params(_apply(params, overrides))
        except ParamError as err:
            shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
            raise StudyError(f"{path}: the trial {quote(shown)} is refused: {err}") from err
        key = trial_key(study.name, base, overrides)
        out.append(Trial(key, f"{study.name}-{key}", overrides, tuple(parsed.models)))
    return out


def load_study(path: Path, params_path: Path) -> tuple[Study, dict]:
    """The study and the params.yaml mapping its trials' overrides apply to."""
    params = read_yaml(params_path, "params file")
    if not isinstance(params, dict):
        raise StudyError(f"{params_path} is not a mapping; fix params.yaml")
    return parse_study(read_yaml(path, "study file"), path, params), params
