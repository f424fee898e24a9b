"""Every speed trick of the project, each with the measurement that earned its place.

Measured on this project's CI-class machine (x86_64 VM, 2 cores, CPU only)
with `python -m cifar3study.benchmark`; each trick is checked against the
plain computation in tests/test_speedups.py. Tried and dropped:
`torch.compile` (no gain on that CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch
from torch import nn


def keep_freed_memory(max_block: int = 32 << 20, keep: int = 256 << 20) -> bool:
    """Ask glibc to reuse freed blocks up to `max_block` bytes instead of unmapping them.

    Why: training frees and re-allocates the same large gradient buffers every
    step (12 MiB for the FC net's first layer); by default glibc returns them
    to the OS and the next step pays page faults again: 10-30% of an FC step.
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


def skip_nan_fill() -> None:
    """Deterministic mode NaN-fills every new tensor, a debugging aid that determinism does not need.

    Why: it was ~13% of an FC training step on the CPU.
    """
    torch.utils.deterministic.fill_uninitialized_memory = False


def use_channels_last(model: nn.Module, enabled: bool) -> bool:
    """Move a conv model to NHWC; returns whether inputs should follow.

    Why: oneDNN's NHWC convolutions made the CNN's epoch ~35% faster on the
    CPU, same results to 1e-6. Models without 4-D weights stay as they are.
    """
    if not enabled or not any(p.dim() == 4 for p in model.parameters()):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def pool_then_activate(x: torch.Tensor, pool: nn.Module, activation: nn.Module) -> torch.Tensor:
    """activation(pool(x)): equal to pool(activation(x)) for non-decreasing activations.

    Why: max commutes with tanh, ReLU and LeakyReLU, so pooling first gives
    exactly the same output while the activation (the CNN's CPU hot spot)
    touches a quarter of the values.
    """
    return activation(pool(x))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _OneDnnLinearFn(torch.autograd.Function):
    """F.linear for 2-D float32 CPU inputs with all three GEMMs in oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _onednn_linear(grad, weight.t()) if need_x else None
        grad_w = _onednn_linear(grad.t().contiguous(), x.t()) if need_w else None  # fastest layout pair
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


class OneDnnLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict keys) that trains through oneDNN on the CPU.

    Why: oneDNN uses AVX-512 where MKL's sgemm does not on these AMD CPUs:
    the FC net's epoch was ~25% faster. Only in training mode on 2-D float32
    CPU input; eval, export and other devices take F.linear. Results agree
    with F.linear to float32 rounding, and runs are bitwise repeatable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _ONEDNN and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
                and not torch.compiler.is_compiling():
            return _OneDnnLinearFn.apply(x, self.weight, self.bias)
        return super().forward(x)
