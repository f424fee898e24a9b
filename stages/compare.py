"""Stage `compare`: every model of params.yaml in one report, mean ± spread over seeds, also in MLflow.

The report also goes to a separate `comparison` run: DVC runs each stage as
its own process and may skip or restore any of them from its cache, so a run
opened before training could be left dangling, while one made here only ever
summarises finished models. Each model's parent run gets its figures here
too, so editing a figure redraws them without retraining anything.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import mlflow
from matplotlib.figure import Figure

from cifar3study.cli import run_stage
from cifar3study.errors import StageError
from cifar3study.files import atomic_path, write_text_atomic
from cifar3study.params import load_params
from cifar3study.reporting import evaluation, figures, report
from cifar3study.tracking import run_logging, store
from cifar3study.training.history import EpochRecord, read_history
from cifar3study.training.run_info import read_run_info

log = logging.getLogger("compare")


def model_figures(name: str, history: list[EpochRecord], eval_dir: Path, metrics: evaluation.ModelMetrics) \
        -> dict[str, Figure]:
    classes = tuple(evaluation.read_per_class(eval_dir / name / "per_class.json"))
    matrix = evaluation.read_confusion_csv(eval_dir / name / "confusion.csv", classes)
    title = f"{name}: {report.SPLIT_NAMES[metrics.split]}, {metrics.eval_acc.n} seeds pooled"
    return {"learning_curves.png": figures.learning_curves(history, name),
            "confusion_matrix.png": figures.confusion(matrix, classes, title)}


def check_histories(histories: dict[str, list[EpochRecord]], split: str, folder: Path) -> None:
    """Every model's learning curves are on the split its metrics are on."""
    for name, history in histories.items():
        if history and history[0].split != split:
            raise StageError(f"{folder / name}.csv holds {history[0].split} curves, but the metrics are on {split}; "
                             "rerun `dvc repro` so every stage uses the same data.holdout")


def comparison_metrics(table: list[dict], diffs: list[report.Difference], split: str) -> dict[str, float]:
    values = {f"{row['model']}.{k}": v for row in table for k, v in row.items() if k != "model"}
    for d in diffs:
        values |= {f"{d.a}-{d.b}.{split}_acc_diff": d.diff, f"{d.a}-{d.b}.p_value": d.p_value}
    return {k: float(v) for k, v in values.items() if v is not None and v == v}  # no None, no NaN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--params", "--metrics-dir", "--runs-dir", "--history-dir", "--eval-dir", "--out-dir"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--lock", type=Path, help="dvc.lock, logged to the comparison run when present")
    args = parser.parse_args()
    params = load_params(args.params)
    experiment_id = store.connect(os.environ, Path.cwd(), params.mlflow.experiment)
    names = list(params.models)  # the only list of models; stale files of removed ones are ignored
    metrics = {n: evaluation.read_metrics(args.metrics_dir / f"{n}.json") for n in names}
    runs = {n: read_run_info(args.runs_dir / f"{n}.json") for n in names}
    for name, info in runs.items():
        store.check_group(store.GroupRuns(info.run_id, info.seed_runs), experiment_id, name)
    histories = {n: read_history(args.history_dir / f"{n}.csv") for n in names}
    split = report.split_of(metrics)
    check_histories(histories, split, args.history_dir)
    per_model = {n: model_figures(n, histories[n], args.eval_dir, metrics[n]) for n in names}
    table, diffs = report.comparison_table(metrics), report.differences(metrics)
    out = {"md": args.out_dir / "comparison.md", "csv": args.out_dir / "comparison.csv",
           "curves": args.out_dir / "learning_curves.csv", "png": args.out_dir / "accuracy_vs_params.png",
           "curves_png": args.out_dir / "learning_curves.png"}
    write_text_atomic(out["md"], report.to_markdown(table, diffs))
    write_text_atomic(out["csv"], report.to_csv(table))
    write_text_atomic(out["curves"], report.to_csv(report.curves_table(histories)))
    for key, fig in (("png", figures.accuracy_vs_params(metrics)), ("curves_png", figures.compared_curves(histories))):
        with atomic_path(out[key]) as tmp:
            figures.save_png(fig, tmp)
    for name, figs in per_model.items():
        run_logging.log_figures(runs[name].run_id, figs)
    digest = "-".join(run_logging.params_digest(n, params)[:3] for n in names)
    tags = {**store.process_tags(), **store.context_tags(os.environ)}
    run_logging.log_comparison(experiment_id, run_logging.run_name("comparison", os.environ, digest),
                               comparison_metrics(table.to_dict("records"), diffs, split), {n: r.run_id for n, r in runs.items()},
                               [*out.values(), *([args.lock] if args.lock else [])], tags)
    log.info("\n%s", report.to_markdown(table, diffs))
    log.info("in MLflow (`mlflow ui`): %s", store.runs_page(mlflow.get_tracking_uri(), experiment_id))


if __name__ == "__main__":
    run_stage(main)
