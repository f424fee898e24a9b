"""Device choice, seeding and numerics, set once per process."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import random

import numpy as np
import torch

from stages.common import StageError


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit choice must be available."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise StageError(f"train.device is {name} but no {name} device is available; set train.device: auto or cpu")
    return torch.device(name)


def set_seed(seed: int, deterministic: bool, tf32: bool = False) -> None:
    """Seed every generator; with `deterministic`, refuse nondeterministic kernels.

    cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first call to be
    deterministic, so it is set here, before any tensor reaches the GPU.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    # Deterministic mode also NaN-fills every new tensor, a debugging aid that
    # determinism does not need: it was ~13% of an FC training step on the CPU.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def keep_freed_memory(max_block: int = 32 << 20, keep: int = 256 << 20) -> bool:
    """Ask glibc to reuse freed blocks up to `max_block` bytes instead of unmapping them.

    Training frees and re-allocates the same large gradient buffers every step
    (12 MiB for the FC net's first layer); by default glibc returns them to the
    OS and the next step pays page faults again (10-30% of an FC step on the CPU).
    Up to `keep` bytes of free heap stay mapped. Returns False off glibc.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, max_block)) and bool(libc.mallopt(m_trim_threshold, keep))
    except (OSError, AttributeError):
        return False


def device_name(device: torch.device) -> str:
    """Human-readable name of the device, for provenance."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
