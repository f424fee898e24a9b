"""Training speed: the project's trainer against the original study's DataLoader loop.

    .venv/bin/python -m cifar3study.benchmark --train data/cifar3/train.npz \
        --stats data/cifar3/stats.json [--json out.json] [--epochs 3] [--warmup 1] [--rounds 1]

Each (model, variant) runs in its own child process (this module with --variant),
so the peak RSS it reports belongs to that variant alone. Rounds interleave the
variants, so drift in a shared machine's load hits both sides alike; the
reported seconds are the median over every timed epoch of every round.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
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
from tqdm import tqdm

from cifar3study.dataset import read_split, read_stats
from cifar3study.device import device_name, resolve_device, seed_everything, set_numerics, synchronize
from cifar3study.models import ConvNet, build_fc, build_model, normalize
from cifar3study.params import ModelParams, TrainParams, load_params, model_params
from cifar3study.training import setup_training, train_epoch

log = logging.getLogger("benchmark")
MODELS = ("fc", "cnn")
VARIANTS = ("project", "original")


class OriginalDataset(Dataset):
    """The study's dataset: uint8 image -> PIL -> ToTensor + Normalize, per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float]) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

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


def project_epochs(cfg: ModelParams, train: TrainParams, args: argparse.Namespace, device: torch.device) -> list[float]:
    """The stage's path: seeded, whole split as one normalised tensor, `fit`'s setup."""
    seed_everything(train.seed)
    set_numerics(train.deterministic, train.tf32)
    split, stats = read_split(args.train), read_stats(args.stats)
    x, y = normalize(split.images, stats, device), torch.from_numpy(split.labels).to(device)
    model = build_model(cfg, len(split.classes)).to(device)
    optimizer, generator, channels_last = setup_training(model, train)
    return timed_epochs(lambda: train_epoch(model, optimizer, x, y, train.batch_size, generator, channels_last),
                        device, args.warmup, args.epochs)


def original_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device) -> float:
    model.train()
    running = 0.0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        running += loss.item()
    return running / len(loader)


def original_epochs(cfg: ModelParams, train: TrainParams, args: argparse.Namespace, device: torch.device) -> list[float]:
    """The study's loop: DataLoader(batch 64, shuffle) over per-item PIL transforms, plain model, SGD."""
    torch.manual_seed(train.seed)
    split, stats = read_split(args.train), read_stats(args.stats)
    loader = DataLoader(OriginalDataset(split.images, split.labels, list(stats.mean), list(stats.std)), batch_size=64,
                        shuffle=True, num_workers=0)
    classes = len(split.classes)
    plain = ConvNet(cfg, classes, pool_first=False) if cfg.arch == "cnn" else build_fc(cfg, classes, linear=nn.Linear)
    model = plain.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    return timed_epochs(lambda: original_epoch(model, optimizer, loader, device), device, args.warmup, args.epochs)


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: time one (model, variant); report seconds, peak RSS and device."""
    params = load_params(args.params)
    device = resolve_device(args.device)
    run = project_epochs if args.variant == "project" else original_epochs
    seconds = run(model_params(params, args.model), params.train, args, device)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"model": args.model, "variant": args.variant, "seconds": seconds,
            "peak_rss_mib": peak_kib / 1024, "device": device_name(device)}


def spawn(args: argparse.Namespace, model: str, variant: str) -> dict:
    """Run one variant in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, "-m", "cifar3study.benchmark", "--variant", variant, "--model", model,
           "--params", str(args.params), "--train", str(args.train), "--stats", str(args.stats),
           "--epochs", str(args.epochs), "--warmup", str(args.warmup), "--device", args.device]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def dvc_noop_seconds(skip: bool) -> tuple[float | None, str]:
    """Wall time of `dvc repro` when `dvc status` says everything is up to date."""
    if skip:
        return None, "skipped (--skip-dvc)"
    dvc = str(Path(sys.executable).with_name("dvc"))
    status = subprocess.run([dvc, "status"], capture_output=True, text=True)
    if status.returncode != 0 or "up to date" not in status.stdout:
        return None, "skipped: pipeline not up to date (`dvc status` lists changes)"
    start = time.perf_counter()
    subprocess.run([dvc, "repro"], check=True, capture_output=True)
    return time.perf_counter() - start, "no-op `dvc repro`"


def summarise(results: list[dict], n_images: int) -> list[dict]:
    """One row per model: median epoch seconds of each variant, their ratio, peak RSS."""
    rows = []
    for model in MODELS:
        mine = [r for r in results if r["model"] == model]
        med = {v: statistics.median(s for r in mine if r["variant"] == v for s in r["seconds"]) for v in VARIANTS}
        rss = {v: max(r["peak_rss_mib"] for r in mine if r["variant"] == v) for v in VARIANTS}
        rows.append({"model": model, "project_s": med["project"], "original_s": med["original"],
                     "speedup": med["original"] / med["project"],
                     "project_img_s": n_images / med["project"], "original_img_s": n_images / med["original"],
                     "project_rss_mib": rss["project"], "original_rss_mib": rss["original"],
                     "device": mine[0]["device"]})
    return rows


def table(rows: list[dict], dvc_s: float | None, dvc_note: str) -> str:
    headers = ["model", "project s/epoch", "original s/epoch", "speedup (orig/proj)", "project img/s",
               "original img/s", "project peak RSS MiB", "original peak RSS MiB", "device"]
    body = [[r["model"], r["project_s"], r["original_s"], r["speedup"], r["project_img_s"], r["original_img_s"],
             r["project_rss_mib"], r["original_rss_mib"], r["device"]] for r in rows]
    dvc = f"{dvc_note}: {dvc_s:.2f} s" if dvc_s is not None else dvc_note
    return tabulate(body, headers=headers, floatfmt=".2f") + f"\n\ndvc: {dvc}\nhost: {platform.node()} {platform.machine()}"


def benchmark(args: argparse.Namespace) -> dict:
    jobs = [(r, m, v) for r in range(args.rounds) for m in MODELS for v in VARIANTS]
    results = []
    for _, model, variant in tqdm(jobs, desc="variants", unit="run"):
        results.append(spawn(args, model, variant))
        log.info("%s/%s: %s s", model, variant, " ".join(f"{s:.2f}" for s in results[-1]["seconds"]))
    dvc_s, dvc_note = dvc_noop_seconds(args.skip_dvc)
    rows = summarise(results, len(read_split(args.train).labels))
    return {"rows": rows, "runs": results, "dvc_noop_s": dvc_s, "dvc_note": dvc_note,
            "epochs": args.epochs, "warmup": args.warmup, "rounds": args.rounds}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every variant, interleaved")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps")
    parser.add_argument("--skip-dvc", action="store_true", help="do not time the no-op `dvc repro`")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))  # the parent reads this line
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report["rows"], report["dvc_noop_s"], report["dvc_note"]))


if __name__ == "__main__":
    main()
