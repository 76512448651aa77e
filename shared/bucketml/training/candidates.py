"""The candidate models: their estimators per task, the preprocessing in front of them, the
hyperparameter settings the search tries, class weighting and the SVM's switch to a linear
variant on large data (docs/architecture.md, "Training").

Every candidate is a whole sklearn Pipeline from raw columns (imputation, one-hot encoding,
scaling where the estimator needs it) so the exported ONNX model takes raw records.
"""

from __future__ import annotations

import dataclasses
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
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR

from bucketml.training.column_types import model_columns

SEED = 42
# An exact kernel SVM grows quadratically with rows; above this it is fitted on a sample, and
# the `svm` candidate is first of all a linear SVM on every row (see `search_space`).
SVM_MAX_ROWS = 5000
# Leaves per forest tree. Fully grown trees on 80,000 rows hold 1.5 million nodes: a 57 MB
# ONNX file and a 1.5 GiB peak while converting it. 2,000 leaves bound the forest at 400,000
# nodes (16 MB, under 600 MiB) for any number of rows, at -0.2 points of accuracy there; on
# fewer than about 3,000 rows a tree never has that many leaves, so nothing changes.
FOREST_MAX_LEAVES = 2000
# Above this largest/smallest class ratio in the training rows, classes are weighted "balanced".
IMBALANCE_RATIO = 3.0
# Estimators that take only dense input (the one-hot encoding is then dense too).
DENSE_INPUT = frozenset({"gradient_boosting"})
# Folds of the SVM classifier's own probability calibration (not the search's folds).
CALIBRATION_FOLDS = 3

EstimatorFactory = Callable[..., Any]

# The settings tried per candidate, in this order: each estimator's default first, so a budget
# that stops the search after one setting still has the well-known default.
SEARCH: dict[str, list[dict[str, Any]]] = {
    "logistic_regression": [{"C": 1.0}, {"C": 0.1}, {"C": 10.0}],
    "ridge": [{"alpha": 1.0}, {"alpha": 0.1}, {"alpha": 10.0}],
    "svm": [{"kernel": "rbf", "C": c, "gamma": "scale"} for c in (1.0, 0.3, 3.0)],
    "random_forest": [
        {"max_depth": depth, "min_samples_leaf": leaf} for depth in (None, 12) for leaf in (1, 3)
    ],
    "gradient_boosting": [
        {"learning_rate": rate, "max_leaf_nodes": leaves} for leaves in (31, 15) for rate in (0.1, 0.05)
    ],
}


@dataclasses.dataclass(frozen=True)
class CandidateDefinition:
    """One candidate: how to build its pipeline for a setting of `search_space`."""

    name: str
    estimator: EstimatorFactory  # takes one setting as keyword arguments (none: the defaults)
    scale: bool  # its numbers are standardised (never in front of trees)
    columns: tuple[dict[str, Any], ...]

    @property
    def dense(self) -> bool:
        return self.name in DENSE_INPUT

    def preprocessor(self) -> ColumnTransformer:
        return preprocessor(list(self.columns), self.scale, dense=self.dense)

    def pipeline(self, params: dict[str, Any]) -> Pipeline:
        return Pipeline([("prepare", self.preprocessor()), ("model", self.estimator(**params))])

    def settings(self, rows: int) -> list[dict[str, Any]]:
        return search_space(self.name, rows)


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


def estimators(task: str, balanced: bool = False, random_state: int = SEED) -> dict[str, tuple[EstimatorFactory, bool]]:
    """name -> (factory, needs scaling), in the fixed order they are cross-validated: roughly
    cheapest first on large data, so a training budget (max_training_seconds) spends itself
    on the likeliest-useful candidates. On a tie of scores the earlier one wins. A factory
    takes one setting of `search_space` as keyword arguments (none: the defaults).

    `balanced`: weight classes inversely to their frequency (an imbalanced target).
    HistGradientBoosting is used without `categorical_features` (skl2onnx converts that but
    the ONNX model predicts wrongly); strings reach it one-hot encoded like everywhere else.
    The `svm` factory builds the exact RBF kernel SVM, or with kernel="linear" a linear SVM
    (liblinear, linear in the rows) for large data: calibrated LinearSVC (its ONNX export
    passes the parity gate inside CalibratedClassifierCV, no `nocl` option needed) and
    LinearSVR with the squared epsilon-insensitive loss solved in the primal (the plain
    epsilon-insensitive dual did not converge on unscaled targets).
    """
    weight = "balanced" if balanced else None
    seed = random_state

    def svm_classifier(kernel: str = "rbf", C: float = 1.0, gamma: str = "scale") -> CalibratedClassifierCV:
        if kernel == "linear":
            return CalibratedClassifierCV(LinearSVC(C=C, class_weight=weight, random_state=seed), cv=CALIBRATION_FOLDS)
        return CalibratedClassifierCV(
            SVC(kernel="rbf", C=C, gamma=gamma, random_state=seed, class_weight=weight), cv=CALIBRATION_FOLDS
        )

    def svm_regressor(kernel: str = "rbf", C: float = 1.0, gamma: str = "scale") -> LinearSVR | SVR:
        if kernel == "linear":
            return LinearSVR(C=C, loss="squared_epsilon_insensitive", dual=False, random_state=seed)
        return SVR(kernel="rbf", C=C, gamma=gamma)

    if task == "classification":
        return {
            "logistic_regression": (lambda **p: LogisticRegression(max_iter=1000, class_weight=weight, **p), True),
            "svm": (svm_classifier, True),
            "gradient_boosting": (
                lambda **p: HistGradientBoostingClassifier(random_state=seed, class_weight=weight, **p), False
            ),
            "random_forest": (
                lambda **p: RandomForestClassifier(
                    n_estimators=100, max_leaf_nodes=FOREST_MAX_LEAVES, random_state=seed, n_jobs=1, class_weight=weight, **p
                ),
                False,
            ),
        }
    return {
        "ridge": (lambda **p: Ridge(**p), True),
        "svm": (svm_regressor, True),
        "gradient_boosting": (lambda **p: HistGradientBoostingRegressor(random_state=seed, **p), False),
        "random_forest": (lambda **p: RandomForestRegressor(
            n_estimators=100, max_leaf_nodes=FOREST_MAX_LEAVES, random_state=seed, n_jobs=1, **p
        ), False),
    }


def definitions(
    task: str, columns: list[dict[str, Any]], wanted: list[str], balanced: bool = False, random_state: int = SEED
) -> list[CandidateDefinition]:
    """The wanted candidates, in the fixed order of `estimators`."""
    return [
        CandidateDefinition(name, factory, scale, tuple(columns))
        for name, (factory, scale) in estimators(task, balanced, random_state).items()
        if name in wanted
    ]


def search_space(name: str, rows: int) -> list[dict[str, Any]]:
    """The settings of candidate `name` for `rows` training rows (see SEARCH).

    Above SVM_MAX_ROWS rows the exact kernel SVM would see only a sample, and its cost grows
    quadratically: the `svm` candidate is then a linear SVM on every row (C 1, 0.3, 3), and
    the exact RBF kernel on a SVM_MAX_ROWS sample is its last setting, tried only if the
    budget is left for it; cross-validation decides between them (the notes say which won).
    """
    if name == "svm" and rows > SVM_MAX_ROWS:
        return [{"kernel": "linear", "C": c} for c in (1.0, 0.3, 3.0)] + [{"kernel": "rbf", "C": 1.0, "gamma": "scale"}]
    return [dict(setting) for setting in SEARCH[name]]


def row_cap(name: str, params: dict[str, Any]) -> int | None:
    """Most training rows a setting is fitted on (None: all); the exact kernel SVM's cap."""
    return SVM_MAX_ROWS if name == "svm" and params.get("kernel", "rbf") == "rbf" else None


def svm_variant_note(task: str, params: dict[str, Any], train_rows: int, fitted_rows: int) -> str | None:
    """Which SVM the search kept when there were too many rows for the exact kernel on all."""
    if train_rows <= SVM_MAX_ROWS:
        return None
    if params.get("kernel") == "linear":
        kind = "calibrated LinearSVC" if task == "classification" else "LinearSVR"
        return f"linear SVM variant ({kind}) on all {train_rows} rows: more than {SVM_MAX_ROWS} training rows"
    return (
        f"exact RBF kernel SVM, chosen by cross-validation over the linear variant; fitted on a sample "
        f"of {fitted_rows} of {train_rows} rows"
    )


def class_ratio(y: pd.Series) -> float:
    """Largest over smallest class count."""
    counts = y.value_counts()
    return float(counts.max() / counts.min()) if len(counts) else 1.0


def class_weight_note(task: str, y: pd.Series) -> str | None:
    """The note of a target imbalanced enough for "balanced" class weights, else None."""
    if task != "classification":
        return None
    ratio = class_ratio(y)
    if ratio > IMBALANCE_RATIO:
        return f"class_weight: balanced (largest/smallest class ratio {ratio:.1f} > {IMBALANCE_RATIO:g})"
    return None


def float32_thresholds(model: Any) -> None:
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


def fit_model(name: str, model: Any, x: Any, y: Any) -> Any:
    """Fit a candidate's Pipeline (or, in cross-validation, its bare estimator on prepared input)."""
    model.fit(x, y)
    if name == "gradient_boosting":
        float32_thresholds(model.named_steps["model"] if isinstance(model, Pipeline) else model)
    return model


def tree_size(name: str, model: Any) -> int | None:
    """The random forest's deepest tree (root: depth 0), the gradient boosting's largest tree
    in leaves; what the search needs to know to skip settings that build the same models."""
    if name == "random_forest":
        return max(int(tree.tree_.max_depth) for tree in model.estimators_)
    if name == "gradient_boosting":
        return max(int(p.get_n_leaf_nodes()) for predictors in model._predictors for p in predictors)
    return None
