"""The memory one model group needs, estimated from params alone, against what its device has free.

Nothing is allocated and no model is built: the counts follow training.models' layers (the image side through
params.conv_sides), so a params.yaml that cannot fit is refused in one line, naming the key to lower, before
train allocates gigabytes and dies.
"""

from __future__ import annotations

import dataclasses
import itertools

import psutil
import torch

from cifar3study.params import IMAGE_SIDE, ModelParams, ParamError, Params, conv_sides

FLOAT = 4  # bytes of a float32 value
INDEX = 8  # bytes of a max-pool index (int64), kept for the backward pass
IMAGE_VALUES = 3 * IMAGE_SIDE * IMAGE_SIDE
IMAGES_PER_CLASS = 6_000  # CIFAR-10: 5,000 training + 1,000 validation images per class, all held on the device
IMAGE_BYTES = FLOAT + 1  # each value as read (uint8) and normalised (float32)
MARGIN = 1.5  # allocator caching, fragmentation and the temporaries this estimate leaves out
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes one model group needs on its device."""

    weights: int  # every seed's parameters, a second copy (stacked for vmap, or saved), gradients, momentum
    train_batch: int  # one training batch's activations and their gradients, every seed
    evaluation: int  # one evaluate.batch_size forward pass, every seed
    data: int  # the training and validation split

    @property
    def total(self) -> int:
        return self.weights + self.train_batch + self.evaluation + self.data


def _linear_widths(cfg: ModelParams, num_classes: int) -> list[int]:
    """Widths of the Linear stack, inputs first: the flat image (fc) or the last feature map (cnn)."""
    if cfg.arch == "fc":
        return [IMAGE_VALUES, *cfg.hidden, num_classes]
    side = max(conv_sides(cfg)[-1], 0)
    return [cfg.channels[-1] * side * side, *cfg.hidden, num_classes]


def parameter_count(cfg: ModelParams, num_classes: int) -> int:
    """What training.models.count_params(build_model(cfg, num_classes)) returns, without building it."""
    count = sum(a * b + b for a, b in itertools.pairwise(_linear_widths(cfg, num_classes)))
    if cfg.arch == "cnn":
        inputs = (3, *cfg.channels[:-1])
        count += sum(a * b * cfg.kernel_size ** 2 + b for a, b in zip(inputs, cfg.channels, strict=True))
    return count


def layer_outputs(cfg: ModelParams, num_classes: int) -> list[int]:
    """Bytes of each tensor one image makes on its way through the model, input first."""
    outputs = [IMAGE_VALUES * FLOAT]
    if cfg.arch == "cnn":  # per block: conv, max-pool (values and indices), activation (pool first)
        sides = [max(s, 0) for s in conv_sides(cfg)]
        for channels, conv, pooled in zip(cfg.channels, sides[::2], sides[1::2], strict=True):
            outputs += [channels * conv * conv * FLOAT, channels * pooled * pooled * (FLOAT + INDEX),
                        channels * pooled * pooled * FLOAT]
    *hidden, logits = _linear_widths(cfg, num_classes)[1:]
    for width in hidden:  # Linear, then activation
        outputs += [width * FLOAT, width * FLOAT]
    return [*outputs, logits * FLOAT]


def estimate(params: Params, model: str) -> Estimate:
    cfg, train, classes = params.models[model], params.train, len(params.data.classes)
    seeds = len(train.seeds)
    outputs = layer_outputs(cfg, classes)
    copies = 3 + (train.momentum > 0)  # SGD keeps a momentum buffer only when momentum > 0
    peak_forward = max(a + b for a, b in itertools.pairwise(outputs))  # no_grad frees each input after its layer
    return Estimate(weights=parameter_count(cfg, classes) * FLOAT * copies * seeds,
                    train_batch=2 * sum(outputs) * train.batch_size * seeds,  # saved for backward, and their gradients
                    evaluation=peak_forward * params.evaluate.batch_size * seeds,
                    data=IMAGES_PER_CLASS * classes * IMAGE_VALUES * IMAGE_BYTES)


def _shrunk(params: Params, model: str) -> dict[str, Params]:
    """`params` with one key at a time at its smallest value."""
    cfg, train, replace = params.models[model], params.train, dataclasses.replace

    def with_model(**changes: object) -> Params:
        return replace(params, models={**params.models, model: replace(cfg, **changes)})

    options = {"train.seeds": replace(params, train=replace(train, seeds=train.seeds[:1])),
               "train.batch_size": replace(params, train=replace(train, batch_size=1)),
               "evaluate.batch_size": replace(params, evaluate=replace(params.evaluate, batch_size=1)),
               f"models.{model}.hidden": with_model(hidden=(1,) * len(cfg.hidden))}
    if cfg.arch == "cnn":
        options[f"models.{model}.channels"] = with_model(channels=(1,) * len(cfg.channels))
        options[f"models.{model}.padding"] = with_model(padding=0)
    return options


def dominant_key(params: Params, model: str) -> str:
    """The params key whose shrinking saves the most memory."""
    options = _shrunk(params, model)
    return min(options, key=lambda key: estimate(options[key], model).total)


def available_bytes(device: torch.device) -> int:
    """Free memory of `device`: the GPU's own, or the host's (CPU, and Apple's unified memory for mps)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def check_budget(params: Params, model: str, device: torch.device) -> None:
    """Refuse, naming the key to lower, a model group that would not fit in `device`'s free memory."""
    need, free = estimate(params, model), available_bytes(device)
    if need.total * MARGIN <= free:
        return
    key = dominant_key(params, model)
    raise ParamError(f"params.yaml: {key} makes {model} need about {_gib(need.total)} (weights {_gib(need.weights)}, "
                     f"training batch {_gib(need.train_batch)}, evaluation {_gib(need.evaluation)}, data "
                     f"{_gib(need.data)}; x{MARGIN} margin) but {device.type} has {_gib(free)} free; "
                     f"lower {key} or use a larger device")
