"""A study file (`studies/<name>.yaml`): what to search per model, how to select, and the final refits.

Either a `grid` (every combination, each value a `dvc exp run -S` override)
or a `space` of `float`, `int` and `choice` dimensions searched by a sampler.
Each model is searched on its own, over the keys that apply to it (`train.*`
and `data.*` to all, `models.<name>.*` to that model). Every bound and choice
is applied to params.yaml and validated as the stages would, so a bad key or
value stops the study before Ray starts, in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import yaml

from cifar3study.errors import StageError, quote

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # used in experiment names, tags and report folders


class StudyError(StageError):
    """The study file is unreadable or asks for something params.yaml refuses."""


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


def require(ok: bool, path: Path, key: str, why: str) -> None:
    if not ok:
        raise StudyError(f"{path}: {quote(key).strip(chr(39))} {why}; fix the study file")


def number(value: object, integral: bool = False) -> bool:
    """A finite YAML number (not a bool); an integer when `integral`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return isinstance(value, int) or not integral


def has_key(params: object, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(params, dict) or part not in params:
            return False
        params = params[part]
    return True


def apply_overrides(params: dict, overrides: dict[str, object]) -> dict:
    """params.yaml's mapping with dotted overrides applied, as `dvc exp run -S` applies them."""
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return out


MAX_TRIALS = 256  # per model: a larger search is almost always a typo; split it into several studies
KNOWN_KEYS = ("name", "models", "grid", "space", "search", "prune", "set", "select", "final", "resources")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("asha", "median", "none")
DEFAULT_FINAL_SEEDS = (10, 11, 12, 13, 14)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched key: a float or int range (log-uniform if `log`), or a list of choices."""

    key: str
    kind: str  # float | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[object, ...] = ()

    def edges(self) -> list[object]:
        """The values validation tries: both bounds, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for; fractions share a CPU or GPU between trials."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class Search:
    sampler: str  # tpe | random | grid
    trials: int  # per model (a grid: its size)
    seed: int


@dataclasses.dataclass(frozen=True)
class Prune:
    pruner: str = "none"  # asha | median | none
    min_epochs: int = 1  # no trial stops before this many epochs
    reduction: int = 3  # asha: a third of the trials go on at each rung

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    models: tuple[str, ...]
    space: dict[str, Dimension]
    search: Search
    prune: Prune
    fixed: dict[str, object]  # the file's `set`: the same override in every trial
    select: str  # holdout | val: the split trials are ranked on
    final_seeds: tuple[int, ...]  # () when the study has no final phase
    resources: Resources

    def keys_for(self, model: str) -> list[str]:
        """The searched keys that change `model`: everything but other models' settings."""
        return [k for k in self.space if not k.startswith("models.") or k.startswith(f"models.{model}.")]

    def trials_for(self, model: str) -> int:
        if self.search.sampler != "grid":
            return self.search.trials
        return math.prod(len(self.space[k].choices) for k in self.keys_for(model))

    def final_overrides(self) -> dict[str, object]:
        """What a final refit changes on top of the winner's overrides: the full training split, the final seeds."""
        seeds = list(self.final_seeds)
        return {"data.holdout": 0.0, "train.seeds": seeds, "visualize.seed": seeds[0]}

    def digest(self) -> str:
        """What makes two runs of a study the same search (resources do not change results)."""
        shown = {k: v for k, v in dataclasses.asdict(self).items() if k != "resources"}
        return hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trial_key(study: str, base: str, model: str, phase: str, number: int) -> str:
    """Names a trial's runs and experiment: one study, commit, model, phase and trial number."""
    text = json.dumps([study, base, model, phase, number])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _dimension(key: str, raw: object, path: Path) -> Dimension:
    where = f"space.{key}"
    require(isinstance(raw, dict) and len(set(raw) & {"float", "int", "choice"}) == 1, path, where,
            "must be one of {float: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]} (log: true optional)")
    kind = next(k for k in ("float", "int", "choice") if k in raw)
    require(set(raw) <= {kind, "log"}, path, where, f"has unknown keys (known: {kind}, log)")
    values, log = raw[kind], raw.get("log", False)
    require(isinstance(log, bool) and not (log and kind == "choice"), path, f"{where}.log", "must be true or false (ranges only)")
    require(isinstance(values, list) and len(values) >= 1, path, f"{where}.{kind}", "must be a non-empty list")
    if kind == "choice":
        require(len(values) <= MAX_TRIALS, path, f"{where}.choice", f"lists more than {MAX_TRIALS} values")
        return Dimension(key, kind, choices=tuple(values))
    integral = kind == "int"
    require(len(values) == 2 and all(number(v, integral) for v in values) and values[0] < values[1], path,
            f"{where}.{kind}", f"must be [low, high] with low < high, {'integers' if integral else 'numbers'}")
    require(not log or values[0] > 0, path, f"{where}.{kind}", "must be > 0 on a log scale")
    return Dimension(key, kind, values[0], values[1], log)


def _space(raw: dict, path: Path, params: dict) -> tuple[dict[str, Dimension], bool]:
    """The `space`, or a `grid` as a space of choices; True for a grid."""
    require(("grid" in raw) != ("space" in raw), path, "grid", "or space: give exactly one of them")
    section = "grid" if "grid" in raw else "space"
    given = raw[section]
    require(isinstance(given, dict) and len(given) > 0, path, section, "must map dotted params keys to values")
    for key in given:
        require(isinstance(key, str) and has_key(params, key), path, f"{section}.{key}",
                "is not a key of params.yaml (dotted, as in `dvc exp run -S train.lr=...`)")
        require(not key.startswith("data.holdout"), path, f"{section}.{key}",
                "cannot be searched: every trial must be ranked on the same holdout (put it in set)")
    if section == "space":
        return {k: _dimension(k, v, path) for k, v in given.items()}, False
    for key, values in given.items():
        require(isinstance(values, list) and len(values) > 0, path, f"grid.{key}", "must be a non-empty list of values")
    return {k: Dimension(k, "choice", choices=tuple(v)) for k, v in given.items()}, True


def _search(raw: object, path: Path, grid: bool) -> Search:
    if raw is None and grid:
        return Search("grid", 0, 0)
    require(isinstance(raw, dict), path, "search", "must be a mapping like {sampler: tpe, trials: 24, seed: 0}")
    require(set(raw) <= {"sampler", "trials", "seed"}, path, "search", "has unknown keys (known: sampler, trials, seed)")
    sampler, trials, seed = raw.get("sampler", "tpe"), raw.get("trials"), raw.get("seed", 0)
    require(sampler in SAMPLERS, path, "search.sampler", f"must be one of {', '.join(SAMPLERS)}")
    require(number(seed, True) and 0 <= seed < 2**32, path, "search.seed", "must be an integer 0 to 2**32 - 1")
    if sampler == "grid":
        require(trials is None, path, "search.trials", "is the grid's size with sampler grid; leave it out")
        return Search("grid", 0, seed)
    require(not grid, path, "search.sampler", "must be grid (or left out) for a grid; use space for tpe or random")
    require(number(trials, True) and 1 <= trials <= MAX_TRIALS, path, "search.trials", f"must be 1 to {MAX_TRIALS}")
    return Search(sampler, trials, seed)


def _prune(raw: object, path: Path) -> Prune:
    if raw is None:
        return Prune()
    require(isinstance(raw, dict), path, "prune", "must be a mapping like {pruner: asha, min_epochs: 2, reduction: 3}")
    fields = {f.name for f in dataclasses.fields(Prune)}
    require(set(raw) <= fields, path, "prune", f"has unknown keys (known: {', '.join(sorted(fields))})")
    pruned = Prune(**raw)
    require(pruned.pruner in PRUNERS, path, "prune.pruner", f"must be one of {', '.join(PRUNERS)}")
    require(number(pruned.min_epochs, True) and pruned.min_epochs >= 1, path, "prune.min_epochs", "must be an integer >= 1")
    require(number(pruned.reduction, True) and pruned.reduction >= 2, path, "prune.reduction", "must be an integer >= 2")
    return pruned


def _final(raw: object, path: Path) -> tuple[int, ...]:
    if raw is None:
        return DEFAULT_FINAL_SEEDS
    if raw is False or raw == "none":
        return ()
    require(isinstance(raw, dict) and set(raw) == {"seeds"}, path, "final", "must be {seeds: [10, 11, ...]} or none")
    seeds = raw["seeds"]
    ok = isinstance(seeds, list) and 2 <= len(seeds) <= 64 and all(number(s, True) and 0 <= s < 2**32 for s in seeds)
    require(ok and len(set(seeds)) == len(seeds), path, "final.seeds",
            "must list 2 to 64 distinct seeds (0 to 2**32 - 1): an interval needs at least two")
    return tuple(seeds)


def _resources(raw: object, path: Path) -> Resources:
    if raw is None:
        return Resources()
    require(isinstance(raw, dict), path, "resources", "must be a mapping like {cpus: 1, gpus: 0}")
    values = {}
    for key, value in raw.items():
        require(key in ("cpus", "gpus"), path, f"resources.{key}", "is not a known key (known: cpus, gpus)")
        require(number(value) and value >= 0, path, f"resources.{key}", "must be a number >= 0 (fractions share a device)")
        values[key] = float(value)
    require(values.get("cpus", 1.0) > 0, path, "resources.cpus", "must be > 0")
    return Resources(**values)


def _models(raw: object, path: Path, params: dict, space: dict[str, Dimension]) -> tuple[str, ...]:
    """The models searched: those listed, else every model the space changes (a model it leaves alone is not searched)."""
    known = list(params.get("models") or {})
    if raw is not None:
        ok = isinstance(raw, list) and len(raw) > 0 and all(m in known for m in raw) and len(set(raw)) == len(raw)
        require(ok, path, "models", f"must list distinct models of params.yaml (known: {', '.join(known)})")
        return tuple(raw)
    return tuple(m for m in known if any(not k.startswith("models.") or k.startswith(f"models.{m}.") for k in space))


def _fixed(raw: object, path: Path, params: dict, space: dict[str, Dimension]) -> dict[str, object]:
    if raw is None:
        return {}
    require(isinstance(raw, dict), path, "set", "must map dotted params keys (train.lr) to values")
    for key in raw:
        require(isinstance(key, str) and has_key(params, key), path, f"set.{key}",
                "is not a key of params.yaml (dotted, as in `dvc exp run -S train.lr=...`)")
        require(key not in space, path, f"set.{key}", "is also searched; keep it in one place")
    return dict(raw)


def parse_study(raw: object, path: Path, params: dict) -> Study:
    """The study a file's mapping describes, its syntax checked (see check_study for what params.yaml says)."""
    require(isinstance(raw, dict), path, "(top level)", "must be a mapping with name and grid or space")
    for key in raw:
        require(key in KNOWN_KEYS, path, str(key), f"is not a known key (known: {', '.join(KNOWN_KEYS)})")
    name = raw.get("name")
    require(isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None, path, "name",
            "must be lowercase letters, digits and -, starting with a letter or digit (at most 64)")
    space, grid = _space(raw, path, params)
    search = _search(raw.get("search"), path, grid)
    if search.sampler == "grid":
        require(all(d.kind == "choice" for d in space.values()), path, "search.sampler", "grid needs choice dimensions only")
    select = raw.get("select", "holdout")
    require(select in ("holdout", "val"), path, "select", "must be holdout (a split carved from training) or val")
    study = Study(name, _models(raw.get("models"), path, params, space), space, search, _prune(raw.get("prune"), path),
                  _fixed(raw.get("set"), path, params, space), select, _final(raw.get("final"), path),
                  _resources(raw.get("resources"), path))
    require(len(study.models) > 0, path, "space", "changes no model; search train.* keys or models.<name>.* keys")
    return study
