"""The aten ops one training step and one evaluation dispatch, judged against torch's deterministic-mode list for CUDA.

    python -m cifar3study.bench.op_audit [--params params.yaml] [--out tests/pinned/aten_ops.txt]

No GPU is lent to this project, so this is what the CPU can prove before a
GPU box's first run. Each setting (every model of params.yaml x seed-by-seed
or vmap x channels_last on or off) runs one real `train_epoch` of one batch
and one `evaluate_group` under the train stage's numerics, while a
TorchDispatchMode records every op that reaches the dispatcher, autograd's
backward ops included. Each op is then looked up in the docstring of the
installed `torch.use_deterministic_algorithms`, whose two lists (ops made
deterministic, ops that raise) name Python-level APIs; ATEN_OF maps each
name to the aten ops that run it. A docstring entry ATEN_OF lacks is
reported, so a torch upgrade gets reviewed instead of passing unnoticed.

What it cannot prove: which CUDA kernels and cuDNN algorithms run, atomics
in ops torch does not list, speed or memory. It records CPU dispatch, with
two known differences from CUDA: OneDnnLinear trains through a CPU-only
oneDNN op (CUDA takes F.linear, whose aten ops the vmap path records), and
SGD picks foreach kernels for CUDA parameters, which the vmap path is given
here (`as_on_cuda`), since that is the path CUDA trains on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cifar3study.cli import run_stage
from cifar3study.errors import StageError
from cifar3study.files import write_text_atomic
from cifar3study.params import Params, load_params
from cifar3study.training.device import set_numerics
from cifar3study.training.models import IMAGE_SHAPE
from cifar3study.training.trainer import evaluate_group, init_models, setup_group, train_epoch

log = logging.getLogger("op_audit")

RAISES, DETERMINISTIC, NOT_LISTED = "listed as raising on CUDA", "listed as made deterministic", "not listed"

# Each docstring name -> the aten ops (overload packets) that run it. Conservative: an entry's
# condition (mode, sparse layout, "when differentiating") is not checked, so a match may over-report.
ATEN_OF: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d", "torch.nn.ConvTranspose1d",
                     "torch.nn.ConvTranspose2d", "torch.nn.ConvTranspose3d"), ("aten.convolution", "aten.convolution_backward")),
    "torch.nn.ReplicationPad1d": ("aten.replication_pad1d_backward",),
    "torch.nn.ReplicationPad2d": ("aten.replication_pad2d_backward",),
    "torch.nn.ReplicationPad3d": ("aten.replication_pad3d_backward",),
    "torch.bmm": ("aten.bmm",),
    "torch.cumsum": ("aten.cumsum", "aten.cumsum_"),
    "torch.Tensor.__getitem__": ("aten.index_put", "aten.index_put_", "aten._index_put_impl_"),  # index's backward
    "torch.Tensor.index_put": ("aten.index_put", "aten.index_put_", "aten._index_put_impl_"),
    "torch.Tensor.put_": ("aten.put", "aten.put_"),
    "torch.Tensor.scatter_add_": ("aten.scatter_add", "aten.scatter_add_"),
    "torch.gather": ("aten.gather",),
    "torch.index_add": ("aten.index_add", "aten.index_add_"),
    "torch.index_select": ("aten.index_select_backward",),
    "torch.repeat_interleave": ("aten.repeat_interleave",),
    "torch.Tensor.index_copy": ("aten.index_copy", "aten.index_copy_"),
    "torch.Tensor.scatter": ("aten.scatter", "aten.scatter_"),
    "torch.Tensor.scatter_reduce": ("aten.scatter_reduce", "aten.scatter_reduce_"),
    "torch.nn.MaxPool3d": ("aten.max_pool3d_with_indices_backward",),
    "torch.nn.Embedding": ("aten.embedding_backward", "aten.embedding_dense_backward"),
    "torch.nn.AvgPool3d": ("aten.avg_pool3d_backward",),
    "torch.nn.AdaptiveAvgPool2d": ("aten._adaptive_avg_pool2d_backward",),
    "torch.nn.AdaptiveAvgPool3d": ("aten._adaptive_avg_pool3d_backward",),
    "torch.nn.AdaptiveMaxPool2d": ("aten.adaptive_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool2d": ("aten.fractional_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool3d": ("aten.fractional_max_pool3d_backward",),
    "torch.nn.MaxUnpool1d": ("aten.max_unpool2d",),  # MaxUnpool1d runs the 2-D op
    "torch.nn.MaxUnpool2d": ("aten.max_unpool2d",),
    "torch.nn.MaxUnpool3d": ("aten.max_unpool3d",),
    "torch.nn.functional.interpolate": ("aten.upsample_linear1d_backward", "aten.upsample_bilinear2d_backward",
                                        "aten.upsample_bicubic2d_backward", "aten.upsample_trilinear3d_backward",
                                        "aten._upsample_bilinear2d_aa_backward", "aten._upsample_bicubic2d_aa_backward"),
    "torch.nn.ReflectionPad1d": ("aten.reflection_pad1d_backward",),
    "torch.nn.ReflectionPad2d": ("aten.reflection_pad2d_backward",),
    "torch.nn.ReflectionPad3d": ("aten.reflection_pad3d_backward",),
    # torch's only NLLLoss alert is in NLLLoss2d.cu (atomicAdd in the 4-D loss); see NOTES for the 1-D op.
    "torch.nn.NLLLoss": ("aten.nll_loss2d_forward", "aten.nll_loss2d_backward"),
    "torch.nn.CTCLoss": ("aten._ctc_loss_backward",),
    "torch.nn.EmbeddingBag": ("aten._embedding_bag_backward", "aten._embedding_bag_dense_backward"),
    "torch.histc": ("aten.histc",),
    "torch.bincount": ("aten.bincount",),
    "torch.median": ("aten.median",),
    "torch.nn.functional.grid_sample": ("aten.grid_sampler_2d_backward", "aten.grid_sampler_3d_backward",
                                        "aten.cudnn_grid_sampler_backward"),
    "torch.Tensor.resize_": ("aten.resize_",),  # the entry is for quantized tensors only
}

# What reading torch's CUDA source (aten/src/ATen/native/cuda/) adds to an op's verdict.
NOTES: dict[str, str] = {
    "aten.addmm": "cuBLAS: deterministic with CUBLAS_WORKSPACE_CONFIG set",
    "aten.mm": "cuBLAS: deterministic with CUBLAS_WORKSPACE_CONFIG set",
    "aten.bmm": "the entry is sparse-dense bmm; dense bmm is cuBLAS, deterministic with CUBLAS_WORKSPACE_CONFIG set",
    "aten.scatter_add": "cross-entropy's backward under vmap; CUDA takes the slower deterministic algorithm",
    "aten.nll_loss_forward": "the NLLLoss entry's atomics are in nll_loss2d; Loss.cu reduces 1-D/2-D input in a fixed order",
    "aten.nll_loss_backward": "Loss.cu writes one gradient element per sample, no atomics",
    "aten.max_pool2d_with_indices_backward": "the entry is MaxPool3d; DilatedMaxPool2d.cu's backward gathers per input pixel",
    "mkldnn._linear_pointwise": "CPU only: OneDnnLinear's training path; on CUDA the layer takes F.linear",
}

# The values torch's CUDA error message and the cuBLAS docs give for deterministic cuBLAS workspaces.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
_CUBLAS = "CUBLAS_WORKSPACE_CONFIG"
_SECTIONS = {False: "will act deterministically when ``mode=True``:",
             True: "will throw a :class:`RuntimeError` when ``mode=True``:"}
_BULLET = re.compile(r"(?:^|\s)\*\s")
_NAME = re.compile(r":\w+:`([^`]+)`")


@dataclasses.dataclass(frozen=True)
class DocEntry:
    name: str  # the Python-level API, e.g. torch.nn.AvgPool3d
    text: str  # the whole bullet, on one line
    raises: bool  # in the "throw a RuntimeError" list (else the "act deterministically" list)


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str  # a key of params.yaml's models
    batched: bool  # vmap over stacked parameters (the accelerator path), else seed by seed
    channels_last: bool

    @property
    def path(self) -> str:
        return "vmap" if self.batched else "seed-by-seed"


@dataclasses.dataclass
class Audit:
    ops: dict[tuple[Setting, str], set[str]]  # (setting, "train" | "eval") -> op overload names
    entries: list[DocEntry]

    def all_ops(self) -> set[str]:
        return set().union(*self.ops.values())

    def unmapped(self) -> list[DocEntry]:
        """Docstring entries ATEN_OF does not cover: new in this torch, to be mapped and reviewed."""
        return [e for e in self.entries if e.name not in ATEN_OF]

    def raising(self) -> list[str]:
        """Recorded ops the installed torch lists as raising under deterministic mode on CUDA."""
        return sorted(op for op in self.all_ops() if verdict(op, self.entries).startswith(RAISES))


def parse_deterministic_doc(doc: str) -> list[DocEntry]:
    """The two lists of the torch.use_deterministic_algorithms docstring; [] when its wording changed."""
    flat = " ".join(doc.split())
    entries = []
    for raises, heading in _SECTIONS.items():
        start = flat.find(heading)
        if start < 0:
            return []
        body = re.split(r"The following |In addition,", flat[start + len(heading):])[0]  # up to the next lead-in
        entries += [_entry(bullet.strip(), raises) for bullet in _BULLET.split(body)[1:]]
    return entries


def _entry(bullet: str, raises: bool) -> DocEntry:
    """A bullet that does not start with a role-marked name keeps its first words as name: unmapped, so reviewed."""
    name = _NAME.match(bullet)
    return DocEntry(name[1] if name else bullet[:40], bullet, raises)


def installed_entries() -> list[DocEntry]:
    return parse_deterministic_doc(torch.use_deterministic_algorithms.__doc__ or "")


def verdict(op: str, entries: list[DocEntry]) -> str:
    """One op overload (e.g. aten.convolution_backward.default) against the docstring's lists."""
    packet = op.rsplit(".", 1)[0]
    hits = [e for e in entries if packet in ATEN_OF.get(e.name, ())]
    label = NOT_LISTED
    for raises, listed in ((False, DETERMINISTIC), (True, RAISES)):  # raising wins
        names = sorted({e.name for e in hits if e.raises == raises})
        label = f"{listed} ({', '.join(names)})" if names else label
    return f"{label}; {NOTES[packet]}" if packet in NOTES else label


class OpRecorder(TorchDispatchMode):
    """Every op overload dispatched while active, autograd's backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def training_numerics() -> Iterator[None]:
    """set_numerics(True, False) as the train stage calls it, undone afterwards: the caller's process is shared."""
    cudnn, matmul, det = torch.backends.cudnn, torch.backends.cuda.matmul, torch.utils.deterministic
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32, det.fill_uninitialized_memory)
    env = os.environ.pop(_CUBLAS, None)
    try:
        set_numerics(True, False)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[2:6]
        det.fill_uninitialized_memory = saved[6]
        os.environ.pop(_CUBLAS, None)
        if env is not None:
            os.environ[_CUBLAS] = env


def cublas_workspace_config() -> str | None:
    """What set_numerics(True, False) leaves in CUBLAS_WORKSPACE_CONFIG, starting from an environment without it."""
    with training_numerics():
        return os.environ.get(_CUBLAS)


def as_on_cuda(optimizer: torch.optim.Optimizer) -> None:
    """SGD's step as torch picks it for CUDA parameters: foreach kernels (optim.optimizer._default_to_fused_or_foreach)."""
    for group in optimizer.param_groups:
        group["foreach"] = True


def record(params: Params, setting: Setting, images: int) -> dict[str, set[str]]:
    """{"train": ops of one one-batch train_epoch, "eval": ops of one evaluate_group}, on the CPU."""
    classes, seeds = len(params.data.classes), params.train.seeds[:2]
    x, y = torch.randn(images, *IMAGE_SHAPE), torch.arange(images) % classes
    models = init_models(params.models[setting.model], classes, seeds, torch.device("cpu"))
    group = setup_group(models, seeds, dataclasses.replace(params.train, channels_last=setting.channels_last),
                        setting.batched)
    if setting.batched:
        as_on_cuda(group.optimizer)
    with OpRecorder() as train:
        train_epoch(group, x, y, batch_size=images)
    with OpRecorder() as evaluation:
        evaluate_group(group, (x, y), images)
    return {"train": train.ops, "eval": evaluation.ops}


def run_audit(params: Params, images: int = 4) -> Audit:
    """Record every setting; the global RNG and numerics flags are left as they were."""
    ops: dict[tuple[Setting, str], set[str]] = {}
    with torch.random.fork_rng(devices=[]), training_numerics():
        torch.manual_seed(0)
        for model in params.models:
            for batched in (False, True):
                for channels_last in (True, False):
                    setting = Setting(model, batched, channels_last)
                    for phase, recorded in record(params, setting, images).items():
                        ops[(setting, phase)] = recorded
    return Audit(ops, installed_entries())


def _where(audit: Audit, op: str) -> str:
    """Where an op runs, as model/path/phase; [cl] or [nchw] when only one layout dispatches it there."""
    layouts: dict[str, set[bool]] = {}
    for (s, phase), ops in audit.ops.items():
        layouts.setdefault(f"{s.model}/{s.path}/{phase}", set())
        if op in ops:
            layouts[f"{s.model}/{s.path}/{phase}"].add(s.channels_last)
    return " ".join(key + ("" if len(used) == 2 else "[cl]" if True in used else "[nchw]")
                    for key, used in sorted(layouts.items()) if used)


def pinned_lines(audit: Audit) -> list[str]:
    """One line per op: `op | verdict | where`, sorted: the pinned list's content."""
    return [f"{op} | {verdict(op, audit.entries)} | {_where(audit, op)}" for op in sorted(audit.all_ops())]


def pinned_text(audit: Audit) -> str:
    header = [f"# aten ops of one training step and one evaluation (torch {torch.__version__}, recorded on the CPU)",
              "# regenerate: python -m cifar3study.bench.op_audit --out tests/pinned/aten_ops.txt, then review",
              "# op | verdict under torch.use_deterministic_algorithms(True) on CUDA | where (model/path/phase)"]
    return "\n".join(header + pinned_lines(audit)) + "\n"


def read_pinned(path: Path) -> list[str]:
    """The op lines of a pinned list (comments and blank lines dropped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def report_text(audit: Audit) -> str:
    """Per (model, path): the sorted ops of train and eval, each with its verdict; then the findings."""
    out = []
    for key in sorted({(s.model, s.path) for s, _ in audit.ops}):
        ops = set().union(*(o for (s, _), o in audit.ops.items() if (s.model, s.path) == key))
        out += [f"## {key[0]} / {key[1]} ({len(ops)} ops)"] + [f"  {op}: {verdict(op, audit.entries)}" for op in sorted(ops)]
    out += ["## findings"] + [f"  {line}" for line in findings(audit)]
    return "\n".join(out) + "\n"


def findings(audit: Audit) -> list[str]:
    cublas = cublas_workspace_config()
    return [f"docstring entries parsed: {len(audit.entries)} ({sum(e.raises for e in audit.entries)} raising)",
            f"ops listed as raising on CUDA: {', '.join(audit.raising()) or 'none'}",
            f"docstring entries without an aten mapping: {', '.join(e.name for e in audit.unmapped()) or 'none'}",
            f"{_CUBLAS} after set_numerics(True, False): {cublas or 'unset'} "
            f"({'deterministic' if cublas in CUBLAS_DETERMINISTIC else 'NOT one of ' + ', '.join(CUBLAS_DETERMINISTIC)})"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, help="write the pinned op list here (e.g. tests/pinned/aten_ops.txt)")
    args = parser.parse_args()
    audit = run_audit(load_params(args.params))
    if not audit.entries:
        raise StageError(f"the torch {torch.__version__} docstring of use_deterministic_algorithms no longer parses; "
                         "update op_audit.parse_deterministic_doc")
    sys.stdout.write(report_text(audit))
    if args.out:
        write_text_atomic(args.out, pinned_text(audit))
        log.info("wrote %d ops to %s", len(audit.all_ops()), args.out)
    if bad := audit.raising() + [e.name for e in audit.unmapped()]:
        raise StageError(f"review {', '.join(bad)}: listed as raising on CUDA, or not yet in op_audit.ATEN_OF")


if __name__ == "__main__":
    run_stage(main)
