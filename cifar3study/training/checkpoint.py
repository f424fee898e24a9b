"""The checkpoint format: every seed's weights plus what it takes to rebuild and feed them, read back typed.

A checkpoint is a `torch.save` of plain tensors, strings, numbers and lists,
so it loads with `weights_only=True` (no pickle of code). Every reader names
the params.yaml entry it expects, and a file holding another architecture is
refused before any model is built from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from cifar3study.data.dataset import ChannelStats
from cifar3study.errors import StageError
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


def save_checkpoint(path: Path, models: list[nn.Module], meta: CheckpointMeta) -> None:
    """Each seed's weights (contiguous, on the CPU) and the metadata; atomic."""
    if len(models) != len(meta.seeds):
        raise ValueError(f"{len(models)} models for {len(meta.seeds)} seeds")
    states = [{k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()} for m in models]
    payload = {"format": FORMAT, "config": dataclasses.asdict(meta.config), "classes": list(meta.classes),
               "mean": list(meta.stats.mean), "std": list(meta.stats.std), "seeds": list(meta.seeds), "states": states}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _meta(payload: dict) -> CheckpointMeta:
    if payload["format"] != FORMAT:
        raise ValueError(f"format {payload['format']!r}, expected {FORMAT}")
    raw = payload["config"]
    config = ModelParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    stats = ChannelStats(tuple(float(v) for v in payload["mean"]), tuple(float(v) for v in payload["std"]))
    return CheckpointMeta(config, tuple(str(c) for c in payload["classes"]), stats, tuple(int(s) for s in payload["seeds"]))


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


def load_checkpoint(path: Path, expected: ModelParams, name: str | None = None) \
        -> tuple[dict[int, nn.Module], CheckpointMeta]:
    """({seed: model on the CPU in eval mode}, metadata), refused unless its architecture is `expected`.

    `name` is the models entry `expected` comes from; by default the file's stem, as dvc.yaml names checkpoints.
    """
    name = name or Path(path).stem
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = _meta(payload)
        _check_config(path, meta.config, expected, name)
        models = {}
        for seed, state in zip(meta.seeds, payload["states"], strict=True):
            models[seed] = build_model(meta.config, len(meta.classes))
            models[seed].load_state_dict(state)
            models[seed].eval()
    except StageError:
        raise
    except Exception as err:  # any unreadable or foreign file: one line, not a traceback
        raise StageError(f"{path} is not a checkpoint of this project ({type(err).__name__}: {str(err)[:200]}); "
                         f"rerun its train stage (dvc repro -f train@{name})") from err
    return models, meta
