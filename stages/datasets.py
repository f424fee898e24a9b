"""The CIFAR-3 splits written by the cifar3 stage, and their normalisation."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from stages.common import StageError


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x 3 x 32 x 32
    labels: np.ndarray  # int64, N
    classes: tuple[str, ...]
    source_md5: str  # MD5 of the CIFAR-10 archive the split came from


def load_split(path: Path) -> Split:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Split(z["images"], z["labels"], tuple(str(c) for c in z["classes"]), str(z["source_md5"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise StageError(f"cannot read split {path} ({err}); rerun `dvc repro cifar3`") from err


def load_stats(path: Path) -> tuple[list[float], list[float]]:
    try:
        stats = json.loads(Path(path).read_text(encoding="utf-8"))
        return [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise StageError(f"cannot read channel stats {path} ({err}); rerun `dvc repro stats`") from err


def normalize(images: np.ndarray, mean: list[float], std: list[float], device: torch.device) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 on `device`, scaled to [0, 1] then standardised.

    Same arithmetic as torchvision's ToTensor + Normalize, done once for the
    whole split instead of once per image per epoch.
    """
    x = torch.from_numpy(images).to(device).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
