"""params.yaml, loaded once into typed, validated dataclasses.

Every stage calls `load_params` first, so an unknown key or a bad value
stops the pipeline before any work, with a message naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from pathlib import Path

import yaml

from cifar3study.errors import StageError, quote

ACTIVATIONS = ("tanh", "relu", "leaky_relu")
DEVICES = ("auto", "cpu", "cuda", "mps")
ARCHS = ("fc", "cnn")
CONV_KEYS = ("channels", "kernel_size", "padding", "pool")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes no more
MD5_PATTERN = re.compile(r"[0-9a-f]{32}")
# DVC pastes a models key into shell commands and output paths (train@<key>): nothing but this form may pass.
MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MODEL_NAME_FORM = "[a-z][a-z0-9_]* (a lowercase letter, then lowercase letters, digits or _; at most 32)"
IMAGE_SIDE = 32  # px, CIFAR images are 32 x 32
MAX_WIDTH = 65_536  # 16x VGG's widest layer (4,096); one such layer after the 3,072 inputs is 0.8 GB per seed
MAX_CHANNELS = 4_096  # 2x ResNet-50's widest conv; at 32 px one such layer holds 16 MB of activations per image
MAX_LAYERS = 64  # plain stacks this deep (no residuals, no normalisation) do not train
MAX_SEEDS = 64  # a spread needs a handful; the group trains together, so memory and time grow with it
MAX_EPOCHS = 10_000  # 100x the default, 12 h per FC seed on 2 CPU cores: more is a typo
MAX_BATCH = 60_000  # all of CIFAR-10 (50,000 + 10,000 images): a larger batch is the same whole split
MAX_YAML_DEPTH = 50  # params.yaml nests 3 deep; deeper documents would only exhaust the parser's recursion
# Timers and socket timeouts overflow (a traceback from a thread) long before a finite float runs out.
MAX_TIMEOUT = 3_600  # s, an hour without a byte is a dead server
MAX_DEADLINE = 86_400  # s, a day: the archive is 163 MB, 2 KB/s would still fit
MAX_HOLDOUT = 0.5  # fraction of the training images held out; more would train on less than is held out
# CIFAR-10's training images of each class (data/cifar10_format.py; params sits below the data layer, a test keeps
# the two equal): data.holdout is checked against it before any split exists, the train stage against the split.
TRAIN_IMAGES_PER_CLASS = 5_000


class ParamError(StageError):
    """A params.yaml key is unknown, missing or has a bad value."""


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        key = quote(key).strip("'")
        raise ParamError(f"params.yaml: {key} {why}; fix it in params.yaml or with `dvc exp run -S {key}=...`")


@dataclasses.dataclass(frozen=True)
class DataParams:
    url: str
    md5: str
    timeout: float
    retries: int
    deadline: float
    classes: tuple[str, ...]
    holdout: float  # fraction of each class's training images held out for selection; 0: none (evaluate on val)
    holdout_seed: int

    def validate(self, prefix: str) -> None:
        _check(MD5_PATTERN.fullmatch(self.md5) is not None, f"{prefix}.md5", "must be 32 lowercase hex digits")
        _check(0 < self.timeout <= MAX_TIMEOUT, f"{prefix}.timeout", f"must be > 0 and at most {MAX_TIMEOUT} seconds")
        _check(self.retries >= 1, f"{prefix}.retries", "must be >= 1")
        _check(self.timeout <= self.deadline <= MAX_DEADLINE, f"{prefix}.deadline",
               f"must be >= data.timeout seconds and at most {MAX_DEADLINE} (a day)")
        _check(len(self.classes) >= 2, f"{prefix}.classes", "must name at least 2 classes")
        _check(len(set(self.classes)) == len(self.classes), f"{prefix}.classes", "must not repeat a class")
        _check(0 <= self.holdout <= MAX_HOLDOUT, f"{prefix}.holdout", f"must be 0 (none) to {MAX_HOLDOUT}")
        _check(0 <= self.holdout_seed <= MAX_SEED, f"{prefix}.holdout_seed", f"must be between 0 and {MAX_SEED}")


@dataclasses.dataclass(frozen=True)
class ModelParams:
    arch: str
    activation: str
    hidden: tuple[int, ...]
    # Conv-only settings: required for arch cnn, refused for arch fc (they would do nothing).
    channels: tuple[int, ...] | None = None
    kernel_size: int | None = None
    padding: int | None = None
    pool: int | None = None

    def validate(self, prefix: str) -> None:
        _check(self.arch in ARCHS, f"{prefix}.arch", f"must be one of {', '.join(ARCHS)}")
        _check(self.activation in ACTIVATIONS, f"{prefix}.activation", f"must be one of {', '.join(ACTIVATIONS)}")
        _check(len(self.hidden) >= (1 if self.arch == "cnn" else 0), f"{prefix}.hidden", "must list layer widths")
        _check(len(self.hidden) <= MAX_LAYERS, f"{prefix}.hidden", f"must list at most {MAX_LAYERS} layers")
        _check(all(0 < h <= MAX_WIDTH for h in self.hidden), f"{prefix}.hidden", f"widths must be 1 to {MAX_WIDTH}")
        for name in CONV_KEYS:
            given = getattr(self, name) is not None
            why = "is missing" if self.arch == "cnn" else "applies only to arch: cnn"
            _check(given == (self.arch == "cnn"), f"{prefix}.{name}", why)
        if self.arch == "cnn":
            self._validate_convs(prefix)

    def _validate_convs(self, prefix: str) -> None:
        ok = 1 <= len(self.channels) <= MAX_LAYERS and all(0 < c <= MAX_CHANNELS for c in self.channels)
        _check(ok, f"{prefix}.channels", f"must list 1 to {MAX_LAYERS} conv channel counts of 1 to {MAX_CHANNELS}")
        _check(0 < self.kernel_size <= IMAGE_SIDE, f"{prefix}.kernel_size", f"must be 1 to {IMAGE_SIDE} (the image)")
        # Padding of kernel_size or more adds output pixels that see nothing but zeros.
        _check(0 <= self.padding < self.kernel_size, f"{prefix}.padding", "must be >= 0 and < kernel_size")
        _check(0 < self.pool <= IMAGE_SIDE, f"{prefix}.pool", f"must be 1 to {IMAGE_SIDE} (the image)")
        _check(conv_sides(self)[-1] >= 1, f"{prefix}.channels",
               f"has more conv + pool layers than {IMAGE_SIDE} px images allow; use fewer, a smaller pool or more padding")


def conv_output_size(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a conv or pool along one axis, as torch computes it: floor((n + 2p - k) / s) + 1."""
    return (n + 2 * padding - kernel) // stride + 1


def conv_sides(cfg: ModelParams) -> list[int]:
    """Image side after each conv and each pool of a CNN, in order (training.models.ConvNet's arithmetic)."""
    sides, side = [], IMAGE_SIDE
    for _ in cfg.channels:
        side = conv_output_size(side, cfg.kernel_size, 1, cfg.padding)
        sides.append(side)
        side = conv_output_size(side, cfg.pool, cfg.pool, 0) if side >= 1 else side
        sides.append(side)
    return sides


@dataclasses.dataclass(frozen=True)
class TrainParams:
    device: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seeds: tuple[int, ...]
    deterministic: bool
    channels_last: bool
    tf32: bool

    def validate(self, prefix: str) -> None:
        _check(self.device in DEVICES, f"{prefix}.device", f"must be one of {', '.join(DEVICES)}")
        _check(1 <= self.epochs <= MAX_EPOCHS, f"{prefix}.epochs", f"must be 1 to {MAX_EPOCHS}")
        _check(1 <= self.batch_size <= MAX_BATCH, f"{prefix}.batch_size", f"must be 1 to {MAX_BATCH}")
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(self.momentum >= 0, f"{prefix}.momentum", "must be >= 0")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _check(len(self.seeds) >= 1, f"{prefix}.seeds", "must list at least one seed")
        _check(len(self.seeds) <= MAX_SEEDS, f"{prefix}.seeds", f"must list at most {MAX_SEEDS} seeds")
        _check(len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds", "must not repeat a seed")
        _check(all(0 <= s <= MAX_SEED for s in self.seeds), f"{prefix}.seeds", f"must be between 0 and {MAX_SEED}")


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    batch_size: int

    def validate(self, prefix: str) -> None:
        _check(1 <= self.batch_size <= MAX_BATCH, f"{prefix}.batch_size", f"must be 1 to {MAX_BATCH}")


@dataclasses.dataclass(frozen=True)
class VisualizeParams:
    model: str
    seed: int

    def validate(self, prefix: str) -> None:
        pass  # checked against the models and train sections in parse_params


@dataclasses.dataclass(frozen=True)
class MlflowParams:
    experiment: str

    def validate(self, prefix: str) -> None:
        _check(bool(self.experiment.strip()), f"{prefix}.experiment", "must not be empty")


@dataclasses.dataclass(frozen=True)
class Params:
    data: DataParams
    models: dict[str, ModelParams]
    train: TrainParams
    evaluate: EvaluateParams
    visualize: VisualizeParams
    mlflow: MlflowParams


def _coerce(value: object, hint: object, key: str) -> object:
    """Check one YAML value against a field's type hint; ints pass as floats."""
    if type(None) in typing.get_args(hint):  # `X | None`: an optional field that was given
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        _check(isinstance(value, list), key, "must be a list")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        _check(isinstance(value, bool), key, "must be true or false")
    elif hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "must be an integer")
    elif hint is float:
        if isinstance(value, str):  # PyYAML reads `1e-2` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "must be a number")
        _check(math.isfinite(value), key, "must be a finite number")
        return float(value)
    elif hint is str:
        _check(isinstance(value, str), key, "must be a string")
    return value


def _section(cls: type, raw: object, prefix: str) -> object:
    _check(isinstance(raw, dict), prefix, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        _check(key in fields, f"{prefix}.{key}", f"is not a known key (known: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        if name not in raw:
            required = field.default is dataclasses.MISSING
            _check(not required, f"{prefix}.{name}", "is missing")
            continue
        values[name] = _coerce(raw[name], hints[name], f"{prefix}.{name}")
    obj = cls(**values)
    obj.validate(prefix)
    return obj


def parse_params(raw: object) -> Params:
    """Validate a params mapping (as read from YAML) into `Params`."""
    _check(isinstance(raw, dict), "(top level)", "must be a mapping")
    sections = {"data": DataParams, "models": None, "train": TrainParams, "evaluate": EvaluateParams,
                "visualize": VisualizeParams, "mlflow": MlflowParams}
    for key in raw:
        _check(key in sections, key, f"is not a known section (known: {', '.join(sections)})")
    for key in sections:
        _check(key in raw, key, "section is missing")
    models = raw["models"]
    _check(isinstance(models, dict) and len(models) > 0, "models", "must map model names to their settings")
    for name in models:
        if not (isinstance(name, str) and MODEL_NAME.fullmatch(name)):
            raise ParamError(f"params.yaml: models key {quote(name)} must match {MODEL_NAME_FORM}; "
                             "DVC pastes it into commands and paths: rename it")
    params = Params(
        data=_section(DataParams, raw["data"], "data"),
        models={name: _section(ModelParams, cfg, f"models.{name}") for name, cfg in models.items()},
        train=_section(TrainParams, raw["train"], "train"),
        evaluate=_section(EvaluateParams, raw["evaluate"], "evaluate"),
        visualize=_section(VisualizeParams, raw["visualize"], "visualize"),
        mlflow=_section(MlflowParams, raw["mlflow"], "mlflow"),
    )
    drawn = params.models.get(params.visualize.model)
    _check(drawn is not None and drawn.arch == "cnn", "visualize.model", "must name a model with arch: cnn")
    _check(params.visualize.seed in params.train.seeds, "visualize.seed", "must be one of train.seeds")
    _check_holdout_batches(params.data.holdout, params.train.batch_size)
    return params


def _check_holdout_batches(holdout: float, batch_size: int) -> None:
    """Both parts of each class hold a training batch or more (counted as data.dataset.holdout_count rounds)."""
    held = round(TRAIN_IMAGES_PER_CLASS * holdout)
    if holdout > 0 and min(held, TRAIN_IMAGES_PER_CLASS - held) < batch_size:
        raise ParamError(f"params.yaml: data.holdout {holdout:g} holds out {held} of each class's "
                         f"{TRAIN_IMAGES_PER_CLASS:,} training images, fewer than one batch (train.batch_size "
                         f"{batch_size}); raise data.holdout or lower train.batch_size")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing repeated keys (PyYAML keeps the last), list or mapping keys, and deep nesting."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ParamError(f"params.yaml nests deeper than {MAX_YAML_DEPTH} levels (line {line}); "
                                 "it needs 3: flatten it")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ParamError(f"params.yaml: a key on line {key_node.start_mark.line + 1} is a list or mapping; "
                                 "keys must be plain names")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ParamError(f"params.yaml: key {quote(key)} is given twice (line {key_node.start_mark.line + 1}); "
                                 "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path) -> Params:
    """Read and validate params.yaml."""
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except OSError as err:
        raise StageError(f"cannot read params file {path}: {err.strerror}; run from the repository root") from err
    except yaml.YAMLError as err:
        raise ParamError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix its syntax") from err
    return parse_params(raw)


def model_params(params: Params, name: str) -> ModelParams:
    if name not in params.models:
        raise ParamError(f"params.yaml: models.{name} does not exist (known: {', '.join(params.models)}); add it or pick another")
    return params.models[name]


def archive_source(data: DataParams, env: Mapping[str, str]) -> tuple[str, str]:
    """The archive's URL and MD5: params, unless CIFAR10_URL / CIFAR10_MD5 are set (mirrors)."""
    md5 = (env.get("CIFAR10_MD5") or data.md5).lower()
    if MD5_PATTERN.fullmatch(md5) is None:
        raise ParamError(f"CIFAR10_MD5 is {quote(md5)}, not 32 hex digits; set it to the mirror's MD5 or unset it")
    return env.get("CIFAR10_URL") or data.url, md5
