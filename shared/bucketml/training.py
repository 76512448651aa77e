"""Candidate pipelines, their evaluation on the held-out split, and the choice of the best.

Every candidate is a whole sklearn Pipeline from raw columns (imputation, one-hot encoding,
scaling where the estimator needs it) so the exported ONNX model takes raw records.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR
from threadpoolctl import threadpool_limits

from .columns import model_columns
from .spec import (
    ALGORITHMS,
    DEFAULT_METRIC,
    LOWER_IS_BETTER,
    METRICS,
    algorithms_for,
    metric_for,
    with_defaults,
)

SEED = 42
# An exact kernel SVM grows quadratically with rows; above this it is fitted on a sample.
SVM_MAX_ROWS = 5000
PRIMARY_METRIC = DEFAULT_METRIC  # the selection metric when the spec names none
# Above this largest/smallest class ratio in the training rows, classes are weighted "balanced".
IMBALANCE_RATIO = 3.0
# Estimators that take only dense input (the one-hot encoding is then dense too).
DENSE_INPUT = frozenset({"gradient_boosting"})


class TrainingError(Exception):
    """Training could not produce a model; the message says why."""


@dataclasses.dataclass
class Candidate:
    name: str
    pipeline: Pipeline
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    fit_seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "metrics": self.metrics, "fit_seconds": round(self.fit_seconds, 3), "notes": self.notes}


def preprocessor(columns: list[dict[str, str]], scale: bool, dense: bool = False) -> ColumnTransformer:
    # Datetime parts are numbers; booleans ('true'/'false'/'') are categories.
    numbers, strings = model_columns(columns)
    number_steps = [("impute", SimpleImputer(strategy="median"))]
    if scale:  # not in front of trees: it changes nothing for them and breaks ONNX parity
        number_steps.append(("scale", StandardScaler()))
    parts = []
    if numbers:
        parts.append(("numbers", Pipeline(number_steps), numbers))
    if strings:
        # Missing strings arrive as '' (a category of their own); unseen ones encode as all zeros.
        parts.append(("strings", OneHotEncoder(handle_unknown="ignore"), strings))
    return ColumnTransformer(parts, sparse_threshold=0 if dense else 0.3)


def estimators(task: str, balanced: bool = False) -> dict[str, tuple[Callable[[], Any], bool]]:
    """name -> (factory, needs scaling), in the fixed order they are fitted: roughly cheapest
    first on large data (the SVM is capped at SVM_MAX_ROWS rows), so a training budget
    (max_training_seconds) spends itself on the likeliest-useful candidates. On a tie of
    scores the earlier one wins.

    `balanced`: weight classes inversely to their frequency (an imbalanced target).
    HistGradientBoosting is used without `categorical_features` (skl2onnx converts that but
    the ONNX model predicts wrongly); strings reach it one-hot encoded like everywhere else.
    """
    weight = "balanced" if balanced else None
    if task == "classification":
        return {
            "logistic_regression": (lambda: LogisticRegression(max_iter=1000, class_weight=weight), True),
            "svm": (lambda: CalibratedClassifierCV(SVC(kernel="rbf", random_state=SEED, class_weight=weight), cv=3), True),
            "gradient_boosting": (lambda: HistGradientBoostingClassifier(random_state=SEED, class_weight=weight), False),
            "random_forest": (
                lambda: RandomForestClassifier(n_estimators=100, random_state=SEED, n_jobs=1, class_weight=weight), False
            ),
        }
    return {
        "ridge": (lambda: Ridge(), True),
        "svm": (lambda: SVR(kernel="rbf"), True),
        "gradient_boosting": (lambda: HistGradientBoostingRegressor(random_state=SEED), False),
        "random_forest": (lambda: RandomForestRegressor(n_estimators=100, random_state=SEED, n_jobs=1), False),
    }


def evaluate(task: str, pipeline: Pipeline, x: pd.DataFrame, y: pd.Series) -> dict[str, float]:
    return score(task, y, pipeline.predict(x))


def score(task: str, y, predicted) -> dict[str, float]:
    """Every metric of the task (spec.METRICS) for predictions `predicted` of true values `y`."""
    if task == "classification":
        return {
            "accuracy": float(accuracy_score(y, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "f1_macro": float(f1_score(y, predicted, average="macro")),
        }
    return {
        "r2": float(r2_score(y, predicted)),
        "rmse": float(np.sqrt(mean_squared_error(y, predicted))),
        "mae": float(mean_absolute_error(y, predicted)),
    }


def float32_thresholds(model) -> None:
    """Round a fitted HistGradientBoosting model's split thresholds down to float32 numbers.

    It compares float64 thresholds (midpoints of bin edges); the ONNX tree ensemble compares
    float32 ones, and a threshold rounded *up* sends an input equal to the rounded value the
    other way (seen: 1 of 89 diabetes test rows off by 1.4%). Inputs are float32 numbers
    (the schema says so), and for a float32 x, x <= t exactly when x <= the largest float32
    <= t: sklearn's predictions do not change, and the converter's cast becomes exact.
    """
    for predictors in getattr(model, "_predictors", []):
        for predictor in predictors:
            thresholds = predictor.nodes["num_threshold"]
            rounded = thresholds.astype(np.float32)
            up = rounded.astype(np.float64) > thresholds
            rounded[up] = np.nextafter(rounded[up], np.float32(-np.inf))
            predictor.nodes["num_threshold"] = rounded.astype(np.float64)


def class_ratio(y: pd.Series) -> float:
    """Largest over smallest class count."""
    counts = y.value_counts()
    return float(counts.max() / counts.min()) if len(counts) else 1.0


def fit_candidates(
    schema: dict[str, Any], train: tuple, test: tuple, spec: dict[str, Any] | None = None
) -> tuple[list[Candidate], list[str], list[dict[str, str]]]:
    """Fit and score the spec's candidates in the fixed order of `estimators`.

    Returns (fitted ones best first by the spec's metric, failures, skipped). `spec` is the
    effective dataset spec (default: schema["spec"], else spec.DEFAULTS). Once
    `max_training_seconds` is spent the remaining candidates are skipped, but one candidate
    is always fitted.
    """
    spec = with_defaults(spec if spec is not None else schema.get("spec"))
    task, columns = schema["task"], schema["columns"]
    metric = metric_for(spec, task)
    wanted = algorithms_for(spec, task)
    unknown = [name for name in wanted if name not in ALGORITHMS[task]]
    if metric not in METRICS[task] or unknown:
        raise TrainingError(f"the spec does not fit a {task} task: metric {metric!r}, algorithms {wanted}")
    budget = float(spec["max_training_seconds"])
    x_train, y_train = train
    x_test, y_test = test
    balanced_note = None
    if task == "classification":
        ratio = class_ratio(y_train)
        if ratio > IMBALANCE_RATIO:
            balanced_note = f"class_weight: balanced (largest/smallest class ratio {ratio:.1f} > {IMBALANCE_RATIO:g})"
    fitted, failures, skipped = [], [], []
    started_all = time.perf_counter()
    for name, (factory, scale) in estimators(task, balanced=balanced_note is not None).items():
        if name not in wanted:
            continue
        spent = time.perf_counter() - started_all
        if fitted and spent >= budget:
            skipped.append({"name": name, "reason": f"max_training_seconds={budget:g} spent ({spent:.2f} s elapsed)"})
            continue
        pipeline = Pipeline([("prepare", preprocessor(columns, scale, dense=name in DENSE_INPUT)), ("model", factory())])
        candidate = Candidate(name, pipeline)
        if balanced_note:  # every classification candidate takes class_weight
            candidate.notes.append(balanced_note)
        x_fit, y_fit = x_train, y_train
        if name == "svm" and len(x_train) > SVM_MAX_ROWS:
            x_fit = x_train.sample(SVM_MAX_ROWS, random_state=SEED)
            y_fit = y_train.loc[x_fit.index]
            candidate.notes.append(f"fitted on a sample of {SVM_MAX_ROWS} of {len(x_train)} rows")
        started = time.perf_counter()
        try:
            # One OpenMP thread (HistGradientBoosting), like n_jobs=1 for the forest: on a shared
            # or busy CPU, OpenMP's spinning threads made a 350-row fit take seconds, not 0.1 s.
            with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="openmp"):
                warnings.simplefilter("ignore", category=UserWarning)
                candidate.pipeline.fit(x_fit, y_fit)
                if name == "gradient_boosting":
                    float32_thresholds(candidate.pipeline.named_steps["model"])
                candidate.metrics = evaluate(task, candidate.pipeline, x_test, y_test)
        except ValueError as exc:  # e.g. too few rows of a class for the SVM's calibration folds
            failures.append(f"{name}: {exc}")
            continue
        finally:
            candidate.fit_seconds = time.perf_counter() - started
        fitted.append(candidate)
    if not fitted:
        raise TrainingError("no candidate could be trained: " + "; ".join(failures))
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    # Stable sort: on a tie the earlier (cheaper, simpler to explain) candidate wins.
    return sorted(fitted, key=lambda c: sign * c.metrics[metric]), failures, skipped
