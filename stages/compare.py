"""Stage `compare`: every model of params.yaml in one table and a few figures, also in MLflow.

The table goes to a separate `comparison` run: DVC runs each stage as its own
process and may skip or restore any of them from its cache, so a parent run
opened before training could be left dangling, while a run made here only
ever summarises finished models. Each model's run gets its figures here too,
so editing a figure redraws them without retraining anything.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import mlflow
from matplotlib.figure import Figure

from cifar3study import evaluation, figures, report, run_logging, tracking
from cifar3study.cli import run_stage
from cifar3study.files import atomic_path, write_text_atomic
from cifar3study.history import EpochRecord, read_history
from cifar3study.params import load_params
from cifar3study.run_info import read_run_info

log = logging.getLogger("compare")


def model_figures(name: str, history: list[EpochRecord], eval_dir: Path) -> dict[str, Figure]:
    classes = tuple(evaluation.read_per_class(eval_dir / name / "per_class.json"))
    matrix = evaluation.read_confusion_csv(eval_dir / name / "confusion.csv", classes)
    return {"learning_curves.png": figures.learning_curves(history, name),
            "confusion_matrix.png": figures.confusion(matrix, classes, f"{name}: validation")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--metrics-dir", "--runs-dir", "--history-dir", "--eval-dir", "--out-dir"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--lock", type=Path, help="dvc.lock, logged to the comparison run when present")
    args = parser.parse_args()
    params = load_params(args.params)
    experiment_id = tracking.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    names = list(params.models)
    metrics = {n: evaluation.read_metrics(args.metrics_dir / f"{n}.json") for n in names}
    runs = {n: read_run_info(args.runs_dir / f"{n}.json") for n in names}
    for name, info in runs.items():
        tracking.model_run(info.run_id, experiment_id, name)
    histories = {n: read_history(args.history_dir / f"{n}.csv") for n in names}
    per_model = {n: model_figures(n, histories[n], args.eval_dir) for n in names}
    table = report.comparison_table(metrics)
    out = {"md": args.out_dir / "comparison.md", "csv": args.out_dir / "comparison.csv",
           "curves": args.out_dir / "learning_curves.csv", "png": args.out_dir / "accuracy_vs_params.png"}
    write_text_atomic(out["md"], report.to_markdown(table))
    write_text_atomic(out["csv"], report.to_csv(table))
    write_text_atomic(out["curves"], report.to_csv(report.curves_table({n: [h] for n, h in histories.items()})))
    with atomic_path(out["png"]) as tmp:
        figures.save_png(figures.accuracy_vs_params(metrics), tmp)
    for name, figs in per_model.items():
        run_logging.log_figures(runs[name].run_id, figs)
    files = [*out.values(), *([args.lock] if args.lock else [])]
    digest = "-".join(run_logging.params_digest(n, params)[:3] for n in names)
    tags = {**tracking.process_tags(), **({"dvc.exp_name": os.environ["DVC_EXP_NAME"]} if "DVC_EXP_NAME" in os.environ
                                         else {})}
    run_logging.log_comparison(experiment_id, run_logging.run_name("comparison", os.environ, digest),
                               table.to_dict("records"), {n: r.run_id for n, r in runs.items()}, files, tags)
    log.info("\n%s", report.to_markdown(table))
    log.info("in MLflow (`mlflow ui`): %s", tracking.runs_page(mlflow.get_tracking_uri(), experiment_id))


if __name__ == "__main__":
    run_stage(main)
