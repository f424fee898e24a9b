"""The checkpoint format: every seed's weights plus what it takes to rebuild and feed them, read back typed.

A checkpoint is a `torch.save` of plain tensors, strings, numbers and lists,
so it loads with `weights_only=True` (no pickle of code).
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


def load_checkpoint(path: Path) -> tuple[dict[int, nn.Module], CheckpointMeta]:
    """({seed: model on the CPU in eval mode}, metadata), from the file alone."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = _meta(payload)
        models = {}
        for seed, state in zip(meta.seeds, payload["states"], strict=True):
            models[seed] = build_model(meta.config, len(meta.classes))
            models[seed].load_state_dict(state)
            models[seed].eval()
    except StageError:
        raise
    except Exception as err:  # any unreadable or foreign file: one line, not a traceback
        raise StageError(f"{path} is not a checkpoint of this project ({type(err).__name__}: {err}); "
                         "rerun its train stage (dvc repro -f train@<model>)") from err
    return models, meta
