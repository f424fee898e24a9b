"""The training device, seeds and numerics: resolved once per process and passed in."""

from __future__ import annotations

import os
import platform
import random
import re

import numpy as np
import torch

from cifar3study.errors import StageError


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit choice must be available."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise StageError(f"train.device is {name} but no {name} device is available; set train.device: auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_numerics(deterministic: bool, tf32: bool) -> None:
    """Deterministic kernels (or not) and TF32, for this process.

    cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first call to be
    deterministic, so call this before any tensor reaches the GPU.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # The switch torch.use_deterministic_algorithms sets, without its TorchInductor import (it tunes
    # torch.compile, which nothing here uses): evaluate on tiny data took 12.5 s with it, 8.7 s without.
    torch.set_deterministic_debug_mode("error" if deterministic else "default")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def device_name(device: torch.device) -> str:
    """Human-readable name of the device, for provenance."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def onednn_version() -> str:
    """The oneDNN (MKL-DNN) build torch runs its CPU convs and matmuls with; `none` without one."""
    if not torch.backends.mkldnn.is_available():
        return "none"
    found = re.search(r"(?:MKL-DNN|oneDNN)\s+v([\w.]+)", torch.__config__.show())
    return found.group(1) if found else "unknown"


def describe(device: torch.device) -> dict[str, str]:
    """What ran, as provenance tags: everything that changes numerics (a rerun is bitwise only when all match).

    CUDA versions only for a CUDA device (a CPU run used none). Threads split
    CPU reductions differently, so a thread count of its own changes the bits.
    """
    tags = {"device": device_name(device), "device.type": device.type, "torch.version": torch.__version__,
            "numpy.version": np.__version__, "onednn.version": onednn_version(),
            "cpu.capability": torch.backends.cpu.get_cpu_capability(), "torch.threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        tags["cuda.version"] = torch.version.cuda or "unknown"
        tags["cudnn.version"] = str(torch.backends.cudnn.version())
    return tags


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def is_available(device_type: str) -> bool:
    """Whether a device of this type (cpu, cuda, mps) can run here."""
    return {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(
        device_type, False)
