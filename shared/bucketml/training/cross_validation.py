"""The rows the candidate search cross-validates on: a seeded sample of the training rows,
its folds, and each fold prepared once per preprocessing (docs/architecture.md, "Selection")."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold

from bucketml.training.candidates import SEED, CandidateDefinition

CV_FOLDS = 3  # the folds of large data; smaller data gets more (see `fold_plan`)
# (most cross-validated rows, folds, repeats), first match: on small data each fold's score is
# noisy (a 60-row fold of an imbalanced target holds a handful of the small class), so more folds
# and a repeat with other folds steady the estimate that picks the model, at little cost there.
FOLD_PLAN = ((300, 5, 2), (2_000, 5, 1))
# Each fold's prepared (imputed, scaled, encoded) input is kept for the other settings (and
# the candidates with the same preprocessing) while it takes at most this many bytes;
# otherwise it is prepared again for every setting, as Pipeline.fit does.
PREPARED_CACHE_BYTES = 256 * 2**20


def sample_rows(
    task: str, x: pd.DataFrame, y: pd.Series, rows: int, folds: int = CV_FOLDS, random_state: int = SEED
) -> tuple[pd.DataFrame, pd.Series]:
    """At most about `rows` rows (seeded, in their original order): per class in proportion for
    classification, each class keeping at least min(its rows, folds); uniform for regression."""
    if len(x) <= rows:
        return x, y
    rng = np.random.default_rng(random_state)
    if task == "classification":
        labels = y.to_numpy()
        share = rows / len(labels)
        picked = []
        for label in sorted(pd.unique(labels)):
            positions = np.flatnonzero(labels == label)
            keep = min(len(positions), max(folds, round(len(positions) * share)))
            picked.append(rng.choice(positions, keep, replace=False))
        positions = np.sort(np.concatenate(picked))
    else:
        positions = np.sort(rng.choice(len(x), rows, replace=False))
    return x.iloc[positions], y.iloc[positions]


def fold_plan(rows: int) -> tuple[int, int]:
    """(folds, repeats) for cross-validating on `rows` rows (FOLD_PLAN)."""
    for most, folds, repeats in FOLD_PLAN:
        if rows <= most:
            return folds, repeats
    return CV_FOLDS, 1


def cv_splits(
    task: str, y: pd.Series, folds: int = CV_FOLDS, random_state: int = SEED, repeats: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` x `repeats` (train, validation) position pairs, repeat by repeat (each repeat's
    validation rows cover every row once): stratified for classification (a class with fewer
    rows than folds is simply missing from some folds), shuffled with the seed."""
    if task == "classification" and y.value_counts().max() >= folds:
        splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=random_state)
        return list(splitter.split(np.zeros(len(y)), y.to_numpy()))
    splitter = RepeatedKFold(n_splits=folds, n_repeats=repeats, random_state=random_state)
    return list(splitter.split(np.zeros(len(y))))


class RowSet(NamedTuple):
    """The rows of the settings under one row cap: cross-validated on, then refitted on."""

    cv_x: pd.DataFrame
    cv_y: pd.Series
    splits: list[tuple[np.ndarray, np.ndarray]]
    fit_x: pd.DataFrame
    fit_y: pd.Series


class TrainingRows:
    """The training rows, and the samples of them each row cap cross-validates and refits on.

    Uncapped settings cross-validate on a sample of at most `sample_limit` rows and refit on
    all; a capped setting (the exact kernel SVM) does both on its own sample."""

    def __init__(self, task: str, x: pd.DataFrame, y: pd.Series, sample_limit: int, folds: int | None,
                 random_state: int) -> None:
        """`folds`: None sizes the folds and repeats to the cross-validated rows (`fold_plan`)."""
        self.task, self.x, self.y = task, x, y
        self.random_state = random_state
        self.cv_x, self.cv_y = sample_rows(task, x, y, sample_limit, folds or CV_FOLDS, random_state)
        self.folds, self.repeats = (folds, 1) if folds else fold_plan(len(self.cv_x))
        self._sets: dict[int | None, RowSet] = {}

    def effective_cap(self, cap: int | None) -> int | None:
        """`cap`, or None when every training row fits under it."""
        return cap if cap is not None and len(self.x) > cap else None

    def for_cap(self, cap: int | None) -> RowSet:
        key = self.effective_cap(cap)
        if key not in self._sets:
            if key is None:
                x, y, fit_x, fit_y = self.cv_x, self.cv_y, self.x, self.y
            else:
                x, y = sample_rows(self.task, self.x, self.y, key, self.folds, self.random_state)
                fit_x, fit_y = x, y
            splits = cv_splits(self.task, y, self.folds, self.random_state, self.repeats)
            self._sets[key] = RowSet(x, y, splits, fit_x, fit_y)
        return self._sets[key]


class PreparedFold(NamedTuple):
    fit_x: Any  # prepared (imputed, scaled, encoded) fitting rows
    fit_y: pd.Series
    validation_x: Any
    validation_y: pd.Series


class PreparedFolds:
    """Per fold, the rows as a candidate's preprocessing turns them into model input.

    A candidate's preprocessing does not depend on its setting: it is fitted once per fold, as
    Pipeline.fit would fit it for every setting, and kept for the candidates that share it
    while it takes at most PREPARED_CACHE_BYTES."""

    def __init__(self, rows: TrainingRows) -> None:
        self.rows = rows
        self._kept: dict[tuple[int | None, bool, bool], list[PreparedFold]] = {}

    def get(self, definition: CandidateDefinition, cap: int | None) -> list[PreparedFold]:
        key = (self.rows.effective_cap(cap), definition.scale, definition.dense)
        if key in self._kept:
            return self._kept[key]
        row_set = self.rows.for_cap(cap)
        folds = []
        for fit_positions, validation_positions in row_set.splits:
            prepare = definition.preprocessor()
            fit_x, fit_y = row_set.cv_x.iloc[fit_positions], row_set.cv_y.iloc[fit_positions]
            folds.append(PreparedFold(
                prepare.fit_transform(fit_x, fit_y), fit_y,
                prepare.transform(row_set.cv_x.iloc[validation_positions]), row_set.cv_y.iloc[validation_positions],
            ))
        if sum(_nbytes(part) for fold in folds for part in (fold.fit_x, fold.validation_x)) <= PREPARED_CACHE_BYTES:
            self._kept[key] = folds
        return folds


def _nbytes(matrix: Any) -> int:
    """Memory of a dense or scipy sparse matrix."""
    if hasattr(matrix, "indices"):
        return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
    return int(np.asarray(matrix).nbytes)
