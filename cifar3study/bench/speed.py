"""Training speed: the project's seed groups against the original study's DataLoader loop.

    python -m cifar3study.bench.speed --train data/cifar3/train.npz --stats data/cifar3/stats.json \\
        [--groups 1 3 8] [--vmap-groups 3] [--epochs 2] [--warmup 1] [--rounds 1] [--json out.json]

Each (model, variant) runs in its own child process, so the peak RSS it
reports is that variant's alone. Rounds interleave the variants, so drift in
a shared machine's speed hits all alike; seconds are medians over every timed
epoch of every round. "per seed" is a group's epoch time divided by its size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tabulate import tabulate
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifar3study.data.dataset import ChannelStats, read_split, read_stats
from cifar3study.params import ModelParams, TrainParams, load_params, model_params
from cifar3study.training import speedups
from cifar3study.training.device import device_name, resolve_device, set_numerics, synchronize
from cifar3study.training.models import ConvNet, build_fc, normalize
from cifar3study.training.trainer import init_models, setup_group, train_epoch

log = logging.getLogger("benchmark")
MODELS = ("fc", "cnn")


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str  # "original" (the study's loop) or "group" (the project's trainer)
    seeds: int
    batched: bool  # a vmap over stacked parameters, rather than seed by seed

    @property
    def label(self) -> str:
        return "original loop" if self.kind == "original" else f"{self.seeds} seed{'s' * (self.seeds > 1)}" + \
            (", vmap" if self.batched else "")


class OriginalDataset(Dataset):
    """The study's dataset: uint8 image -> PIL -> ToTensor + Normalize, per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, stats: ChannelStats) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(stats.mean, stats.std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(np.ascontiguousarray(self.images[i].transpose(1, 2, 0)))
        return self.transform(image), int(self.labels[i])


def timed_epochs(run_epoch: Callable[[], object], device: torch.device, warmup: int, epochs: int) -> list[float]:
    """Seconds of each of `epochs` epochs, after `warmup` untimed ones."""
    for _ in range(warmup):
        run_epoch()
    seconds = []
    for _ in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        run_epoch()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def group_epochs(cfg: ModelParams, train: TrainParams, variant: Variant, args: argparse.Namespace,
                 device: torch.device) -> list[float]:
    """The train stage's path: the split as one normalised tensor on the device, a seed group."""
    set_numerics(train.deterministic, train.tf32)
    split, stats = read_split(args.train), read_stats(args.stats)
    x, y = normalize(split.images, stats, device), torch.from_numpy(split.labels).to(device)
    seeds = tuple(range(variant.seeds))
    models = init_models(cfg, len(split.classes), seeds, device)
    group = setup_group(models, seeds, dataclasses.replace(train, seeds=seeds), variant.batched)
    return timed_epochs(lambda: train_epoch(group, x, y, train.batch_size), device, args.warmup, args.epochs)


def original_epochs(cfg: ModelParams, args: argparse.Namespace, device: torch.device) -> list[float]:
    """The study's loop: DataLoader(batch 64, shuffle) over per-item PIL transforms, plain model, SGD."""
    torch.manual_seed(0)
    split, stats = read_split(args.train), read_stats(args.stats)
    loader = DataLoader(OriginalDataset(split.images, split.labels, stats), batch_size=64, shuffle=True, num_workers=0)
    classes = len(split.classes)
    model = (ConvNet(cfg, classes, pool_first=False) if cfg.arch == "cnn" else build_fc(cfg, classes, nn.Linear)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)

    def epoch() -> None:
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
            optimizer.step()

    return timed_epochs(epoch, device, args.warmup, args.epochs)


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: time one (model, variant)."""
    params = load_params(args.params)
    device = resolve_device(args.device)
    cfg = model_params(params, args.model)
    variant = Variant(args.kind, args.seeds, args.batched)
    seconds = original_epochs(cfg, args, device) if variant.kind == "original" else \
        group_epochs(cfg, params.train, variant, args, device)
    return {"model": args.model, "variant": dataclasses.asdict(variant), "seconds": seconds, "device": device_name(device),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def spawn(args: argparse.Namespace, model: str, variant: Variant) -> dict:
    """Run one variant in a fresh interpreter; it leaves its result as JSON in a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "cifar3study.bench.speed", "--child", "--model", model, "--kind", variant.kind,
               "--seeds", str(variant.seeds), *(["--batched"] if variant.batched else []), "--result", str(result),
               "--params", str(args.params), "--train", str(args.train), "--stats", str(args.stats),
               "--epochs", str(args.epochs), "--warmup", str(args.warmup), "--device", args.device]
        subprocess.run(cmd, check=True)
        return json.loads(result.read_text())


def variants(args: argparse.Namespace) -> list[Variant]:
    return [Variant("original", 1, False), *(Variant("group", s, False) for s in args.groups),
            *(Variant("group", s, True) for s in args.vmap_groups)]


def summarise(results: list[dict], n_images: int) -> list[dict]:
    """One row per (model, variant): median group and per-seed epoch seconds, speed-up over the original, RSS."""
    rows = []
    for model in MODELS:
        mine = [r for r in results if r["model"] == model]
        original = statistics.median(s for r in mine if r["variant"]["kind"] == "original" for s in r["seconds"])
        for variant in dict.fromkeys(Variant(**r["variant"]) for r in mine):
            runs = [r for r in mine if Variant(**r["variant"]) == variant]
            group = statistics.median(s for r in runs for s in r["seconds"])
            per_seed = group / variant.seeds
            rows.append({"model": model, "variant": variant.label, "seeds": variant.seeds, "group_s": group,
                         "per_seed_s": per_seed, "speedup": original / per_seed, "images_per_s": n_images / per_seed,
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "device": runs[0]["device"]})
    return rows


def table(rows: list[dict]) -> str:
    headers = ["model", "variant", "s / epoch (group)", "s / epoch (per seed)", "speed-up vs original (per seed)",
               "images/s (per seed)", "peak RSS MiB"]
    body = [[r["model"], r["variant"], r["group_s"], r["per_seed_s"], r["speedup"], r["images_per_s"], r["peak_rss_mib"]]
            for r in rows]
    return tabulate(body, headers=headers, floatfmt=".2f") + f"\n\ndevice: {rows[0]['device']}; host {platform.machine()}"


def benchmark(args: argparse.Namespace) -> dict:
    results = []
    for round_ in range(1, args.rounds + 1):
        for model in MODELS:
            for variant in variants(args):
                results.append(spawn(args, model, variant))
                log.info("round %d %s %s: %s s", round_, model, variant.label,
                         " ".join(f"{s:.2f}" for s in results[-1]["seconds"]))
    rows = summarise(results, len(read_split(args.train).labels))
    return {"rows": rows, "runs": results, "epochs": args.epochs, "warmup": args.warmup, "rounds": args.rounds}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 3, 8], help="seed-group sizes, seed by seed")
    parser.add_argument("--vmap-groups", type=int, nargs="*", default=[3], help="seed-group sizes batched with vmap")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every variant, interleaved")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("original", "group"), help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    speedups.keep_freed_memory()
    if args.child:
        args.result.write_text(json.dumps(run_variant(args)))
        return
    report = benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("\n%s", table(report["rows"]))


if __name__ == "__main__":
    main()
