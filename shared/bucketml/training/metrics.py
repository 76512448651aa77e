"""The metrics of the spec (contracts.spec.METRICS): on a cross-validation fold, to choose, and on
the held-out rows, for the card."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.pipeline import Pipeline

from bucketml.contracts.spec import METRICS, PROBABILITY_METRICS


def evaluation(task: str, pipeline: Pipeline, x: pd.DataFrame, y: pd.Series) -> tuple[dict[str, float | None], dict[str, Any] | None]:
    """(every metric of the task, confusion matrix) of a fitted pipeline on held-out rows.

    Classification metrics include roc_auc and log_loss from the predicted probabilities with
    the model's class list; the confusion matrix has the true classes as rows and the
    predicted ones as columns, both in the order of `labels` (the model's classes)."""
    predicted = pipeline.predict(x)
    if task != "classification":
        return score(task, y, predicted), None
    classes = [str(c) for c in pipeline.classes_]
    metrics = score(task, y, predicted, pipeline.predict_proba(x), classes)
    matrix = confusion_matrix(np.asarray(y).astype(str), np.asarray(predicted).astype(str), labels=classes)
    confusion = {"labels": classes, "rows": "true class", "columns": "predicted class", "matrix": matrix.tolist()}
    return metrics, confusion


def score(task: str, y, predicted, probabilities=None, classes: list[str] | None = None, strict: bool = True) -> dict[str, float | None]:
    """Every metric of the task (spec.METRICS) for predictions `predicted` of true values `y`.

    The probability metrics (roc_auc, log_loss) need `probabilities`, one column per class of
    `classes` (the model's class list, in its order); without them they are left out. roc_auc
    is None when it is undefined: a class of the model has no row in `y` (`strict`, as on the
    held-out rows), or, not strict (cross-validation folds), when no class has both.
    """
    names = [m for m in METRICS[task] if probabilities is not None or m not in PROBABILITY_METRICS]
    return {m: metric_value(m, y, predicted, probabilities, classes, strict) for m in names}


def metric_value(metric: str, y, predicted, probabilities=None, classes: list[str] | None = None, strict: bool = True) -> float | None:
    """One metric of `score` (cross-validation folds compute only the selection metric)."""
    if metric == "accuracy":
        return float(accuracy_score(y, predicted))
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(y, predicted))
    if metric == "f1_macro":
        return float(f1_score(y, predicted, average="macro"))
    if metric == "roc_auc":
        return roc_auc(np.asarray(y).astype(str), probabilities, [str(c) for c in classes], strict)
    if metric == "log_loss":
        return float(log_loss(np.asarray(y).astype(str), probabilities, labels=[str(c) for c in classes]))
    if metric == "r2":
        return float(r2_score(y, predicted))
    if metric == "rmse":
        return float(np.sqrt(mean_squared_error(y, predicted)))
    if metric == "mae":
        return float(mean_absolute_error(y, predicted))
    raise ValueError(f"unknown metric {metric!r}")


def roc_auc(y: np.ndarray, probabilities: np.ndarray, classes: list[str], strict: bool = True) -> float | None:
    """ROC AUC: binary from the positive (second) class's probability; multiclass one-vs-rest,
    the macro mean of each class against the rest (what sklearn's multi_class="ovr" computes)."""
    if len(classes) == 2:
        positive = y == classes[1]
        if positive.all() or not positive.any():
            return None
        return float(roc_auc_score(positive, probabilities[:, 1]))
    per_class = []
    for column, label in enumerate(classes):
        positive = y == label
        if positive.all() or not positive.any():
            if strict:
                return None
            continue
        per_class.append(roc_auc_score(positive, probabilities[:, column]))
    return float(np.mean(per_class)) if per_class else None
