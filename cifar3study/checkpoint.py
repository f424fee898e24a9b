"""The checkpoint format: weights plus what it takes to rebuild and feed the model, read back typed.

A checkpoint is a `torch.save` of plain tensors, strings, numbers and lists,
so it loads with `weights_only=True` (no pickle of code).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from cifar3study.dataset import ChannelStats
from cifar3study.errors import StageError
from cifar3study.files import atomic_path
from cifar3study.models import build_model
from cifar3study.params import ModelParams


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    config: ModelParams
    classes: tuple[str, ...]
    stats: ChannelStats  # the normalisation the model was trained with


def save_checkpoint(path: Path, model: nn.Module, meta: CheckpointMeta) -> None:
    """Weights (contiguous, on the CPU) and metadata; atomic."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "config": dataclasses.asdict(meta.config), "classes": list(meta.classes),
               "mean": list(meta.stats.mean), "std": list(meta.stats.std)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _meta(payload: dict) -> CheckpointMeta:
    raw = payload["config"]
    config = ModelParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    stats = ChannelStats(tuple(float(v) for v in payload["mean"]), tuple(float(v) for v in payload["std"]))
    return CheckpointMeta(config, tuple(str(c) for c in payload["classes"]), stats)


def load_checkpoint(path: Path) -> tuple[nn.Module, CheckpointMeta]:
    """(model on the CPU in eval mode, its metadata), from the file alone."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = _meta(payload)
        model = build_model(meta.config, len(meta.classes))
        model.load_state_dict(payload["state_dict"])
    except StageError:
        raise
    except Exception as err:  # any unreadable or foreign file: one line, not a traceback
        raise StageError(f"{path} is not a checkpoint of this project ({type(err).__name__}: {err}); "
                         "rerun its train stage (dvc repro -f train@<model>)") from err
    return model.eval(), meta
