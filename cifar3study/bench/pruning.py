"""What pruning buys: one study file run twice, without a pruner and with ASHA, same space, sampler seed and trials.

    python -m cifar3study.bench.pruning studies/bench-pruning.yaml [--json out.json]

Run from a committed repository whose data stages have run (`dvc repro stats`). Each variant is a real study
(`python -m cifar3study.studies.run`, named `<study>-none` and `<study>-asha`; a finished one costs seconds);
the figures come from the ledger afterwards: epochs trained (epochs x seeds, summed over trials) and the best
holdout score per model, and each variant's wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from tabulate import tabulate

from cifar3study.cli import run_stage
from cifar3study.errors import StageError, one_line
from cifar3study.studies.checks import load_study
from cifar3study.studies.search import Searches
from cifar3study.tracking import ledger

log = logging.getLogger("bench")
VARIANTS = {"none": {"pruner": "none"}, "asha": None}  # None: the study file's own prune settings


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    seconds: float | None  # None when it had finished before and only its ledger was read
    epochs: dict[str, int]  # per model: epochs x seeds trained, over every trial
    best: dict[str, float]  # per model: the best complete trial's holdout score
    pruned: dict[str, int]  # per model: trials the pruner stopped


def _study_file(raw: dict, variant: str, folder: Path) -> Path:
    prune = VARIANTS[variant] or raw.get("prune") or {}
    if variant == "asha" and prune.get("pruner") != "asha":
        raise StageError("the study file's prune section must be {pruner: asha, ...}: it is the pruned variant")
    path = folder / f"{raw['name']}-{variant}.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": f"{raw['name']}-{variant}", "prune": prune, "final": "none"}))
    return path


def _run(path: Path, repo: Path) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cifar3study.studies.run", str(path)], cwd=repo, text=True,
                          stderr=subprocess.PIPE, env=os.environ)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise StageError(f"study {path.stem} failed: {one_line(lines[-1] if lines else 'no output')}")
    return time.monotonic() - started


def _read(path: Path, repo: Path, seconds: float | None) -> Variant:
    study, params = load_study(path, repo / "params.yaml")
    base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    url = ledger.ledger_url(os.environ, repo)
    searches = Searches(ledger.open_storage(url), url, study, base, 60.0)
    epochs, best, pruned = {}, {}, {}
    for model in study.models:
        trials = searches.trials(model, "search")
        seeds = len(study.fixed.get("train.seeds", params["train"]["seeds"]))
        full = int(study.fixed.get("train.epochs", params["train"]["epochs"]))
        epochs[model] = seeds * sum(full if t.state.name == "COMPLETE" else len(t.intermediate_values) for t in trials)
        best[model] = max((t.value for t in trials if t.state.name == "COMPLETE"), default=float("nan"))
        pruned[model] = sum(t.state.name == "PRUNED" for t in trials)
    return Variant(study.name, seconds, epochs, best, pruned)


def table(variants: list[Variant]) -> str:
    rows = []
    for model in variants[0].epochs:
        base, asha = variants
        rows.append([model, base.epochs[model], asha.epochs[model], f"{asha.epochs[model] / base.epochs[model]:.2f}",
                     asha.pruned[model], f"{base.best[model]:.4f}", f"{asha.best[model]:.4f}",
                     f"{asha.best[model] - base.best[model]:+.4f}"])
    head = ["model", "epochs unpruned", "epochs ASHA", "ratio", "pruned", "best unpruned", "best ASHA", "difference"]
    times = ", ".join(f"{v.name}: {v.seconds:.0f} s" if v.seconds is not None else f"{v.name}: ran before"
                      for v in variants)
    return tabulate(rows, head, tablefmt="github", disable_numparse=True) + f"\n\nwall time: {times}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study file with a space and prune: {pruner: asha, ...}")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    repo = Path.cwd()
    raw = yaml.safe_load(args.study.read_text())
    variants = []
    with tempfile.TemporaryDirectory() as folder:
        for name in VARIANTS:
            path = _study_file(raw, name, Path(folder))
            log.info("running %s", path.stem)
            variants.append(_read(path, repo, _run(path, repo)))
    log.info("pruning benchmark:\n%s", table(variants))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(v) for v in variants], indent=1))


if __name__ == "__main__":
    run_stage(main)
