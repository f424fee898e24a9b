"""Every speed trick of the project, each with the measurement that earned its place.

Measured on this project's CI-class machine (x86_64 VM, 2 cores, CPU only)
with `python -m cifar3study.bench.speed` and micro-benchmarks of single ops;
each trick is checked against the plain computation in tests/test_speedups.py.
Tried and dropped: `torch.compile` (no gain on that CPU); vmap with
chunk_size=1 on the CPU (slicing the stacked weights cost more than it saved).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import platform

import torch
from torch import nn


def batch_seeds(device: torch.device) -> bool:
    """Train a seed group as one vmap over stacked parameters (True), or seed by seed (False).

    Why: on an accelerator one batched kernel serves every seed for about the
    price of one. On the CPU one seed's kernels already keep the cores busy,
    and the batched kernels are slower than running the seeds one after
    another (2 cores: the CNN's grouped convolutions cost 1.6-2.2x per seed,
    see `python -m cifar3study.bench.speed`), so the CPU keeps the plain modules
    and their fast paths (channels_last, oneDNN Linear).
    """
    return device.type != "cpu"


def keep_freed_memory(max_block: int = 32 << 20, keep: int = 256 << 20) -> bool:
    """Ask glibc to reuse freed blocks up to `max_block` bytes instead of unmapping them.

    Why: training frees and re-allocates the same large gradient buffers every
    step (12 MiB for the FC net's first layer); by default glibc returns them
    to the OS and the next step pays page faults again (10-30% of an FC step).
    Up to `keep` bytes of free heap stay mapped. Returns False off glibc.
    (Serving even larger blocks from the heap, M_MMAP_MAX=0, was tried for
    stacked seeds: small allocations split the freed block, the heap grew
    each step and the page faults stayed.)
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


def stacked_leaf(value: torch.Tensor) -> torch.Tensor:
    """A stacked parameter as a trainable leaf; stacked Linear weights [S, out, in] stored transposed.

    Why: under vmap the weight gradient of `x @ w.T` comes out as [S, in, out]
    transposed; with the weight stored the same way autograd keeps that
    gradient as it is instead of copying it into the weight's layout (FC,
    3 seeds: 164 ms -> 68 ms per first-layer forward and backward).
    """
    if value.dim() == 3:
        value = value.transpose(1, 2).contiguous().transpose(1, 2)
    return value.detach().requires_grad_()


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy whose OneDnnLinear layers are nn.Linear: a custom autograd Function does not run under vmap."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, OneDnnLinear):
            module.__class__ = nn.Linear
    return plain
