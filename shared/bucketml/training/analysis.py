"""What report.html shows about the chosen model, computed: the errors on the held-out rows
(confusion matrix, per-class scores, ROC and precision-recall curves; residuals) and which input
columns matter (the estimator's own importances, or permutation importance).

Numbers only: plots.py draws them and report.py lays them out. Runs in the train step
(sklearn, pandas); nothing here touches matplotlib or HTML.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from bucketml.contracts.card import SchemaColumn
from bucketml.encoding import datetime_input

MAX_POINTS = 1000  # scatter points per plot (a sample above this keeps the SVG small)
MAX_CURVE_POINTS = 400  # points per ROC / precision-recall curve
MAX_CURVES = 10  # classes drawn one-vs-rest (those with the most test rows)
PERMUTATION_ROWS = 500  # test rows used for permutation importance
PERMUTATION_REPEATS = 3
# The report is rendered before the version is published: when predicting is slow (a kernel
# SVM, an ensemble, many columns) fewer repeats, then fewer rows (down to PERMUTATION_MIN_ROWS)
# keep the shuffles within this budget.
PERMUTATION_BUDGET_SECONDS = 2.0
PERMUTATION_MIN_ROWS = 100


# --- classification ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassScores:
    label: str
    support: int
    precision: float
    recall: float
    f1: float


@dataclasses.dataclass(frozen=True)
class Curve:
    """One class against the rest: its ROC and precision-recall curves, thinned for drawing."""

    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    recall: np.ndarray
    precision: np.ndarray
    average_precision: float


@dataclasses.dataclass(frozen=True)
class ClassificationEvaluation:
    classes: list[str]
    matrix: np.ndarray  # rows: actual class, columns: predicted class
    per_class: list[ClassScores]
    has_probabilities: bool
    curves: list[Curve]
    curve_classes_present: int  # classes with both outcomes among the held-out rows (multiclass)
    positive_rate: float | None  # binary: the share of the positive class (a guessing model's precision)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2


def _thin(*arrays: np.ndarray, limit: int = MAX_CURVE_POINTS) -> list[np.ndarray]:
    """Every array at the same evenly spaced indexes (first and last kept)."""
    if len(arrays[0]) <= limit:
        return list(arrays)
    index = np.unique(np.linspace(0, len(arrays[0]) - 1, limit).round().astype(int))
    return [a[index] for a in arrays]


def evaluate_classification(pipeline: Any, x: pd.DataFrame, y: pd.Series) -> ClassificationEvaluation:
    from sklearn.metrics import (
        auc,
        average_precision_score,
        confusion_matrix,
        precision_recall_curve,
        precision_recall_fscore_support,
        roc_curve,
    )

    classes = [str(c) for c in pipeline.classes_]
    actual = y.astype(str).to_numpy()
    predicted = np.asarray(pipeline.predict(x)).astype(str)
    matrix = confusion_matrix(actual, predicted, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(actual, predicted, labels=classes, zero_division=0)
    per_class = [ClassScores(c, int(s), float(p), float(r), float(f))
                 for c, p, r, f, s in zip(classes, precision, recall, f1, support)]
    n = len(classes)
    if not hasattr(pipeline, "predict_proba"):
        return ClassificationEvaluation(classes, matrix, per_class, False, [], 0, None)
    probabilities = np.asarray(pipeline.predict_proba(x))
    present = [i for i in range(n) if 0 < support[i] < len(actual)]
    if n == 2:
        shown = [1]  # the second class is the positive one, as in sklearn
    else:
        shown = sorted(present, key=lambda i: -support[i])[:MAX_CURVES]
    curves = []
    for i in (i for i in shown if 0 < support[i] < len(actual)):  # a curve needs both outcomes
        truth = actual == classes[i]
        fpr, tpr, _ = roc_curve(truth, probabilities[:, i])
        area = float(auc(fpr, tpr))
        fpr, tpr = _thin(fpr, tpr)
        precision_, recall_, _ = precision_recall_curve(truth, probabilities[:, i])
        ap = float(average_precision_score(truth, probabilities[:, i]))
        recall_, precision_ = _thin(recall_, precision_)
        curves.append(Curve(classes[i], fpr, tpr, area, recall_, precision_, ap))
    positive_rate = float(np.mean(actual == classes[1])) if n == 2 else None
    return ClassificationEvaluation(classes, matrix, per_class, True, curves, len(present), positive_rate)


# --- regression ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RegressionEvaluation:
    actual: np.ndarray
    predicted: np.ndarray
    sample: np.ndarray  # the rows drawn in the scatter plots (all, or a random MAX_POINTS)

    @property
    def residual(self) -> np.ndarray:
        return self.actual - self.predicted

    @property
    def sampled(self) -> bool:
        return len(self.sample) < len(self.actual)


def evaluate_regression(pipeline: Any, x: pd.DataFrame, y: pd.Series) -> RegressionEvaluation:
    actual = y.to_numpy(dtype="float64")
    predicted = np.asarray(pipeline.predict(x), dtype="float64").reshape(-1)
    sample = np.arange(len(actual))
    if len(sample) > MAX_POINTS:
        sample = np.sort(np.random.default_rng(0).choice(len(actual), MAX_POINTS, replace=False))
    return RegressionEvaluation(actual, predicted, sample)


# --- feature importance ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Importance:
    """Importance per column a client sends.

    `method` "model": the estimator's own numbers, from `source` ("feature_importances_" of a
    forest, or the linear model's "coefficients", averaged over the classes when
    `mean_over_classes`). `method` "permutation": the drop of `score_name` on `rows` held-out
    rows over `repeats` shuffles, with `spreads`.
    """

    method: Literal["model", "permutation"]
    values: dict[str, float]  # client-facing column -> importance
    spreads: dict[str, float]  # column -> spread over the shuffles (permutation only)
    source: str | None = None
    mean_over_classes: bool = False
    score_name: str | None = None
    rows: int = 0
    repeats: int = 0

    def ranked(self) -> list[tuple[str, float]]:
        """Most important first."""
        return sorted(self.values.items(), key=lambda item: -item[1])


def _client_column(columns: Sequence[SchemaColumn]) -> dict[str, str]:
    """Model frame column -> the column a client sends (datetime parts -> their column)."""
    owner = {}
    for c in columns:
        owner[c.name] = c.name
        if c.type == "datetime":
            for part in c.parts or []:
                owner[datetime_input(c.name, part)] = c.name
    return owner


def _output_owners(prepare: Any) -> list[str] | None:
    """For each output feature of the fitted ColumnTransformer, the input column it comes from
    (one-hot parts -> their column), or None when the mapping is not certain."""
    from sklearn.preprocessing import OneHotEncoder

    owners: list[str] = []
    for _, transformer, columns in prepare.transformers_:
        if transformer == "drop" or len(columns) == 0:
            continue
        if transformer == "passthrough":
            owners.extend(columns)
            continue
        step = transformer.steps[-1][1] if hasattr(transformer, "steps") else transformer
        outputs = transformer.get_feature_names_out(columns)
        if isinstance(step, OneHotEncoder) and step.drop is None and not getattr(step, "infrequent_categories_", None):
            mapped = [col for col, categories in zip(columns, step.categories_) for _ in categories]
        elif len(outputs) == len(columns):
            mapped = list(columns)
        else:
            return None
        if len(mapped) != len(outputs):
            return None
        owners.extend(mapped)
    total = len(prepare.get_feature_names_out())
    return owners if len(owners) == total else None


def _model_importance(pipeline: Any, owner: dict[str, str]) -> Importance | None:
    """What the fitted estimator says about its inputs, summed per client column, or None."""
    steps = getattr(pipeline, "steps", None)
    if not steps or len(steps) < 2:
        return None
    prepare, estimator = steps[0][1], steps[-1][1]
    mean_over_classes = False
    if hasattr(estimator, "feature_importances_"):
        values = np.asarray(estimator.feature_importances_, dtype="float64").reshape(-1)
        source = "feature_importances_"
    elif hasattr(estimator, "coef_"):
        coef = np.atleast_2d(np.asarray(estimator.coef_, dtype="float64"))
        values = np.abs(coef).mean(axis=0)
        source, mean_over_classes = "coefficients", coef.shape[0] > 1
    else:
        return None
    try:
        owners = _output_owners(prepare)
    except (AttributeError, ValueError, TypeError):  # a transformer without feature names
        return None
    if owners is None or len(owners) != len(values):
        return None
    summed: dict[str, float] = {}
    for column, value in zip(owners, values):
        key = owner.get(column, column)
        summed[key] = summed.get(key, 0.0) + float(value)
    return Importance("model", summed, {}, source=source, mean_over_classes=mean_over_classes)


def _permutation_importance(pipeline: Any, task: str, owner: dict[str, str], x: pd.DataFrame, y: pd.Series) -> Importance:
    """Drop in accuracy (R² for regression) when one client column's values are shuffled
    across the held-out rows (all parts of a date column together)."""
    from sklearn.metrics import accuracy_score, r2_score

    if len(x) > PERMUTATION_ROWS:
        picked = np.sort(np.random.default_rng(0).choice(len(x), PERMUTATION_ROWS, replace=False))
        x, y = x.iloc[picked], y.iloc[picked]
    x = x.reset_index(drop=True)
    truth = y.astype(str).to_numpy() if task == "classification" else y.to_numpy(dtype="float64")

    def metric(frame: pd.DataFrame) -> float:
        predicted = np.asarray(pipeline.predict(frame))
        if task == "classification":
            return float(accuracy_score(truth, predicted.astype(str)))
        return float(r2_score(truth, predicted.astype("float64").reshape(-1)))

    groups: dict[str, list[str]] = {}
    for frame_column in x.columns:
        groups.setdefault(owner.get(frame_column, frame_column), []).append(frame_column)
    started = time.perf_counter()
    base = metric(x)
    one = max(time.perf_counter() - started, 1e-4)
    # As many shuffles as fit the time budget, given how long one prediction took; then as
    # many rows (a prediction's cost grows with them).
    shuffles = PERMUTATION_BUDGET_SECONDS / (one * max(1, len(groups)))
    repeats = int(max(1, min(PERMUTATION_REPEATS, shuffles)))
    if shuffles < 1 and len(x) > PERMUTATION_MIN_ROWS:
        keep = max(PERMUTATION_MIN_ROWS, int(len(x) * shuffles))
        x, truth = x.iloc[:keep].reset_index(drop=True), truth[:keep]
        base = metric(x)
    rng = np.random.default_rng(0)
    means, spreads = {}, {}
    for column, frame_columns in groups.items():
        drops = []
        for _ in range(repeats):
            order = rng.permutation(len(x))
            shuffled = x.copy()
            for c in frame_columns:
                shuffled[c] = x[c].to_numpy()[order]
            drops.append(base - metric(shuffled))
        means[column], spreads[column] = float(np.mean(drops)), float(np.std(drops))
    score_name = "accuracy" if task == "classification" else "R²"
    return Importance("permutation", means, spreads, score_name=score_name, rows=len(x), repeats=repeats)


def feature_importance(
    pipeline: Any, task: str, columns: Sequence[SchemaColumn], x: pd.DataFrame, y: pd.Series
) -> Importance:
    """Importance per column a client sends: the estimator's own numbers when it has them
    (forests: `feature_importances_`; linear models: |coefficients|), mapped back through the
    ColumnTransformer's output features (one-hot parts and date parts summed per column);
    otherwise (gradient boosting, SVMs) permutation importance on the held-out rows."""
    owner = _client_column(columns)
    found = _model_importance(pipeline, owner) or _permutation_importance(pipeline, task, owner, x, y)
    known = {c.name for c in columns}
    return dataclasses.replace(found, values={k: v for k, v in found.values.items() if k in known})
