"""What an evaluate stage measures and the files it writes: metrics JSON, per-class JSON, confusion CSV."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from cifar3study.errors import StageError
from cifar3study.files import write_json_atomic, write_text_atomic


@dataclasses.dataclass(frozen=True)
class ModelMetrics:
    """The headline numbers of one model: what `dvc metrics show` lists and compare reads."""

    params: int
    train_acc: float
    val_acc: float
    gap: float  # train_acc - val_acc: how much the model memorised
    val_macro_f1: float
    seconds_per_epoch: float
    images_per_second: float


@dataclasses.dataclass(frozen=True)
class ClassReport:
    precision: float
    recall: float
    f1: float
    support: int


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def model_metrics(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], n_params: int,
                  seconds_per_epoch: float, images_per_second: float) -> ModelMetrics:
    """`train` and `val` are (labels, predictions)."""
    train_acc, val_acc = accuracy(*train), accuracy(*val)
    return ModelMetrics(n_params, train_acc, val_acc, train_acc - val_acc, float(f1_score(*val, average="macro")),
                        seconds_per_epoch, images_per_second)


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> dict[str, ClassReport]:
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {name: ClassReport(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i, name in enumerate(classes)}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = actual class, columns = predicted class."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def write_metrics(path: Path, metrics: ModelMetrics) -> None:
    write_json_atomic(path, dataclasses.asdict(metrics))


def read_metrics(path: Path) -> ModelMetrics:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return ModelMetrics(**{f.name: (int if f.type == "int" else float)(raw[f.name])
                               for f in dataclasses.fields(ModelMetrics)})
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise StageError(f"cannot read metrics {path} ({type(err).__name__}: {err}); rerun its evaluate stage") from err


def write_per_class(path: Path, report: dict[str, ClassReport]) -> None:
    write_json_atomic(path, {name: dataclasses.asdict(r) for name, r in report.items()})


def write_confusion_csv(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> None:
    """One row per validation image, the shape DVC's confusion template reads."""
    lines = ["actual,predicted"] + [f"{classes[a]},{classes[p]}" for a, p in zip(y_true, y_pred)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_per_class(path: Path) -> dict[str, ClassReport]:
    """The per-class report, in label order."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {str(name): ClassReport(float(r["precision"]), float(r["recall"]), float(r["f1"]), int(r["support"]))
                for name, r in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise StageError(f"cannot read per-class report {path} ({type(err).__name__}: {err}); "
                         "rerun its evaluate stage") from err


def read_confusion_csv(path: Path, classes: tuple[str, ...]) -> np.ndarray:
    """The counts matrix (rows actual, columns predicted) of a confusion CSV."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        if not lines or lines[0] != "actual,predicted":
            raise ValueError("header is not 'actual,predicted'")
        for line in lines[1:]:
            actual, predicted = line.split(",")
            matrix[index[actual], index[predicted]] += 1
    except (OSError, ValueError, KeyError) as err:
        raise StageError(f"cannot read confusion file {path} ({type(err).__name__}: {err}); "
                         "rerun its evaluate stage") from err
    return matrix
