"""Candidate pipelines, their selection by cross-validation, and their held-out evaluation.

Every candidate is a whole sklearn Pipeline from raw columns (imputation, one-hot encoding,
scaling where the estimator needs it) so the exported ONNX model takes raw records.

Selection uses the TRAINING split only: each candidate's few hyperparameter settings
(`search_space`) are scored by 3-fold cross-validation with the spec's metric, within the
spec's `max_training_seconds`; the best setting is refitted on the training rows and the
candidates are ranked by their cross-validation score. The held-out split is used only to
report each fitted candidate's metrics (card) and never picks a setting or a candidate.
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
    confusion_matrix,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR
from threadpoolctl import threadpool_limits

from bucketml.training.column_types import model_columns
from bucketml.contracts.spec import (
    ALGORITHMS,
    DEFAULT_METRIC,
    LOWER_IS_BETTER,
    METRICS,
    PROBABILITY_METRICS,
    algorithms_for,
    better,
    metric_for,
    with_defaults,
)

SEED = 42
# An exact kernel SVM grows quadratically with rows; above this it is fitted on a sample, and
# the `svm` candidate is first of all a linear SVM on every row (see `search_space`).
SVM_MAX_ROWS = 5000
# Leaves per forest tree. Fully grown trees on 80,000 rows hold 1.5 million nodes: a 57 MB
# ONNX file and a 1.5 GiB peak while converting it. 2,000 leaves bound the forest at 400,000
# nodes (16 MB, under 600 MiB) for any number of rows, at -0.2 points of accuracy there; on
# fewer than about 3,000 rows a tree never has that many leaves, so nothing changes.
FOREST_MAX_LEAVES = 2000
CV_FOLDS = 3
# Cross-validation runs on a (stratified) sample of at most this many training rows; the
# chosen setting is refitted on all of them (the exact-kernel SVM: on SVM_MAX_ROWS).
CV_MAX_ROWS = 20_000
# Each fold's prepared (imputed, scaled, encoded) input is kept for the other settings (and
# the candidates with the same preprocessing) while it takes at most this many bytes;
# otherwise it is prepared again for every setting, as Pipeline.fit does.
PREPARED_CACHE_BYTES = 256 * 2**20
PRIMARY_METRIC = DEFAULT_METRIC  # the selection metric when the spec names none
clock = time.perf_counter  # what the budget is measured with (a test replaces it)
# Above this largest/smallest class ratio in the training rows, classes are weighted "balanced".
IMBALANCE_RATIO = 3.0
# Estimators that take only dense input (the one-hot encoding is then dense too).
DENSE_INPUT = frozenset({"gradient_boosting"})


class TrainingError(Exception):
    """Training could not produce a model; the message says why."""


@dataclasses.dataclass
class Trial:
    """One hyperparameter setting of a candidate, scored by cross-validation on training rows."""

    params: dict[str, Any]
    rows: int = 0  # training rows cross-validated on
    fold_scores: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None  # why it has no score (a fit failed, the budget ran out mid-way)
    interrupted: bool = False  # the budget ran out during its folds
    tree_sizes: list[int] = dataclasses.field(default_factory=list)  # per fold, see `tree_size`
    same_as: dict[str, Any] | None = None  # provably the same models as this tried setting

    @property
    def score(self) -> float | None:
        """Mean fold score; None unless every fold was scored."""
        if self.error or len(self.fold_scores) < CV_FOLDS:
            return None
        defined = [s for s in self.fold_scores if s is not None]
        return float(np.mean(defined)) if defined else None

    def summary(self) -> dict[str, Any]:
        defined = [s for s in self.fold_scores if s is not None]
        out = {
            "params": self.params,
            "cv_score": _rounded(self.score),
            "cv_std": _rounded(float(np.std(defined))) if self.score is not None else None,
            "fold_scores": [_rounded(s) for s in self.fold_scores],
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
        }
        if self.error:
            out["error"] = self.error
        if self.same_as is not None:
            out["same_as"] = self.same_as
        return out


@dataclasses.dataclass
class Candidate:
    name: str
    pipeline: Pipeline
    metrics: dict[str, float | None] = dataclasses.field(default_factory=dict)  # on the held-out rows
    fit_seconds: float = 0.0  # the refit of the chosen setting on the training rows
    notes: list[str] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the chosen setting
    cv_score: float | None = None  # its mean cross-validation score (what ranks the candidates)
    trials: list[Trial] = dataclasses.field(default_factory=list)  # every setting tried, in order
    untried: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # settings the budget left out
    search_stopped: str | None = None
    confusion: dict[str, Any] | None = None  # classification, on the held-out rows

    def summary(self) -> dict[str, Any]:
        chosen = next((t for t in self.trials if t.params == self.params and t.score is not None), None)
        out = {
            "name": self.name,
            "metrics": self.metrics,
            "params": self.params,
            "cv_score": _rounded(self.cv_score),
            "cv_std": chosen.summary()["cv_std"] if chosen else None,
            "cv_rows": chosen.rows if chosen else None,
            "search": [t.summary() for t in self.trials],
            "untried": self.untried,
            "search_stopped": self.search_stopped,
            "search_seconds": round(sum(t.seconds for t in self.trials), 3),
            "fit_seconds": round(self.fit_seconds, 3),
            "notes": self.notes,
        }
        if self.confusion is not None:
            out["confusion_matrix"] = self.confusion
        return out


@dataclasses.dataclass
class Selection:
    """What `select` did: fitted candidates best first by cross-validation score, candidates
    that failed ("name: why"), candidates the budget skipped, and a summary for the card."""

    candidates: list[Candidate]
    failures: list[str]
    skipped: list[dict[str, str]]
    summary: dict[str, Any]


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


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


def estimators(task: str, balanced: bool = False) -> dict[str, tuple[Callable[..., Any], bool]]:
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

    def svm_classifier(kernel: str = "rbf", C: float = 1.0, gamma: str = "scale"):
        if kernel == "linear":
            return CalibratedClassifierCV(LinearSVC(C=C, class_weight=weight, random_state=SEED), cv=3)
        return CalibratedClassifierCV(SVC(kernel="rbf", C=C, gamma=gamma, random_state=SEED, class_weight=weight), cv=3)

    def svm_regressor(kernel: str = "rbf", C: float = 1.0, gamma: str = "scale"):
        if kernel == "linear":
            return LinearSVR(C=C, loss="squared_epsilon_insensitive", dual=False, random_state=SEED)
        return SVR(kernel="rbf", C=C, gamma=gamma)

    if task == "classification":
        return {
            "logistic_regression": (lambda **p: LogisticRegression(max_iter=1000, class_weight=weight, **p), True),
            "svm": (svm_classifier, True),
            "gradient_boosting": (
                lambda **p: HistGradientBoostingClassifier(random_state=SEED, class_weight=weight, **p), False
            ),
            "random_forest": (
                lambda **p: RandomForestClassifier(
                    n_estimators=100, max_leaf_nodes=FOREST_MAX_LEAVES, random_state=SEED, n_jobs=1, class_weight=weight, **p
                ),
                False,
            ),
        }
    return {
        "ridge": (lambda **p: Ridge(**p), True),
        "svm": (svm_regressor, True),
        "gradient_boosting": (lambda **p: HistGradientBoostingRegressor(random_state=SEED, **p), False),
        "random_forest": (lambda **p: RandomForestRegressor(
            n_estimators=100, max_leaf_nodes=FOREST_MAX_LEAVES, random_state=SEED, n_jobs=1, **p
        ), False),
    }


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


def evaluate(task: str, pipeline: Pipeline, x: pd.DataFrame, y: pd.Series) -> dict[str, float | None]:
    return evaluation(task, pipeline, x, y)[0]


def evaluation(task: str, pipeline: Pipeline, x: pd.DataFrame, y: pd.Series) -> tuple[dict[str, float | None], dict | None]:
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


def class_ratio(y: pd.Series) -> float:
    """Largest over smallest class count."""
    counts = y.value_counts()
    return float(counts.max() / counts.min()) if len(counts) else 1.0


def fit_candidates(
    schema: dict[str, Any], train: tuple, test: tuple, spec: dict[str, Any] | None = None
) -> tuple[list[Candidate], list[str], list[dict[str, str]]]:
    """`select`, as (fitted candidates best first by cross-validation score, failures, skipped)."""
    selection = select(schema, train, test, spec)
    return selection.candidates, selection.failures, selection.skipped


def sample_rows(task: str, x: pd.DataFrame, y: pd.Series, rows: int) -> tuple[pd.DataFrame, pd.Series]:
    """At most about `rows` rows (seeded, in their original order): per class in proportion for
    classification, each class keeping at least min(its rows, CV_FOLDS); uniform for regression."""
    if len(x) <= rows:
        return x, y
    rng = np.random.default_rng(SEED)
    if task == "classification":
        labels = y.to_numpy()
        share = rows / len(labels)
        picked = []
        for label in sorted(pd.unique(labels)):
            positions = np.flatnonzero(labels == label)
            keep = min(len(positions), max(CV_FOLDS, round(len(positions) * share)))
            picked.append(rng.choice(positions, keep, replace=False))
        positions = np.sort(np.concatenate(picked))
    else:
        positions = np.sort(rng.choice(len(x), rows, replace=False))
    return x.iloc[positions], y.iloc[positions]


def cv_splits(task: str, y: pd.Series) -> list[tuple[np.ndarray, np.ndarray]]:
    """CV_FOLDS (train, validation) position pairs: stratified for classification (a class
    with fewer rows than folds is simply missing from some folds), shuffled with the seed."""
    if task == "classification" and y.value_counts().max() >= CV_FOLDS:
        folds = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=SEED)
        return list(folds.split(np.zeros(len(y)), y.to_numpy()))
    return list(KFold(CV_FOLDS, shuffle=True, random_state=SEED).split(np.zeros(len(y))))


def fold_score(metric: str, model, x, y: pd.Series, classes: list[str]) -> float | None:
    """`metric` of a model fitted on the other folds, on this fold's rows."""
    predicted = model.predict(x)
    if metric not in PROBABILITY_METRICS:
        return metric_value(metric, y, predicted)
    fitted = [str(c) for c in model.classes_]
    probabilities = model.predict_proba(x)
    if fitted != classes:  # a class with too few rows is missing from this fold's training rows
        aligned = np.zeros((len(y), len(classes)))
        aligned[:, [classes.index(c) for c in fitted]] = probabilities
        probabilities = aligned
    return metric_value(metric, y, predicted, probabilities, classes, strict=False)


def _nbytes(matrix) -> int:
    """Memory of a dense or scipy sparse matrix."""
    if hasattr(matrix, "indices"):
        return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
    return int(np.asarray(matrix).nbytes)


def fit_model(name: str, model, x, y):
    """Fit a candidate's Pipeline (or, in cross-validation, its bare estimator on prepared input)."""
    model.fit(x, y)
    if name == "gradient_boosting":
        float32_thresholds(model.named_steps["model"] if isinstance(model, Pipeline) else model)
    return model


def tree_size(name: str, model) -> int | None:
    """The random forest's deepest tree (root: depth 0), the gradient boosting's largest tree
    in leaves; what `same_model` needs to know."""
    if name == "random_forest":
        return max(int(tree.tree_.max_depth) for tree in model.estimators_)
    if name == "gradient_boosting":
        return max(int(p.get_n_leaf_nodes()) for predictors in model._predictors for p in predictors)
    return None


def same_model(name: str, params: dict[str, Any], trials: list[Trial]) -> Trial | None:
    """A tried setting that provably builds the very same models as `params` in every fold,
    so `params` would score the same and lose the tie: it is not fitted.

    - random forest, max_depth=d: the same min_samples_leaf without a depth limit grew no tree
      deeper than d-1 in any fold. The builder's only use of max_depth is to stop a node at
      depth d; with no such node the same nodes are split with the same random draws.
    - gradient boosting, max_leaf_nodes=k: the same learning_rate with more leaves allowed grew
      no tree with more than k leaves. Growth is deterministic and best-first; a tree that ends
      with at most k leaves never reached the limit that would have stopped it.
    On small data this is the common case (HistGradientBoosting needs 20 rows per leaf)."""
    if name not in ("random_forest", "gradient_boosting"):
        return None
    for trial in trials:
        if trial.score is None or len(trial.tree_sizes) != CV_FOLDS or trial.same_as is not None:
            continue
        largest = max(trial.tree_sizes)
        if name == "random_forest":
            depth = params.get("max_depth")
            if depth is not None and trial.params == dict(params, max_depth=None) and largest < depth:
                return trial
        else:
            leaves, allowed = params.get("max_leaf_nodes"), trial.params.get("max_leaf_nodes")
            same_rate = trial.params.get("learning_rate") == params.get("learning_rate")
            if same_rate and leaves is not None and allowed is not None and allowed > leaves >= largest:
                return trial
    return None


@dataclasses.dataclass
class _Search:
    """One candidate's settings and the trials made of them so far."""

    name: str
    prepare: Callable[[], ColumnTransformer]
    estimator: Callable[..., Any]
    scale: bool
    settings: list[dict[str, Any]]
    notes: list[str]
    trials: list[Trial] = dataclasses.field(default_factory=list)

    def make(self, params: dict[str, Any]) -> Pipeline:
        return Pipeline([("prepare", self.prepare()), ("model", self.estimator(**params))])

    def best(self, metric: str) -> Trial | None:
        """The best scored trial; on a tie the earlier setting (the default first)."""
        best = None
        for trial in self.trials:
            if trial.score is not None and (best is None or better(metric, trial.score, best.score)):
                best = trial
        return best


def select(schema: dict[str, Any], train: tuple, test: tuple, spec: dict[str, Any] | None = None) -> Selection:
    """Choose among the spec's candidates by cross-validation on the training split.

    1. Screen: in the fixed order of `estimators`, cross-validate each candidate's first
       (default) setting. Once `max_training_seconds` would be exceeded (time spent plus the
       estimated refits of the candidates screened so far) the remaining candidates are
       skipped, but one candidate is always screened.
    2. Search: the other settings of `search_space`, round-robin over the candidates, best
       cross-validation score first, while the estimated cost of the next setting still fits
       the budget; then the search stops and every candidate keeps its best setting so far
       (the untried settings are recorded).
    3. Refit each candidate's best setting on the training rows (the exact kernel SVM on at
       most SVM_MAX_ROWS) and evaluate it on the held-out rows, for the card only.

    Cross-validation: CV_FOLDS folds, stratified for classification, on a sample of at most
    CV_MAX_ROWS training rows, scored with the spec's metric. Candidates are returned best
    first by their cross-validation score (on a tie the earlier in the fixed order).
    `spec` is the effective dataset spec (default: schema["spec"], else spec.DEFAULTS).
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
    classes = sorted(str(c) for c in pd.unique(y_train)) if task == "classification" else []
    balanced_note = None
    if task == "classification":
        ratio = class_ratio(y_train)
        if ratio > IMBALANCE_RATIO:
            balanced_note = f"class_weight: balanced (largest/smallest class ratio {ratio:.1f} > {IMBALANCE_RATIO:g})"
    started = clock()

    def elapsed() -> float:
        return clock() - started

    x_cv, y_cv = sample_rows(task, x_train, y_train, CV_MAX_ROWS)
    data: dict[int | None, tuple] = {}

    def rows_for(cap: int | None) -> tuple:
        """(CV rows x, y, folds; refit rows x, y) for settings capped at `cap` rows."""
        key = cap if cap is not None and len(x_train) > cap else None
        if key not in data:
            if key is None:
                data[key] = (x_cv, y_cv, cv_splits(task, y_cv), x_train, y_train)
            else:
                x_cap, y_cap = sample_rows(task, x_train, y_train, key)
                data[key] = (x_cap, y_cap, cv_splits(task, y_cap), x_cap, y_cap)
        return data[key]

    def refit_estimate(search: _Search) -> float:
        """Seconds to refit the best setting: one fold's fit, scaled to the refit rows."""
        best = search.best(metric)
        if best is None:
            return 0.0
        if best.same_as is not None:
            best = next(t for t in search.trials if t.params == best.same_as)
        refit_rows = len(rows_for(row_cap(search.name, best.params))[3])
        fold_rows = best.rows * (CV_FOLDS - 1) / CV_FOLDS
        return best.seconds / CV_FOLDS * max(1.0, refit_rows / max(fold_rows, 1.0))

    def reserve() -> float:
        return sum(refit_estimate(search) for search in searches)

    prepared: dict[tuple, list] = {}

    def prepared_folds(search: _Search, cap: int | None):
        """Per fold: (prepared fitting rows, their targets, prepared validation rows, targets).

        A candidate's preprocessing (imputation, scaling, one-hot encoding) does not depend
        on its setting: it is fitted once per fold, as Pipeline.fit would fit it for every
        setting, and kept for the candidates that share it when the sample is small."""
        x, y, splits = rows_for(cap)[:3]
        key = (cap if cap is not None and len(x_train) > cap else None, search.scale, search.name in DENSE_INPUT)
        if key in prepared:
            return prepared[key]
        folds = []
        for fit_rows, validation_rows in splits:
            prepare = search.prepare()
            x_fit, y_fit = x.iloc[fit_rows], y.iloc[fit_rows]
            folds.append((prepare.fit_transform(x_fit, y_fit), y_fit, prepare.transform(x.iloc[validation_rows]), y.iloc[validation_rows]))
        if sum(_nbytes(part) for fold in folds for part in (fold[0], fold[2])) <= PREPARED_CACHE_BYTES:
            prepared[key] = folds
        return folds

    def cross_validate(search: _Search, params: dict[str, Any], first: bool) -> Trial:
        """Cross-validate one setting. Only a candidate's first setting finishes whatever the budget."""
        cap = row_cap(search.name, params)
        trial = Trial(dict(params), rows=len(rows_for(cap)[0]))
        twin = same_model(search.name, params, search.trials)
        if twin is not None:
            trial.same_as, trial.fold_scores, trial.tree_sizes = twin.params, list(twin.fold_scores), list(twin.tree_sizes)
            search.trials.append(trial)
            return trial
        began = clock()
        try:
            folds = prepared_folds(search, cap)
            for x_fit, y_fit, x_validation, y_validation in folds:
                model = fit_model(search.name, search.estimator(**params), x_fit, y_fit)
                trial.fold_scores.append(fold_score(metric, model, x_validation, y_validation, classes))
                trial.tree_sizes.append(tree_size(search.name, model))
                if not first and len(trial.fold_scores) < len(folds) and elapsed() + reserve() > budget:
                    trial.error = f"max_training_seconds={budget:g} ran out during its folds"
                    trial.interrupted = True
                    break
        except ValueError as exc:  # e.g. too few rows of a class for the SVM's calibration folds
            trial.error = str(exc)
        trial.seconds = clock() - began
        search.trials.append(trial)
        return trial

    searches: list[_Search] = []
    failures: list[str] = []
    skipped: list[dict[str, str]] = []
    stopped: str | None = None
    # One OpenMP thread (HistGradientBoosting), like n_jobs=1 for the forest: on a shared or
    # busy CPU, OpenMP's spinning threads made a 350-row fit take seconds, not 0.1 s. One BLAS
    # thread too: the many small fits of the search (lbfgs in logistic regression and in the
    # SVM's calibration) took twice the CPU time with OpenBLAS's two threads on 2 cores.
    with (
        warnings.catch_warnings(),
        threadpool_limits(limits=1, user_api="openmp"),
        threadpool_limits(limits=1, user_api="blas"),
    ):
        warnings.simplefilter("ignore", category=UserWarning)  # convergence, small folds, ...

        # 1. Screen every candidate's default setting.
        for name, (factory, scale) in estimators(task, balanced=balanced_note is not None).items():
            if name not in wanted:
                continue
            if searches and elapsed() + reserve() >= budget:
                skipped.append({
                    "name": name,
                    "reason": f"max_training_seconds={budget:g} spent ({elapsed():.2f} s elapsed, "
                    f"{reserve():.2f} s kept to refit the candidates before it)",
                })
                continue

            def prepare(scale=scale, name=name) -> ColumnTransformer:
                return preprocessor(columns, scale, dense=name in DENSE_INPUT)

            search = _Search(name, prepare, factory, scale, search_space(name, len(x_train)), [balanced_note] if balanced_note else [])
            trial = cross_validate(search, search.settings[0], first=True)
            if trial.score is None:
                failures.append(f"{name}: {trial.error or f'{metric} is undefined in every cross-validation fold'}")
                continue
            searches.append(search)

        # 2. Search the other settings, round-robin, best candidate first, while the budget lasts.
        for index in range(1, max((len(s.settings) for s in searches), default=0)):
            ranked = sorted(searches, key=lambda s: (1.0 if metric in LOWER_IS_BETTER else -1.0) * s.best(metric).score)
            for search in ranked:
                if index >= len(search.settings):
                    continue
                tried = [t for t in search.trials if t.error is None and t.same_as is None]
                estimate = float(np.mean([t.seconds for t in tried])) if tried else 0.0
                if elapsed() + estimate + reserve() > budget:
                    stopped = (
                        f"max_training_seconds={budget:g}: the search stopped after {elapsed():.2f} s "
                        f"(the next setting, of {search.name}, would take about {estimate:.2f} s)"
                    )
                    break
                trial = cross_validate(search, search.settings[index], first=False)
                if trial.interrupted:
                    stopped = f"max_training_seconds={budget:g}: the search stopped after {elapsed():.2f} s, during a setting of {search.name}"
                    break
            if stopped:
                break

        # 3. Refit each candidate's best setting on the training rows; evaluate on the held-out rows.
        fitted: list[Candidate] = []
        for search in searches:
            best = search.best(metric)
            cap = row_cap(search.name, best.params)
            x_fit, y_fit = rows_for(cap)[3:]
            tried = [t.params for t in search.trials]
            candidate = Candidate(
                search.name, search.make(best.params), notes=list(search.notes), params=best.params,
                cv_score=best.score, trials=search.trials,
                untried=[s for s in search.settings if s not in tried],
            )
            if candidate.untried or any(t.interrupted for t in search.trials):
                candidate.search_stopped = stopped
            for trial in search.trials:
                if trial.error and not trial.interrupted:
                    candidate.notes.append(f"setting {trial.params} failed in cross-validation: {trial.error}")
            if len(x_cv) < len(x_train) and (cap is None or cap >= len(x_cv)):
                candidate.notes.append(f"cross-validated on a stratified sample of {len(x_cv)} of {len(x_train)} training rows"
                                       if task == "classification" else
                                       f"cross-validated on a sample of {len(x_cv)} of {len(x_train)} training rows")
            if search.name == "svm" and len(x_train) > SVM_MAX_ROWS:
                if best.params.get("kernel") == "linear":
                    kind = "calibrated LinearSVC" if task == "classification" else "LinearSVR"
                    candidate.notes.append(
                        f"linear SVM variant ({kind}) on all {len(x_train)} rows: more than {SVM_MAX_ROWS} training rows"
                    )
                else:
                    candidate.notes.append(
                        f"exact RBF kernel SVM, chosen by cross-validation over the linear variant; fitted on a sample "
                        f"of {len(x_fit)} of {len(x_train)} rows"
                    )
            began = clock()
            try:
                fit_model(search.name, candidate.pipeline, x_fit, y_fit)
                candidate.metrics, candidate.confusion = evaluation(task, candidate.pipeline, x_test, y_test)
            except ValueError as exc:
                failures.append(f"{search.name}: {exc}")
                continue
            finally:
                candidate.fit_seconds = clock() - began
            fitted.append(candidate)
    if not fitted:
        raise TrainingError("no candidate could be trained: " + "; ".join(failures))
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    # Stable sort: on a tie the earlier (cheaper, simpler to explain) candidate wins.
    fitted.sort(key=lambda c: sign * c.cv_score)
    planned = sum(len(s.settings) for s in searches)
    summary = {
        "method": f"{CV_FOLDS}-fold {'stratified ' if task == 'classification' else ''}cross-validation on the "
        "training split; each candidate's best setting refitted on the training rows; the held-out rows "
        "only evaluate",
        "metric": metric,
        "folds": CV_FOLDS,
        "train_rows": len(x_train),
        "cv_rows": len(x_cv),
        "test_rows": len(x_test),
        "budget_seconds": budget,
        "seconds": round(elapsed(), 3),
        "settings_tried": sum(len(s.trials) for s in searches),
        "settings_planned": planned,
        "search_stopped": stopped,
        "ranking": [{"name": c.name, "cv_score": _rounded(c.cv_score)} for c in fitted],
    }
    return Selection(fitted, failures, skipped, summary)
