"""Out-of-fold predictions: what each cross-validation fold's model said about the rows it did not
see, kept for every row. From them the search scores a setting fold by fold, tunes a binary
decision threshold, and builds an ensemble and scores it without fitting anything again
(docs/architecture.md, "Selection").

Classification keeps probabilities, one column per class of the training rows (sorted), so
the labels a model would answer are the most probable class, or for a binary target with a
tuned threshold the second class whenever its probability reaches the threshold. Regression
keeps predictions in the target's own units (a model fitted on a log scale is transformed
back first).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bucketml.contracts.spec import LOWER_IS_BETTER, PROBABILITY_METRICS
from bucketml.training.metrics import metric_value

# Metrics for which a binary model's threshold is tuned. Accuracy is not among them: for
# probabilities that are right on average, 0.5 is already the threshold that maximises it, so
# tuning would only fit noise; the probability metrics do not use labels at all.
THRESHOLD_METRICS = frozenset({"balanced_accuracy", "f1_macro"})
THRESHOLD_GRID = 99  # thresholds tried: the 1st..99th percentiles of the positive class's probability
# At most this many members (with repetition) in an ensemble, as in Caruana et al.'s ensemble
# selection: each round adds the model that improves the out-of-fold score most.
ENSEMBLE_ROUNDS = 10


@dataclasses.dataclass
class OutOfFold:
    """Per repeat of the folds, every row's out-of-fold prediction.

    `values`: (repeats, rows, classes) probabilities, or (repeats, rows) regression values.
    `splits`: the (fit, validation) positions of every fold, repeat after repeat.
    """

    values: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]

    def __post_init__(self) -> None:
        self._per_repeat = _folds_per_repeat(self.splits, self.values.shape[1])

    @classmethod
    def empty(cls, rows: int, splits: list[tuple[np.ndarray, np.ndarray]], classes: int) -> OutOfFold:
        repeats = max(1, len(splits) // _folds_per_repeat(splits, rows))
        shape = (repeats, rows, classes) if classes else (repeats, rows)
        return cls(np.full(shape, np.nan), splits)

    def repeat_of(self, fold: int) -> int:
        return fold // self._per_repeat

    def fill(self, fold: int, predictions: np.ndarray) -> None:
        self.values[self.repeat_of(fold), self.splits[fold][1]] = predictions


def blend(members: Sequence[OutOfFold], weights: Sequence[float]) -> OutOfFold:
    """The weighted mean of out-of-fold predictions made on the same folds."""
    values = sum(w * m.values for m, w in zip(members, weights)) / float(sum(weights))
    return OutOfFold(np.asarray(values), members[0].splits)


def _folds_per_repeat(splits: list[tuple[np.ndarray, np.ndarray]], rows: int) -> int:
    """Folds until the validation rows of a repeat have covered every row."""
    covered = 0
    for index, (_, validation) in enumerate(splits):
        covered += len(validation)
        if covered >= rows:
            return index + 1
    return max(1, len(splits))


def labels(probabilities: np.ndarray, classes: Sequence[str], threshold: float | None = None,
           weights: Sequence[float] | None = None) -> np.ndarray:
    """The class a model answers: the most probable one (the first on a tie); for a binary
    target with `threshold`, the second class when its probability is at least the threshold;
    with class `weights`, the class whose probability times its weight is largest."""
    names = np.asarray(classes, dtype=object)
    if threshold is not None:
        return names[(probabilities[..., 1] >= threshold).astype(int)]
    if weights is not None:
        return names[np.argmax(probabilities * np.asarray(weights), axis=-1)]
    return names[np.argmax(probabilities, axis=-1)]


def _score(metric: str, y: np.ndarray, predictions: np.ndarray, classes: Sequence[str] | None,
           threshold: float | None, weights: Sequence[float] | None = None) -> float | None:
    if classes is None:
        return regression_score(metric, y, predictions)
    if metric in PROBABILITY_METRICS:
        return metric_value(metric, y, labels(predictions, classes), predictions, list(classes), strict=False)
    return label_score(metric, y, labels(predictions, classes, threshold, weights))


# The search scores thousands of folds (settings, thresholds, ensemble rounds); these compute
# what scikit-learn's accuracy_score, balanced_accuracy_score, f1_score(average="macro"),
# r2_score, and the root mean squared and mean absolute errors compute (tests compare them),
# without the input validation that costs most of a call on a few hundred rows.


def label_score(metric: str, y: np.ndarray, predicted: np.ndarray) -> float:
    if metric == "accuracy":
        return float(np.mean(y == predicted))
    present_true = np.unique(y)
    if metric == "balanced_accuracy":  # mean recall over the classes that have true rows
        return float(np.mean([np.mean(predicted[y == c] == c) for c in present_true]))
    if metric == "f1_macro":  # over the classes that are true or predicted
        scores = []
        for c in np.union1d(present_true, np.unique(predicted)):
            true_positive = np.sum((y == c) & (predicted == c))
            denominator = np.sum(y == c) + np.sum(predicted == c)
            scores.append(2.0 * true_positive / denominator if denominator else 0.0)
        return float(np.mean(scores))
    return metric_value(metric, y, predicted)


def regression_score(metric: str, y: np.ndarray, predicted: np.ndarray) -> float:
    error = y - predicted
    if metric == "rmse":
        return float(np.sqrt(np.mean(error**2)))
    if metric == "mae":
        return float(np.mean(np.abs(error)))
    if metric == "r2":
        total = np.sum((y - np.mean(y)) ** 2)
        residual = np.sum(error**2)
        if total == 0:  # scikit-learn's convention for a constant target
            return 1.0 if residual == 0 else 0.0
        return float(1.0 - residual / total)
    return metric_value(metric, y, predicted)


def binary_threshold_scores(metric: str, positive: np.ndarray, probability: np.ndarray,
                            thresholds: np.ndarray) -> np.ndarray:
    """`metric` of the labels each threshold gives (probability >= threshold: the second class),
    for all thresholds at once; `positive` says which rows are truly of the second class."""
    predicted = probability[None, :] >= thresholds[:, None]
    true_positive = (predicted & positive).sum(axis=1)
    false_positive = (predicted & ~positive).sum(axis=1)
    positives, negatives = int(positive.sum()), int((~positive).sum())
    false_negative = positives - true_positive
    true_negative = negatives - false_positive
    if metric == "balanced_accuracy":
        recalls = [r for r, n in ((true_positive / max(positives, 1), positives),
                                  (true_negative / max(negatives, 1), negatives)) if n]
        return np.mean(recalls, axis=0)
    # f1_macro over the classes that are true or predicted by that threshold
    f1_positive = 2 * true_positive / np.maximum(2 * true_positive + false_positive + false_negative, 1)
    f1_negative = 2 * true_negative / np.maximum(2 * true_negative + false_negative + false_positive, 1)
    has_positive = ((positives > 0) | (predicted.sum(axis=1) > 0)).astype(int)
    has_negative = ((negatives > 0) | ((~predicted).sum(axis=1) > 0)).astype(int)
    return (f1_positive * has_positive + f1_negative * has_negative) / np.maximum(has_positive + has_negative, 1)


def fold_scores(oof: OutOfFold, metric: str, y: pd.Series, classes: Sequence[str] | None,
                threshold: float | None = None, weights: Sequence[float] | None = None) -> list[float | None]:
    """`metric` on each fold's validation rows, in fold order."""
    truth = y.to_numpy()
    truth = truth.astype(str) if classes is not None else truth.astype("float64")
    scores = []
    for fold, (_, validation) in enumerate(oof.splits):
        predictions = oof.values[oof.repeat_of(fold), validation]
        scores.append(_score(metric, truth[validation], predictions, classes, threshold, weights))
    return scores


def fold_score(oof: OutOfFold, fold: int, metric: str, y: pd.Series, classes: Sequence[str] | None) -> float | None:
    """`metric` on one fold's validation rows (filled already)."""
    validation = oof.splits[fold][1]
    truth = y.to_numpy()[validation]
    truth = truth.astype(str) if classes is not None else truth.astype("float64")
    return _score(metric, truth, oof.values[oof.repeat_of(fold), validation], classes, None)


def pessimistic(metric: str, scores: Sequence[float | None]) -> float | None:
    """The mean fold score moved one standard error towards worse: what the search ranks by, so
    that of two settings with the same mean the steadier wins, and a mean lifted by one lucky
    fold counts for less (a linear model that fits 2 folds well and fails the third)."""
    defined = [s for s in scores if s is not None]
    if not defined:
        return None
    mean = float(np.mean(defined))
    error = float(np.std(defined) / np.sqrt(len(defined))) if len(defined) > 1 else 0.0
    return mean + error if metric in LOWER_IS_BETTER else mean - error


def single_class(oof: OutOfFold, classes: Sequence[str] | None, threshold: float | None = None,
                 weights: Sequence[float] | None = None) -> bool:
    """Whether the labels answered for every row are one and the same class."""
    if classes is None:
        return False
    return len(np.unique(labels(np.nan_to_num(oof.values), classes, threshold, weights))) == 1


def tune_threshold(oof: OutOfFold, metric: str, y: pd.Series, classes: Sequence[str]) -> tuple[float, float] | None:
    """(threshold, mean fold score) that maximises `metric` over the out-of-fold probabilities of
    a binary target, or None when the metric does not use a threshold (THRESHOLD_METRICS).

    Like scikit-learn's TunedThresholdClassifierCV, but on the predictions the search already
    has: the candidate thresholds are percentiles of the positive class's probability, each
    scored by the mean of its fold scores; 0.5 is among them, so tuning never scores worse
    than the default rule out of fold (where 0.5 wins it is kept)."""
    if metric not in THRESHOLD_METRICS or len(classes) != 2:
        return None
    probability = oof.values[..., 1]
    grid = np.unique(np.concatenate([[0.5], np.nanpercentile(probability, np.linspace(1, 99, THRESHOLD_GRID))]))
    truth = y.to_numpy().astype(str) == str(classes[1])
    per_fold = [
        binary_threshold_scores(metric, truth[validation], probability[oof.repeat_of(fold), validation], grid)
        for fold, (_, validation) in enumerate(oof.splits)
    ]
    means = np.mean(per_fold, axis=0)
    best = int(np.argmax(means))
    default = int(np.flatnonzero(grid == 0.5)[0])
    if means[default] >= means[best] - 1e-12:  # no better than the default rule: keep 0.5
        return 0.5, float(means[default])
    # Halfway down to the next lower probability seen: the same labels out of fold, and no row
    # sits right at the threshold, where float32 (as served) and float64 could disagree.
    threshold = float(grid[best])
    below = probability[probability < threshold]
    if below.size:
        threshold = (threshold + float(np.max(below))) / 2
    return threshold, float(means[best])


def tune_class_weights(oof: OutOfFold, metric: str, y: pd.Series, classes: Sequence[str]) -> tuple[list[float], float] | None:
    """For more than two classes and a metric that counts every class alike: the answer becomes
    the class whose probability divided by its share of the training rows is largest (the
    decision that maximises balanced accuracy when the probabilities are right), if that scores
    better out of fold than the most probable class. (class weights, mean fold score), or None."""
    if metric not in THRESHOLD_METRICS or len(classes) <= 2:
        return None
    shares = y.astype(str).value_counts(normalize=True)
    weights = [1.0 / float(shares.get(c, 1.0)) for c in classes]
    weights = [w / max(weights) for w in weights]
    plain = _mean(fold_scores(oof, metric, y, classes))
    weighted = _mean(fold_scores(oof, metric, y, classes, weights=weights))
    if weighted is None or plain is None or weighted <= plain + 1e-12:
        return None
    return weights, weighted


def _mean(scores: Sequence[float | None]) -> float | None:
    defined = [s for s in scores if s is not None]
    return float(np.mean(defined)) if defined else None


def select_ensemble(members: dict[str, OutOfFold], metric: str, y: pd.Series, classes: Sequence[str] | None,
                    first: str) -> dict[str, int]:
    """Ensemble selection (Caruana et al., 2004) on out-of-fold predictions: start from `first`
    (the best single candidate), then up to ENSEMBLE_ROUNDS times add, with repetition, the
    member whose addition to the average scores best; stop when no addition improves the mean
    fold score. Returns each chosen member's weight (how many times it was added)."""
    chosen = [first]
    current = _mean(fold_scores(members[first], metric, y, classes))
    if current is None:
        return {first: 1}
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    for _ in range(ENSEMBLE_ROUNDS - 1):
        best_name, best_score = None, current
        for name in members:
            trial = chosen + [name]
            weights = Counter(trial)
            blended = blend([members[n] for n in weights], list(weights.values()))
            score = _mean(fold_scores(blended, metric, y, classes))
            if score is not None and sign * (score - best_score) > 1e-12:
                best_name, best_score = name, score
        if best_name is None:
            break
        chosen.append(best_name)
        current = best_score
    return dict(Counter(chosen))
