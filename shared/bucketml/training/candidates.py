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
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer, TransformedTargetRegressor
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
    VotingClassifier,
    VotingRegressor,
)
from sklearn.frozen import FrozenEstimator
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import FixedThresholdClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder, OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR
from sklearn.utils import Bunch

from bucketml.contracts.spec import IMBALANCE_RATIO
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
# Metrics that count every class alike: candidates chosen by them weight classes "balanced",
# so that the fit pursues what the selection measures.
CLASS_WEIGHTED_METRICS = frozenset({"balanced_accuracy", "f1_macro"})
# A regression target is tried on a log scale (log1p, answered back in its units with expm1)
# when it has no negative value and its skewness is at least this (prices, counts, incomes).
LOG_SCALE_SKEWNESS = 1.0
# Estimators given dense input (the one-hot encoding is then dense too): gradient boosting takes
# nothing else, and a forest grows 5x faster on dense rows than on sparse ones (7.3 s against
# 1.4 s for 100 trees on 17,000 one-hot encoded census rows).
DENSE_INPUT = frozenset({"gradient_boosting", "random_forest"})
# A category with fewer training rows is encoded like one never seen (see `preprocessor`).
MIN_CATEGORY_ROWS = 5
# At most this many one-hot columns per string column in front of an estimator given dense input.
MAX_DENSE_CATEGORIES = 32
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
    frequent: dict[str, list[str]] | None = None  # see `frequent_categories`

    @property
    def dense(self) -> bool:
        return self.name in DENSE_INPUT

    def preprocessor(self) -> ColumnTransformer:
        return preprocessor(list(self.columns), self.scale, dense=self.dense, frequent=self.frequent)

    def pipeline(self, params: dict[str, Any]) -> Pipeline:
        return Pipeline([("prepare", self.preprocessor()), ("model", self.estimator(**params))])

    def settings(self, rows: int) -> list[dict[str, Any]]:
        return search_space(self.name, rows)


def frequent_categories(x: pd.DataFrame, columns: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per string (and boolean) column, its categories with at least MIN_CATEGORY_ROWS training
    rows, most frequent first (at least the most frequent one)."""
    _, strings = model_columns(columns)
    frequent = {}
    for name in strings:
        counts = x[name].astype(str).value_counts()
        kept = [str(value) for value, count in counts.items() if count >= MIN_CATEGORY_ROWS]
        frequent[name] = kept or [str(counts.index[0])]
    return frequent


def preprocessor(
    columns: list[dict[str, str]], scale: bool, dense: bool = False, frequent: dict[str, list[str]] | None = None
) -> ColumnTransformer:
    """Imputed (and scaled) numbers, one-hot encoded strings, from the raw columns.

    `frequent` (`frequent_categories`): only these categories get a column, at most
    MAX_DENSE_CATEGORIES of them in front of an estimator that takes dense input; a rarer one
    encodes as all zeros, like a category never seen. An identifier-like column (tickets,
    cabins) otherwise becomes hundreds of columns that each say nothing, and dense input
    (gradient boosting, forests) pays for every one of them in every split. (OneHotEncoder's own
    min_frequency would do this, but skl2onnx cannot convert it for a single string column.)
    None: every category seen in fitting gets a column."""
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
        categories: Any = "auto"
        if frequent is not None:
            categories = [sorted(frequent[name][:MAX_DENSE_CATEGORIES] if dense else frequent[name]) for name in strings]
        parts.append(("strings", OneHotEncoder(categories=categories, handle_unknown="ignore"), strings))
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
    # Gradient boosting is never weighted: weighted HistGradientBoosting bins every number by
    # weighted percentiles, one call per bin edge (0.1 s per column per fit, seconds per fit on a
    # few thousand rows). The tuned decision rule balances it instead (a binary threshold, or
    # class-share weights for more classes: out_of_fold.tune_threshold, tune_class_weights).
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
                lambda **p: HistGradientBoostingClassifier(random_state=seed, **p), False
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
    task: str, columns: list[dict[str, Any]], wanted: list[str], balanced: bool = False, random_state: int = SEED,
    frequent: dict[str, list[str]] | None = None,
) -> list[CandidateDefinition]:
    """The wanted candidates, in the fixed order of `estimators`."""
    return [
        CandidateDefinition(name, factory, scale, tuple(columns), frequent)
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


def imbalanced(task: str, y: pd.Series) -> bool:
    """The imbalance rule: a classification target whose largest class has at least
    IMBALANCE_RATIO times the training rows of its smallest (its default metric is then
    balanced accuracy: contracts.spec.default_metric)."""
    return task == "classification" and class_ratio(y) >= IMBALANCE_RATIO


def class_weight_note(task: str, y: pd.Series, metric: str) -> str | None:
    """The note of candidates that weight classes "balanced" (a metric that counts every class
    alike), else None."""
    if task != "classification" or metric not in CLASS_WEIGHTED_METRICS:
        return None
    return f"class_weight: balanced, as {metric} counts every class alike (largest/smallest class ratio {class_ratio(y):.1f})"


def log_scale_worth_trying(y: pd.Series) -> bool:
    """Whether a regression target is worth trying on a log scale (LOG_SCALE_SKEWNESS)."""
    values = y.astype("float64")
    return len(values) > 2 and float(values.min()) >= 0 and float(values.skew()) >= LOG_SCALE_SKEWNESS


def on_scale(model: Any, scale: str) -> Any:
    """`model` fitted on the target as it is ("raw") or on log1p of it ("log"), answering in the
    target's units either way (export.py converts this wrapper to ONNX)."""
    if scale == "raw":
        return model
    return TransformedTargetRegressor(regressor=model, func=np.log1p, inverse_func=np.expm1, check_inverse=False)


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


def ensemble_model(task: str, members: list[tuple[str, Any]], weights: list[float], classes: list[str]) -> Any:
    """The soft-voting (classification) or averaging (regression) ensemble of fitted members,
    weighted. The members are already fitted on the training rows: VotingClassifier.fit would
    fit every one of them again, so the fitted attributes are set as fit sets them."""
    if task == "classification":
        model = VotingClassifier(members, voting="soft", weights=np.asarray(weights, dtype="float64"),
                                 flatten_transform=False)  # skl2onnx converts only this form
        model.le_ = LabelEncoder().fit(classes)
        model.classes_ = model.le_.classes_
    else:
        model = VotingRegressor(members, weights=np.asarray(weights, dtype="float64"))
    model.estimators_ = [fitted for _, fitted in members]
    model.named_estimators_ = Bunch(**dict(members))
    return model


class ClassWeightedClassifier(ClassifierMixin, BaseEstimator):
    """A fitted classifier that answers the class whose probability times its weight is largest
    (out_of_fold.tune_class_weights); its probabilities are the model's. scikit-learn has no
    multiclass counterpart of FixedThresholdClassifier; export.py converts this one to ONNX."""

    def __init__(self, estimator: Any, weights: list[float]) -> None:
        self.estimator = estimator
        self.weights = weights

    def fit(self, x: Any = None, y: Any = None) -> ClassWeightedClassifier:
        self.classes_ = self.estimator.classes_  # the estimator is fitted already: nothing to fit
        return self

    def predict_proba(self, x: Any) -> np.ndarray:
        return self.estimator.predict_proba(x)

    def predict(self, x: Any) -> np.ndarray:
        weighted = self.predict_proba(x) * np.asarray(self.weights)
        return np.asarray(self.classes_)[np.argmax(weighted, axis=1)]


def reweighted(model: Any, weights: list[float]) -> ClassWeightedClassifier:
    return ClassWeightedClassifier(model, list(weights)).fit()


def thresholded(model: Any, threshold: float, x: pd.DataFrame, y: pd.Series) -> FixedThresholdClassifier:
    """A fitted binary classifier that answers its second class when that class's probability is
    at least `threshold` (scikit-learn's FixedThresholdClassifier around the model as fitted)."""
    wrapper = FixedThresholdClassifier(FrozenEstimator(model), threshold=threshold, response_method="predict_proba")
    return wrapper.fit(x, y)  # FrozenEstimator: nothing is fitted again


def fit_model(name: str, model: Any, x: Any, y: Any) -> Any:
    """Fit a candidate's Pipeline (or, in cross-validation, its bare estimator on prepared input),
    either of them possibly on a log scale (`on_scale`)."""
    model.fit(x, y)
    if name == "gradient_boosting":
        inner = model.regressor_ if isinstance(model, TransformedTargetRegressor) else model
        float32_thresholds(inner.named_steps["model"] if isinstance(inner, Pipeline) else inner)
    return model


def tree_size(name: str, model: Any) -> int | None:
    """The random forest's deepest tree (root: depth 0), the gradient boosting's largest tree
    in leaves; what the search needs to know to skip settings that build the same models."""
    if isinstance(model, TransformedTargetRegressor):
        model = model.regressor_
    if name == "random_forest":
        return max(int(tree.tree_.max_depth) for tree in model.estimators_)
    if name == "gradient_boosting":
        return max(int(p.get_n_leaf_nodes()) for predictors in model._predictors for p in predictors)
    return None
