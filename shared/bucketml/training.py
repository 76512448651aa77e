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
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
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

SEED = 42
# An exact kernel SVM grows quadratically with rows; above this it is fitted on a sample.
SVM_MAX_ROWS = 5000
PRIMARY_METRIC = {"classification": "accuracy", "regression": "r2"}


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


def preprocessor(columns: list[dict[str, str]], scale: bool) -> ColumnTransformer:
    numbers = [c["name"] for c in columns if c["type"] == "number"]
    strings = [c["name"] for c in columns if c["type"] == "string"]
    number_steps = [("impute", SimpleImputer(strategy="median"))]
    if scale:  # not in front of trees: it changes nothing for them and breaks ONNX parity
        number_steps.append(("scale", StandardScaler()))
    parts = []
    if numbers:
        parts.append(("numbers", Pipeline(number_steps), numbers))
    if strings:
        # Missing strings arrive as '' (a category of their own); unseen ones encode as all zeros.
        parts.append(("strings", OneHotEncoder(handle_unknown="ignore"), strings))
    return ColumnTransformer(parts)


def estimators(task: str) -> dict[str, tuple[Callable[[], Any], bool]]:
    """name -> (factory, needs scaling)."""
    if task == "classification":
        return {
            "svm": (lambda: CalibratedClassifierCV(SVC(kernel="rbf", random_state=SEED), cv=3), True),
            "random_forest": (lambda: RandomForestClassifier(n_estimators=100, random_state=SEED, n_jobs=1), False),
            "logistic_regression": (lambda: LogisticRegression(max_iter=1000), True),
        }
    return {
        "svm": (lambda: SVR(kernel="rbf"), True),
        "random_forest": (lambda: RandomForestRegressor(n_estimators=100, random_state=SEED, n_jobs=1), False),
        "ridge": (lambda: Ridge(), True),
    }


def evaluate(task: str, pipeline: Pipeline, x: pd.DataFrame, y: pd.Series) -> dict[str, float]:
    predicted = pipeline.predict(x)
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


def fit_candidates(schema: dict[str, Any], train: tuple, test: tuple) -> tuple[list[Candidate], list[str]]:
    """Fit and score every candidate: (fitted ones best first by the task's metric, failures)."""
    task, columns = schema["task"], schema["columns"]
    x_train, y_train = train
    x_test, y_test = test
    fitted, failures = [], []
    for name, (factory, scale) in estimators(task).items():
        candidate = Candidate(name, Pipeline([("prepare", preprocessor(columns, scale)), ("model", factory())]))
        x_fit, y_fit = x_train, y_train
        if name == "svm" and len(x_train) > SVM_MAX_ROWS:
            x_fit = x_train.sample(SVM_MAX_ROWS, random_state=SEED)
            y_fit = y_train.loc[x_fit.index]
            candidate.notes.append(f"fitted on a sample of {SVM_MAX_ROWS} of {len(x_train)} rows")
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                candidate.pipeline.fit(x_fit, y_fit)
            candidate.metrics = evaluate(task, candidate.pipeline, x_test, y_test)
        except ValueError as exc:  # e.g. too few rows of a class for the SVM's calibration folds
            failures.append(f"{name}: {exc}")
            continue
        finally:
            candidate.fit_seconds = time.perf_counter() - started
        fitted.append(candidate)
    if not fitted:
        raise TrainingError("no candidate could be trained: " + "; ".join(failures))
    metric = PRIMARY_METRIC[task]
    # Stable sort: on a tie the earlier (simpler to explain) candidate wins.
    return sorted(fitted, key=lambda c: -c.metrics[metric]), failures
