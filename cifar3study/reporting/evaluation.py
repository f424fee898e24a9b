"""What an evaluate stage measures over a seed group, and the files it writes (read back by compare).

`data/metrics/<model>.json` holds flat keys that `dvc metrics show` lists:
`train_acc`, `val_acc`, `gap` and `val_macro_f1` are means over the seeds,
with `_std` (sample), `_min`, `_max`, `_n`, `_ci95_low`/`_ci95_high` (Student
t) and `_seed<k>` beside each. A run with data.holdout > 0 is evaluated on the
part held out of the training split instead: `holdout_acc` and
`holdout_macro_f1` replace the `val_` keys, and the file has no `val_` key.
The per-class report and the confusion rows pool the predictions of every
seed, and say so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from cifar3study.errors import StageError, one_line, quote
from cifar3study.files import read_capped, write_json_atomic, write_text_atomic

SPLITS = ("val", "holdout")  # the CIFAR-10 test batch; a part held out of the training split (data.holdout)
SPEED_KEYS = ("seconds_per_epoch", "group_seconds_per_epoch", "images_per_second")
MAX_METRICS_BYTES = 1 << 20  # a record is about 2 KiB plus 150 bytes a seed; a bigger file is not read at all


@dataclasses.dataclass(frozen=True)
class Spread:
    """One metric over a seed group."""

    per_seed: dict[int, float]
    mean: float
    std: float | None  # sample standard deviation; None for a single seed
    ci95: tuple[float, float] | None  # Student t 95% interval of the mean; None for a single seed

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def min(self) -> float:
        return min(self.per_seed.values())

    @property
    def max(self) -> float:
        return max(self.per_seed.values())


def spread(per_seed: dict[int, float]) -> Spread:
    values = np.array(list(per_seed.values()), dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return Spread(dict(per_seed), mean, None, None)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))
    return Spread(dict(per_seed), mean, std, (mean - half, mean + half))


def spread_keys(split: str) -> tuple[str, ...]:
    """The metrics of a model evaluated on `split`, in the file's order."""
    return ("train_acc", f"{split}_acc", "gap", f"{split}_macro_f1")


SPREAD_KEYS = spread_keys("val")


@dataclasses.dataclass(frozen=True)
class ModelMetrics:
    """The headline numbers of one model's seed group: what `dvc metrics show` lists and compare reads.

    Accuracy and F1 are on one evaluation split: `val_acc`/`val_macro_f1` are set for the validation split and
    None for a holdout run, `holdout_acc`/`holdout_macro_f1` the other way round; `split`, `eval_acc` and
    `eval_macro_f1` read whichever is set.
    """

    params: int
    train_acc: Spread  # on what trained: the training split, or its rest after the holdout
    val_acc: Spread | None
    gap: Spread  # train_acc - the evaluation split's accuracy: how much the models memorised
    val_macro_f1: Spread | None
    seconds_per_epoch: float  # one epoch of one seed: the group's time divided by its size
    group_seconds_per_epoch: float
    images_per_second: float
    holdout_acc: Spread | None = None
    holdout_macro_f1: Spread | None = None

    @property
    def split(self) -> str:
        """"val" or "holdout": the split `eval_acc` and `eval_macro_f1` are on."""
        return "holdout" if self.holdout_acc is not None else "val"

    @property
    def eval_acc(self) -> Spread:
        return getattr(self, f"{self.split}_acc")

    @property
    def eval_macro_f1(self) -> Spread:
        return getattr(self, f"{self.split}_macro_f1")


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def seed_metrics(train: tuple[np.ndarray, np.ndarray], evaluated: tuple[np.ndarray, np.ndarray],
                 split: str = "val") -> dict[str, float]:
    """One seed's headline numbers; `train` and `evaluated` (on `split`) are (labels, predictions)."""
    train_acc, eval_acc = accuracy(*train), accuracy(*evaluated)
    return {"train_acc": train_acc, f"{split}_acc": eval_acc, "gap": train_acc - eval_acc,
            f"{split}_macro_f1": float(f1_score(*evaluated, average="macro"))}


def _build(n_params: int, spreads: dict[str, Spread], speed: dict[str, float]) -> ModelMetrics:
    return ModelMetrics(n_params, **{"val_acc": None, "val_macro_f1": None, **spreads}, **speed)


def model_metrics(per_seed: dict[int, dict[str, float]], n_params: int, speed: dict[str, float],
                  split: str = "val") -> ModelMetrics:
    spreads = {key: spread({seed: m[key] for seed, m in per_seed.items()}) for key in spread_keys(split)}
    return _build(n_params, spreads, {key: speed[key] for key in SPEED_KEYS})


def flat(metrics: ModelMetrics) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {"params": metrics.params}
    for key in spread_keys(metrics.split):
        s: Spread = getattr(metrics, key)
        out.update({key: s.mean, f"{key}_std": s.std, f"{key}_min": s.min, f"{key}_max": s.max, f"{key}_n": s.n,
                    f"{key}_ci95_low": s.ci95[0] if s.ci95 else None, f"{key}_ci95_high": s.ci95[1] if s.ci95 else None})
        out.update({f"{key}_seed{seed}": v for seed, v in s.per_seed.items()})
    out.update({key: getattr(metrics, key) for key in SPEED_KEYS})
    return out


def write_metrics(path: Path, metrics: ModelMetrics) -> None:
    write_json_atomic(path, flat(metrics))


def _spread_from(raw: dict, key: str) -> Spread:
    prefix = f"{key}_seed"
    per_seed = {int(k.removeprefix(prefix)): float(v) for k, v in raw.items() if k.startswith(prefix)}
    if not per_seed:
        raise KeyError(f"{key}_seed<k>")
    ci = (float(raw[f"{key}_ci95_low"]), float(raw[f"{key}_ci95_high"])) if raw[f"{key}_ci95_low"] is not None else None
    std = float(raw[f"{key}_std"]) if raw[f"{key}_std"] is not None else None
    return Spread(per_seed, float(raw[key]), std, ci)


def _finite_numbers(path: Path, raw: object) -> dict:
    """The flat record, every value a finite number or null (no spread for one seed): NaN would be reported as one."""
    if not isinstance(raw, dict):
        raise StageError(f"metrics {path} is not a JSON object; rerun its evaluate stage")
    for key, value in raw.items():
        finite = (type(value) is float and math.isfinite(value)) or (type(value) is int and abs(value) < 1 << 63)
        if not (finite or value is None):
            raise StageError(f"metrics {path}: {quote(key)} is {quote(value)}, not a finite number; "
                             "rerun its evaluate stage")
    return raw


def read_metrics(path: Path) -> ModelMetrics:
    try:
        raw = _finite_numbers(path, json.loads(read_capped(path, MAX_METRICS_BYTES).decode("utf-8")))
        split = "holdout" if "holdout_acc" in raw else "val"
        return _build(int(raw["params"]), {k: _spread_from(raw, k) for k in spread_keys(split)},
                      {k: float(raw[k]) for k in SPEED_KEYS})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise StageError(f"cannot read metrics {path} ({type(err).__name__}: {one_line(err, 160)}); "
                         "rerun its evaluate stage") from err


@dataclasses.dataclass(frozen=True)
class ClassReport:
    precision: float
    recall: float
    f1: float
    support: int


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> dict[str, ClassReport]:
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {name: ClassReport(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i, name in enumerate(classes)}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = actual class, columns = predicted class."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def write_per_class(path: Path, report: dict[str, ClassReport], seeds: tuple[int, ...]) -> None:
    write_json_atomic(path, {"pooled_over_seeds": list(seeds),
                             "classes": {name: dataclasses.asdict(r) for name, r in report.items()}})


def read_per_class(path: Path) -> dict[str, ClassReport]:
    """The per-class report, in label order."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))["classes"]
        return {str(name): ClassReport(float(r["precision"]), float(r["recall"]), float(r["f1"]), int(r["support"]))
                for name, r in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise StageError(f"cannot read per-class report {path} ({type(err).__name__}: {err}); "
                         "rerun its evaluate stage") from err


def write_confusion_csv(path: Path, y_true: dict[int, np.ndarray], y_pred: dict[int, np.ndarray],
                        classes: tuple[str, ...]) -> None:
    """One row per evaluated image and seed (column `seed`), the shape DVC's confusion template reads."""
    lines = ["actual,predicted,seed"] + [f"{classes[a]},{classes[p]},{seed}" for seed in y_true
                                         for a, p in zip(y_true[seed], y_pred[seed])]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_confusion_csv(path: Path, classes: tuple[str, ...]) -> np.ndarray:
    """The counts matrix (rows actual, columns predicted) of a confusion CSV, summed over its seeds."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        if not lines or lines[0] != "actual,predicted,seed":
            raise ValueError("header is not 'actual,predicted,seed'")
        for line in lines[1:]:
            actual, predicted, _ = line.split(",")
            matrix[index[actual], index[predicted]] += 1
    except (OSError, ValueError, KeyError) as err:
        raise StageError(f"cannot read confusion file {path} ({type(err).__name__}: {err}); "
                         "rerun its evaluate stage") from err
    return matrix
