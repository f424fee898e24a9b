"""The checkpoint format: every seed's weights plus what it takes to rebuild and feed them, read back typed.

A checkpoint is a `torch.save` of plain tensors, strings, numbers and lists,
so it loads with `weights_only=True` (no pickle of code; a file that needs
more is refused, never loaded another way). Every reader names
the params.yaml entry it expects, and a file holding another architecture is
refused before any model is built from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from cifar3study.data.dataset import ChannelStats
from cifar3study.errors import StageError, one_line
from cifar3study.files import atomic_path
from cifar3study.params import ModelParams
from cifar3study.training.models import build_model

FORMAT = 2  # 2: a seed group (1: one model, before seed groups)


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    config: ModelParams
    classes: tuple[str, ...]
    stats: ChannelStats  # the normalisation the models were trained with
    seeds: tuple[int, ...]  # one model per seed, in this order
    holdout: tuple[float, int] | None = None  # (data.holdout, data.holdout_seed) held out of training; None: none


def save_checkpoint(path: Path, models: list[nn.Module], meta: CheckpointMeta) -> None:
    """Each seed's weights (contiguous, on the CPU) and the metadata; atomic."""
    if len(models) != len(meta.seeds):
        raise ValueError(f"{len(models)} models for {len(meta.seeds)} seeds")
    states = [{k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()} for m in models]
    payload = {"format": FORMAT, "config": dataclasses.asdict(meta.config), "classes": list(meta.classes),
               "mean": list(meta.stats.mean), "std": list(meta.stats.std), "seeds": list(meta.seeds), "states": states}
    if meta.holdout is not None:  # absent otherwise: a run without a holdout saves what it always saved
        payload["holdout"] = list(meta.holdout)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _meta(payload: dict) -> CheckpointMeta:
    if payload["format"] != FORMAT:
        raise ValueError(f"format {payload['format']!r}, expected {FORMAT}")
    raw = payload["config"]
    config = ModelParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    stats = ChannelStats(tuple(float(v) for v in payload["mean"]), tuple(float(v) for v in payload["std"]))
    holdout = payload.get("holdout")
    holdout = (float(holdout[0]), int(holdout[1])) if holdout is not None else None
    return CheckpointMeta(config, tuple(str(c) for c in payload["classes"]), stats, tuple(int(s) for s in payload["seeds"]),
                          holdout)


def _differences(config: ModelParams, other: ModelParams) -> str:
    """`config`'s settings that differ from `other`'s, each cut short: the file's could be anything."""
    theirs = dataclasses.asdict(other)
    shown = (f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in dataclasses.asdict(config).items()
             if v != theirs[k] and v is not None)
    return ", ".join(text if len(text) <= 60 else text[:57] + "..." for text in shown)


def _check_config(path: Path, found: ModelParams, expected: ModelParams, name: str) -> None:
    if found != expected:
        raise StageError(f"{path} holds a model with {_differences(found, expected)}, but params.yaml's "
                         f"models.{name} says {_differences(expected, found)}; rerun its train stage "
                         f"(dvc repro -f train@{name})")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and checked, its models not yet built."""

    path: Path
    meta: CheckpointMeta
    states: list[dict[str, torch.Tensor]]  # each seed's weights, in meta.seeds order


def _payload(path: Path, name: str) -> dict:
    """The file's contents, loaded weights-only; any failure in our words (torch's advice would be to unpickle it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # cut short, not a torch file, or objects beyond tensors: never loaded otherwise
        raise StageError(f"{path} is not a checkpoint of this project (unreadable: cut short, not a torch file, or "
                         f"holding objects other than tensors and plain values; {type(err).__name__}); "
                         f"rerun its train stage (dvc repro -f train@{name})") from err


def read_checkpoint(path: Path, expected: ModelParams, name: str | None = None) -> Checkpoint:
    """The file's metadata and weights, refused unless its architecture is `expected`; no model is built.

    `name` is the models entry `expected` comes from; by default the file's stem, as dvc.yaml names checkpoints.
    """
    name = name or Path(path).stem
    payload = _payload(path, name)
    try:
        meta = _meta(payload)
        states = list(payload["states"])
        if len(states) != len(meta.seeds):
            raise ValueError(f"{len(states)} weight sets for {len(meta.seeds)} seeds")
    except Exception as err:  # a foreign file that loads: one line, not a traceback
        raise StageError(f"{path} is not a checkpoint of this project ({type(err).__name__}: {one_line(err, 120)}); "
                         f"rerun its train stage (dvc repro -f train@{name})") from err
    _check_config(path, meta.config, expected, name)
    return Checkpoint(Path(path), meta, states)


def build_models(checkpoint: Checkpoint, name: str | None = None) -> dict[int, nn.Module]:
    """{seed: model on the CPU in eval mode} of a checkpoint read by `read_checkpoint`."""
    models = {}
    try:
        for seed, state in zip(checkpoint.meta.seeds, checkpoint.states, strict=True):
            models[seed] = build_model(checkpoint.meta.config, len(checkpoint.meta.classes))
            models[seed].load_state_dict(state)
            models[seed].eval()
    except Exception as err:  # weights of another shape or type
        raise StageError(f"{checkpoint.path} is not a checkpoint of this project ({type(err).__name__}: "
                         f"{one_line(err, 120)}); rerun its train stage "
                         f"(dvc repro -f train@{name or checkpoint.path.stem})") from err
    return models


def load_checkpoint(path: Path, expected: ModelParams, name: str | None = None) \
        -> tuple[dict[int, nn.Module], CheckpointMeta]:
    """({seed: model on the CPU in eval mode}, metadata), refused unless its architecture is `expected`."""
    checkpoint = read_checkpoint(path, expected, name)
    return build_models(checkpoint, name), checkpoint.meta
