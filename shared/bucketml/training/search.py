"""The choice among the candidates (training.candidates) by cross-validation on the training
split, within the spec's `max_training_seconds` (docs/architecture.md, "Selection").

    search = CandidateSearch.for_spec(schema, spec).fit(x_train, y_train).evaluate(x_test, y_test)
    search.best_, search.results_, search.failures_, search.skipped_, search.summary_

`fit` uses the TRAINING rows only: each candidate's few hyperparameter settings
(`candidates.search_space`) are scored by 3-fold cross-validation with the spec's metric, the
best setting is refitted on the training rows and the candidates are ranked by their
cross-validation score. `evaluate` scores each fitted candidate on the held-out rows for the
card; those rows never pick a setting or a candidate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from bucketml.contracts.spec import (
    ALGORITHMS,
    LOWER_IS_BETTER,
    METRICS,
    algorithms_for,
    better,
    metric_for,
    with_defaults,
)
from bucketml.training.candidates import (
    SEED,
    CandidateDefinition,
    class_weight_note,
    definitions,
    fit_model,
    row_cap,
    svm_variant_note,
    tree_size,
)
from bucketml.training.cross_validation import CV_FOLDS, PreparedFolds, TrainingRows
from bucketml.training.metrics import evaluation, fold_score

# Cross-validation runs on a (stratified) sample of at most this many training rows; the
# chosen setting is refitted on all of them (the exact-kernel SVM: on candidates.SVM_MAX_ROWS).
CV_MAX_ROWS = 20_000

Clock = Callable[[], float]


class TrainingError(Exception):
    """Training could not produce a model; the message says why."""


@dataclasses.dataclass
class Trial:
    """One hyperparameter setting of a candidate, scored by cross-validation on training rows."""

    params: dict[str, Any]
    rows: int = 0  # training rows cross-validated on
    fold_scores: list[float | None] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None  # why it has no score (a fit failed, the budget ran out mid-way)
    interrupted: bool = False  # the budget ran out during its folds
    tree_sizes: list[int | None] = dataclasses.field(default_factory=list)  # per fold, see `candidates.tree_size`
    same_as: dict[str, Any] | None = None  # provably the same models as this tried setting
    folds: int = CV_FOLDS  # the folds it is cross-validated on

    @property
    def score(self) -> float | None:
        """Mean fold score; None unless every fold was scored."""
        if self.error or len(self.fold_scores) < self.folds:
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
    """A fitted candidate: its chosen setting, the search that chose it, its held-out metrics."""

    name: str
    pipeline: Pipeline
    metrics: dict[str, float | None] = dataclasses.field(default_factory=dict)  # on the held-out rows
    fit_seconds: float = 0.0  # the refit of the chosen setting on the training rows, and its evaluation
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


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


# --- one candidate's settings ------------------------------------------------------------------


@dataclasses.dataclass
class CandidateRun:
    """One candidate's settings and the trials made of them so far."""

    definition: CandidateDefinition
    settings: list[dict[str, Any]]
    notes: list[str]
    trials: list[Trial] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.definition.name

    def best(self, metric: str) -> Trial | None:
        """The best scored trial; on a tie the earlier setting (the default first)."""
        best = None
        for trial in self.trials:
            if trial.score is not None and (best is None or better(metric, trial.score, best.score)):
                best = trial
        return best

    def refit_estimate(self, metric: str, rows: TrainingRows) -> float:
        """Seconds to refit the best setting: one fold's fit, scaled to the refit rows."""
        best = self.best(metric)
        if best is None:
            return 0.0
        if best.same_as is not None:
            best = next(t for t in self.trials if t.params == best.same_as)
        refit_rows = len(rows.for_cap(row_cap(self.name, best.params)).fit_x)
        fold_rows = best.rows * (best.folds - 1) / best.folds
        return best.seconds / best.folds * max(1.0, refit_rows / max(fold_rows, 1.0))

    def next_setting_estimate(self) -> float:
        """Seconds the next setting is expected to take: the mean of those fitted so far."""
        fitted = [t for t in self.trials if t.error is None and t.same_as is None]
        return float(np.mean([t.seconds for t in fitted])) if fitted else 0.0


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
        if trial.score is None or len(trial.tree_sizes) != trial.folds or trial.same_as is not None:
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


@contextlib.contextmanager
def _one_thread_quietly() -> Iterator[None]:
    """One OpenMP thread (HistGradientBoosting), like n_jobs=1 for the forest: on a shared or
    busy CPU, OpenMP's spinning threads made a 350-row fit take seconds, not 0.1 s. One BLAS
    thread too: the many small fits of the search (lbfgs in logistic regression and in the
    SVM's calibration) took twice the CPU time with OpenBLAS's two threads on 2 cores."""
    with (
        warnings.catch_warnings(),
        threadpool_limits(limits=1, user_api="openmp"),
        threadpool_limits(limits=1, user_api="blas"),
    ):
        warnings.simplefilter("ignore", category=UserWarning)  # convergence, small folds, ...
        yield


# --- the search --------------------------------------------------------------------------------


class CandidateSearch:
    """Choose among the candidates by cross-validation on the training rows.

    `fit(X, y)`:
    1. Screen: in the fixed order of `candidates.estimators`, cross-validate each candidate's
       first (default) setting. Once `budget_seconds` would be exceeded (time spent plus the
       estimated refits of the candidates screened so far) the remaining candidates are
       skipped, but one candidate is always screened.
    2. Search: the other settings of `candidates.search_space`, round-robin over the
       candidates, best cross-validation score first, while the estimated cost of the next
       setting still fits the budget; then the search stops and every candidate keeps its best
       setting so far (the untried settings are recorded).
    3. Refit each candidate's best setting on the training rows (the exact kernel SVM on at
       most candidates.SVM_MAX_ROWS).
    `evaluate(X, y)` then scores each fitted candidate on the held-out rows, for the card only.

    Cross-validation: `cv_folds` folds, stratified for classification, on a sample of at most
    `sample_limit` training rows, scored with `metric`. `results_` holds the fitted candidates
    best first by their cross-validation score (on a tie the earlier in the fixed order).
    `clock` measures the budget and every duration recorded.
    """

    def __init__(
        self,
        task: str,
        columns: list[dict[str, Any]],
        *,
        metric: str,
        algorithms: Sequence[str],
        budget_seconds: float,
        cv_folds: int = CV_FOLDS,
        sample_limit: int = CV_MAX_ROWS,
        random_state: int = SEED,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.task = task
        self.columns = columns
        self.metric = metric
        self.algorithms = algorithms
        self.budget_seconds = budget_seconds
        self.cv_folds = cv_folds
        self.sample_limit = sample_limit
        self.random_state = random_state
        self.clock = clock

    @classmethod
    def for_spec(cls, schema: dict[str, Any], spec: dict[str, Any] | None = None, *, clock: Clock = time.perf_counter) -> CandidateSearch:
        """The search a dataset spec asks for; `spec` is the effective one (default:
        schema["spec"], else spec.DEFAULTS)."""
        spec = with_defaults(spec if spec is not None else schema.get("spec"))
        task = schema["task"]
        return cls(
            task, schema["columns"], metric=metric_for(spec, task), algorithms=algorithms_for(spec, task),
            budget_seconds=float(spec["max_training_seconds"]), sample_limit=CV_MAX_ROWS, clock=clock,
        )

    # --- fitted results --------------------------------------------------------------------

    @property
    def best_(self) -> Candidate:
        """The candidate with the best cross-validation score."""
        return self.results_[0]

    @property
    def ranking_(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "cv_score": _rounded(c.cv_score)} for c in self.results_]

    @property
    def summary_(self) -> dict[str, Any]:
        """What the search did, for the card's `selection`."""
        stratified = "stratified " if self.task == "classification" else ""
        return {
            "method": f"{self.cv_folds}-fold {stratified}cross-validation on the training split; each candidate's "
            "best setting refitted on the training rows; the held-out rows only evaluate",
            "metric": self.metric,
            "folds": self.cv_folds,
            "train_rows": len(self._rows.x),
            "cv_rows": len(self._rows.cv_x),
            "test_rows": self.test_rows_,
            "budget_seconds": self._budget,
            "seconds": round(self.seconds_, 3),
            "settings_tried": sum(len(run.trials) for run in self._runs),
            "settings_planned": sum(len(run.settings) for run in self._runs),
            "search_stopped": self.search_stopped_,
            "ranking": self.ranking_,
        }

    # --- fit -------------------------------------------------------------------------------

    def fit(self, X: pd.DataFrame, y: pd.Series) -> CandidateSearch:
        """Screen, search and refit on the training rows `X`, `y` (see the class)."""
        self._check_settings()
        weight_note = class_weight_note(self.task, y)
        self._classes = sorted(str(c) for c in pd.unique(y)) if self.task == "classification" else []
        self._started = self.clock()
        self._rows = TrainingRows(self.task, X, y, self.sample_limit, self.cv_folds, self.random_state)
        self._prepared = PreparedFolds(self._rows)
        self._runs: list[CandidateRun] = []
        self.failures_: list[str] = []
        self.skipped_: list[dict[str, str]] = []
        self.search_stopped_: str | None = None
        self.test_rows_: int | None = None
        with _one_thread_quietly():
            self._screen(weight_note)
            self._search_other_settings()
            fitted = self._refit()
        if not fitted:
            raise TrainingError("no candidate could be trained: " + "; ".join(self.failures_))
        # Stable sort: on a tie the earlier (cheaper, simpler to explain) candidate wins.
        self.results_: list[Candidate] = sorted(fitted, key=lambda c: self._sign * c.cv_score)
        self.seconds_ = self._elapsed()
        return self

    def evaluate(self, X: pd.DataFrame, y: pd.Series) -> CandidateSearch:
        """Each fitted candidate's metrics (and confusion matrix) on the held-out rows `X`, `y`,
        for the card; they change no ranking. One that cannot be evaluated joins `failures_`."""
        screened = [run.name for run in self._runs]
        failed = set()
        with _one_thread_quietly():
            for candidate in sorted(self.results_, key=lambda c: screened.index(c.name)):
                began = self.clock()
                try:
                    candidate.metrics, candidate.confusion = evaluation(self.task, candidate.pipeline, X, y)
                except ValueError as exc:
                    self.failures_.append(f"{candidate.name}: {exc}")
                    failed.add(candidate.name)
                finally:
                    # The card's fit_seconds has always covered the refit and this evaluation.
                    candidate.fit_seconds += self.clock() - began
        self.results_ = [c for c in self.results_ if c.name not in failed]
        if not self.results_:
            raise TrainingError("no candidate could be trained: " + "; ".join(self.failures_))
        self.test_rows_ = len(X)
        self.seconds_ = self._elapsed()
        return self

    def _check_settings(self) -> None:
        unknown = [name for name in self.algorithms if name not in ALGORITHMS[self.task]]
        if self.metric not in METRICS[self.task] or unknown:
            raise TrainingError(
                f"the spec does not fit a {self.task} task: metric {self.metric!r}, algorithms {list(self.algorithms)}"
            )

    @property
    def _budget(self) -> float:
        return float(self.budget_seconds)

    @property
    def _sign(self) -> float:
        """Sorting by sign * score puts the best first."""
        return 1.0 if self.metric in LOWER_IS_BETTER else -1.0

    def _elapsed(self) -> float:
        return self.clock() - self._started

    def _reserve(self) -> float:
        """Seconds kept to refit the best setting of every candidate screened so far."""
        return sum(run.refit_estimate(self.metric, self._rows) for run in self._runs)

    def _screen(self, weight_note: str | None) -> None:
        """1. Cross-validate every candidate's default setting while the budget lasts."""
        for definition in definitions(self.task, self.columns, list(self.algorithms), weight_note is not None, self.random_state):
            if self._runs and self._elapsed() + self._reserve() >= self._budget:
                self.skipped_.append({
                    "name": definition.name,
                    "reason": f"max_training_seconds={self._budget:g} spent ({self._elapsed():.2f} s elapsed, "
                    f"{self._reserve():.2f} s kept to refit the candidates before it)",
                })
                continue
            run = CandidateRun(definition, definition.settings(len(self._rows.x)), [weight_note] if weight_note else [])
            trial = self._cross_validate(run, run.settings[0], first=True)
            if trial.score is None:
                self.failures_.append(
                    f"{run.name}: {trial.error or f'{self.metric} is undefined in every cross-validation fold'}"
                )
                continue
            self._runs.append(run)

    def _search_other_settings(self) -> None:
        """2. The other settings, round-robin, best candidate first, while the budget lasts."""
        budget = self._budget
        for index in range(1, max((len(run.settings) for run in self._runs), default=0)):
            ranked = sorted(self._runs, key=lambda run: self._sign * run.best(self.metric).score)
            for run in ranked:
                if index >= len(run.settings):
                    continue
                estimate = run.next_setting_estimate()
                if self._elapsed() + estimate + self._reserve() > budget:
                    self.search_stopped_ = (
                        f"max_training_seconds={budget:g}: the search stopped after {self._elapsed():.2f} s "
                        f"(the next setting, of {run.name}, would take about {estimate:.2f} s)"
                    )
                    return
                trial = self._cross_validate(run, run.settings[index], first=False)
                if trial.interrupted:
                    self.search_stopped_ = (
                        f"max_training_seconds={budget:g}: the search stopped after {self._elapsed():.2f} s, "
                        f"during a setting of {run.name}"
                    )
                    return

    def _cross_validate(self, run: CandidateRun, params: dict[str, Any], first: bool) -> Trial:
        """Cross-validate one setting. Only a candidate's first setting finishes whatever the budget."""
        cap = row_cap(run.name, params)
        trial = Trial(dict(params), rows=len(self._rows.for_cap(cap).cv_x), folds=self.cv_folds)
        twin = same_model(run.name, params, run.trials)
        if twin is not None:
            trial.same_as, trial.fold_scores, trial.tree_sizes = twin.params, list(twin.fold_scores), list(twin.tree_sizes)
            run.trials.append(trial)
            return trial
        began = self.clock()
        try:
            folds = self._prepared.get(run.definition, cap)
            for fold in folds:
                model = fit_model(run.name, run.definition.estimator(**params), fold.fit_x, fold.fit_y)
                trial.fold_scores.append(fold_score(self.metric, model, fold.validation_x, fold.validation_y, self._classes))
                trial.tree_sizes.append(tree_size(run.name, model))
                if not first and len(trial.fold_scores) < len(folds) and self._elapsed() + self._reserve() > self._budget:
                    trial.error = f"max_training_seconds={self._budget:g} ran out during its folds"
                    trial.interrupted = True
                    break
        except ValueError as exc:  # e.g. too few rows of a class for the SVM's calibration folds
            trial.error = str(exc)
        trial.seconds = self.clock() - began
        run.trials.append(trial)
        return trial

    def _refit(self) -> list[Candidate]:
        """3. Each candidate's best setting refitted on the training rows, in screening order."""
        fitted = []
        for run in self._runs:
            candidate = self._candidate(run)
            row_set = self._rows.for_cap(row_cap(run.name, candidate.params))
            began = self.clock()
            try:
                fit_model(run.name, candidate.pipeline, row_set.fit_x, row_set.fit_y)
            except ValueError as exc:
                self.failures_.append(f"{run.name}: {exc}")
                continue
            finally:
                candidate.fit_seconds = self.clock() - began
            fitted.append(candidate)
        return fitted

    def _candidate(self, run: CandidateRun) -> Candidate:
        """The unfitted candidate of a run's best setting, with the notes the card shows."""
        best = run.best(self.metric)
        cap = row_cap(run.name, best.params)
        tried = [t.params for t in run.trials]
        candidate = Candidate(
            run.name, run.definition.pipeline(best.params), notes=list(run.notes), params=best.params,
            cv_score=best.score, trials=run.trials, untried=[s for s in run.settings if s not in tried],
        )
        if candidate.untried or any(t.interrupted for t in run.trials):
            candidate.search_stopped = self.search_stopped_
        for trial in run.trials:
            if trial.error and not trial.interrupted:
                candidate.notes.append(f"setting {trial.params} failed in cross-validation: {trial.error}")
        train_rows, cv_rows = len(self._rows.x), len(self._rows.cv_x)
        if cv_rows < train_rows and (cap is None or cap >= cv_rows):
            sample = "a stratified sample" if self.task == "classification" else "a sample"
            candidate.notes.append(f"cross-validated on {sample} of {cv_rows} of {train_rows} training rows")
        if run.name == "svm":
            note = svm_variant_note(self.task, best.params, train_rows, len(self._rows.for_cap(cap).fit_x))
            if note:
                candidate.notes.append(note)
        return candidate
