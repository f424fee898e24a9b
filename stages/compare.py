"""Stage `compare`: one table and one plot of every model in this pipeline run.

The table also goes to MLflow as a separate `comparison` run in the same
experiment: DVC runs each stage as its own process and may skip or restore
any of them from its cache, so a parent run opened before training could be
left dangling, while a run made here only ever summarises finished models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import mlflow
import pandas as pd

from stages import plots, tracking
from stages.common import StageError, atomic_path, run_stage, write_text_atomic
from stages.params import load_params

log = logging.getLogger(__name__)
COLUMNS = ["model", "params", "train_acc", "val_acc", "gap", "seconds_per_epoch"]


def check_models(listed: list[str], in_params: list[str]) -> None:
    """compare's deps name each model's files, so they must cover exactly the models in params."""
    if sorted(listed) != sorted(in_params):
        raise StageError(f"compare lists models {listed} but params.yaml has {in_params}; "
                         "update compare's --models and deps in dvc.yaml")


def read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StageError(f"cannot read {path} ({err}); rerun `dvc repro`") from err
    missing = [c for c in COLUMNS[1:] if not isinstance(metrics, dict) or c not in metrics]
    if missing:
        raise StageError(f"{path} lacks {', '.join(missing)}; rerun its evaluate stage")
    return metrics


def comparison_table(metrics: dict[str, dict]) -> pd.DataFrame:
    """One row per model, smallest first."""
    rows = [{"model": name, **{c: m[c] for c in COLUMNS[1:]}} for name, m in metrics.items()]
    return pd.DataFrame(rows, columns=COLUMNS).sort_values("params", ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.assign(params=table["params"].map("{:,}".format))
    body = shown.to_markdown(index=False, floatfmt=".4f", colalign=["left"] + ["right"] * (len(COLUMNS) - 1))
    return "# CIFAR-3: FC vs CNN\n\n" + body + "\n"


def log_comparison(experiment_id: str, table: pd.DataFrame, run_ids: dict[str, str], files: list[Path]) -> None:
    tags = {"kind": "comparison", **{f"run.{name}": rid for name, rid in run_ids.items()}}
    with tracking.run(experiment_id, run_name="comparison", tags=tags):
        for row in table.to_dict("records"):
            mlflow.log_metrics({f"{row['model']}.{k}": float(row[k]) for k in COLUMNS[1:]})
        for path in files:
            mlflow.log_artifact(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--metrics-dir", "--run-info-dir", "--out-dir"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True, help="the models whose files are compare's deps")
    args = parser.parse_args()
    params = load_params(args.params)
    check_models(args.models, list(params.models))
    experiment_id = tracking.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    names = args.models
    table = comparison_table({n: read_metrics(args.metrics_dir / f"{n}.json") for n in names})
    run_ids = {n: tracking.read_run_info(args.run_info_dir / f"{n}.run.json")["run_id"] for n in names}
    out = {"md": args.out_dir / "comparison.md", "csv": args.out_dir / "comparison.csv",
           "png": args.out_dir / "accuracy_vs_params.png"}
    write_text_atomic(out["md"], to_markdown(table))
    write_text_atomic(out["csv"], table.to_csv(index=False))
    with atomic_path(out["png"]) as tmp:
        plots.save(plots.accuracy_vs_params(table.to_dict("records")), tmp, "png")
    log_comparison(experiment_id, table, run_ids, list(out.values()))
    log.info("\n%s", to_markdown(table))


if __name__ == "__main__":
    run_stage(main)
