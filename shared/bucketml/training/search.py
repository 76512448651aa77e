"""The choice among the candidates (training.candidates) by cross-validation on the training
split, within the spec's `max_training_seconds` (docs/architecture.md, "Selection").

    search = CandidateSearch.for_spec(schema, spec).fit(x_train, y_train).evaluate(x_test, y_test)
    search.best_, search.results_, search.failures_, search.skipped_, search.summary_

`fit` uses the TRAINING rows only: each candidate's few hyperparameter settings
(`candidates.search_space`) are scored by cross-validation sized to the data with the metric
(the spec's, or the task's default: balanced accuracy for an imbalanced target), the best
setting is refitted on the training rows, decision rules (binary thresholds, class weights) are
tuned and an ensemble is built from the out-of-fold predictions (training.out_of_fold), and the candidates are ranked.
`evaluate` scores each fitted candidate on the held-out rows for the card; those rows never
pick a setting, a threshold or a candidate.
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
from threadpoolctl import threadpool_limits

from bucketml.contracts.spec import (
    ALGORITHMS,
    LOWER_IS_BETTER,
    METRICS,
    algorithms_for,
    better,
    default_metric,
    with_defaults,
)
from bucketml.training.candidates import (
    IMBALANCE_RATIO,
    LOG_SCALE_SKEWNESS,
    SEED,
    CandidateDefinition,
    class_ratio,
    class_weight_note,
    definitions,
    ensemble_model,
    fit_model,
    frequent_categories,
    imbalanced,
    log_scale_worth_trying,
    on_scale,
    reweighted,
    row_cap,
    svm_variant_note,
    thresholded,
    tree_size,
)
from bucketml.training.cross_validation import CV_FOLDS, PreparedFolds, TrainingRows
from bucketml.training.metrics import evaluation
from bucketml.training.out_of_fold import (
    THRESHOLD_METRICS,
    OutOfFold,
    blend,
    fold_score,
    fold_scores,
    pessimistic,
    select_ensemble,
    single_class,
    tune_class_weights,
    tune_threshold,
)

# Cross-validation runs on a (stratified) sample of at most this many training rows; the
# chosen setting is refitted on all of them (the exact-kernel SVM: on candidates.SVM_MAX_ROWS).
CV_MAX_ROWS = 20_000
# After the screen, only this many of the best candidates try their other settings.
SEARCH_TOP = 2
# Early dropping in the screen, checked from DROP_AFTER_FOLDS folds on: a candidate whose mean
# score on its first folds is worse than the leader's on the same folds by more than DROP_MARGIN
# (absolute; error metrics: relative), or worse at all while its other folds would take more
# than SLOW_DROP_SHARE times the search budget, is not cross-validated further.
DROP_AFTER_FOLDS = 2
DROP_MARGIN = 0.1
SLOW_DROP_SHARE = 2.0
# The other settings (step 2) get at most SEARCH_SECONDS + rows / SEARCH_ROWS_PER_SECOND seconds
# from the start, within max_training_seconds: the search grows with the data, and a small
# dataset is served in seconds (docs/benchmarks.md has the figures it was set by).
SEARCH_SECONDS = 1.0
SEARCH_ROWS_PER_SECOND = 1_200

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
    folds: int = CV_FOLDS  # the fits it is cross-validated by (folds x repeats)
    scale: str = "raw"  # the target's scale in the fit (candidates.on_scale)
    oof: OutOfFold | None = None  # every fold's predictions on its validation rows
    threshold: float | None = None  # binary: the tuned decision threshold (out_of_fold.tune_threshold)
    class_weights: list[float] | None = None  # more classes: the decision's weights (out_of_fold.tune_class_weights)
    tuned_fold_scores: list[float | None] | None = None  # the fold scores at that threshold or with those weights
    rank_metric: str | None = None  # the metric it is ranked by
    check_scores: list[float | None] = dataclasses.field(default_factory=list)  # screen: per fold, for early dropping
    dropped: bool = False  # the screen stopped it early: hopeless against the leader

    @property
    def complete(self) -> bool:
        return self.error is None and len(self.fold_scores) >= self.folds

    @property
    def scores(self) -> list[float | None]:
        """The fold scores that count: at the tuned threshold once there is one."""
        return self.tuned_fold_scores if self.tuned_fold_scores is not None else self.fold_scores

    @property
    def score(self) -> float | None:
        """Mean fold score; None unless every fold was scored."""
        if not self.complete:
            return None
        defined = [s for s in self.scores if s is not None]
        return float(np.mean(defined)) if defined else None

    def rank_score(self, metric: str) -> float | None:
        """What candidates and settings are compared by (out_of_fold.pessimistic)."""
        return pessimistic(metric, self.scores) if self.complete else None

    def summary(self) -> dict[str, Any]:
        defined = [s for s in self.fold_scores if s is not None]
        out = {
            "params": self.params,
            "cv_score": _rounded(float(np.mean(defined)) if self.complete and defined else None),
            "cv_std": _rounded(float(np.std(defined))) if self.complete and defined else None,
            "fold_scores": [_rounded(s) for s in self.fold_scores],
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
        }
        if self.rank_metric is not None and self.complete:
            out["rank_score"] = _rounded(self.rank_score(self.rank_metric))
        if self.scale != "raw":
            out["target_scale"] = self.scale
        if self.error:
            out["error"] = self.error
        if self.same_as is not None:
            out["same_as"] = self.same_as
        return out


@dataclasses.dataclass
class Candidate:
    """A fitted candidate: its chosen setting, the search that chose it, its held-out metrics."""

    name: str
    pipeline: Any  # what is exported and served: the Pipeline, maybe on a log scale or with a threshold
    metrics: dict[str, float | None] = dataclasses.field(default_factory=dict)  # on the held-out rows
    fit_seconds: float = 0.0  # the refit of the chosen setting on the training rows, and its evaluation
    notes: list[str] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the chosen setting
    cv_score: float | None = None  # its mean cross-validation score
    rank_score: float | None = None  # what ranks the candidates (out_of_fold.pessimistic)
    trials: list[Trial] = dataclasses.field(default_factory=list)  # every setting tried, in order
    untried: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # settings the budget left out
    search_stopped: str | None = None
    confusion: dict[str, Any] | None = None  # classification, on the held-out rows
    chosen: Trial | None = None  # the trial of the chosen setting (an ensemble has none)
    base: Any = None  # the fitted model before its decision rule (threshold, class weights) is put around it
    one_class: bool = False  # it answered one class for every row out of fold
    members: dict[str, int] | None = None  # an ensemble's members and their weights
    classes: list[str] = dataclasses.field(default_factory=list)  # classification: the classes, sorted

    def summary(self) -> dict[str, Any]:
        chosen = self.chosen
        defined = [s for s in (chosen.scores if chosen else []) if s is not None]
        out = {
            "name": self.name,
            "metrics": self.metrics,
            "params": self.params,
            "cv_score": _rounded(self.cv_score),
            "cv_std": _rounded(float(np.std(defined))) if defined else None,
            "cv_rows": chosen.rows if chosen else None,
            "search": [t.summary() for t in self.trials],
            "untried": self.untried,
            "search_stopped": self.search_stopped,
            "search_seconds": round(sum(t.seconds for t in self.trials), 3),
            "fit_seconds": round(self.fit_seconds, 3),
            "notes": self.notes,
        }
        if chosen is not None and chosen.scale != "raw":
            out["target_scale"] = chosen.scale
        if chosen is not None and chosen.threshold is not None:
            out["threshold"] = _rounded(chosen.threshold)
        if chosen is not None and chosen.class_weights is not None:
            out["class_weights"] = {c: _rounded(w) for c, w in zip(self.classes, chosen.class_weights)}
        if self.members is not None:
            out["members"] = self.members
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
    scale: str = "raw"  # the target scale of the settings after the screen: the one it found better

    @property
    def name(self) -> str:
        return self.definition.name

    def best(self, metric: str) -> Trial | None:
        """The best scored trial; on a tie the earlier setting (the default first)."""
        best = None
        for trial in self.trials:
            score = trial.rank_score(metric)
            if score is not None and (best is None or better(metric, score, best.rank_score(metric))):
                best = trial
        return best


    def refit_estimate(self, metric: str, rows: TrainingRows) -> float:
        """Seconds to refit the best setting: one fold's fit, scaled to the refit rows."""
        best = self.best(metric)
        if best is None:
            return 0.0
        if best.same_as is not None:
            best = next(t for t in self.trials if t.params == best.same_as and t.scale == best.scale)
        refit_rows = len(rows.for_cap(row_cap(self.name, best.params)).fit_x)
        fold_rows = best.rows * (1 - 1 / max(2, rows.folds))
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
    0. The metric: the spec's, else accuracy, or balanced accuracy for an imbalanced target
       (candidates.imbalanced), else r2. A metric that counts every class alike makes the
       candidates weight classes "balanced". A skewed regression target with no negative value
       (candidates.log_scale_worth_trying) is tried on its own scale and on a log scale.
    1. Screen: in the fixed order of `candidates.estimators`, cross-validate each candidate's
       first (default) setting, on each target scale tried. Once `budget_seconds` would be
       exceeded (time spent plus the estimated refits of the candidates screened so far) the
       remaining candidates are skipped, but one candidate is always screened.
    2. Search: the other settings of `candidates.search_space`, on the scale that screened
       better, for the SEARCH_TOP best candidates only (the others are too far behind for a
       setting to matter as much as the time it costs), round-robin, best first, while the
       estimated cost of the next setting still fits the budget.
    3. Decision rule: for a metric that counts every class alike (balanced accuracy, f1 macro),
       a binary target gets each candidate's decision threshold tuned on its out-of-fold
       probabilities; more classes get class-share weights where they score better.
    4. Refit each candidate's best setting on the training rows (the exact kernel SVM on at
       most candidates.SVM_MAX_ROWS).
    5. Ensemble: ensemble selection on the out-of-fold predictions (out_of_fold.select_ensemble);
       the weighted average of the chosen members (soft voting) joins the candidates when it
       ranks first.
    `evaluate(X, y)` then scores each fitted candidate on the held-out rows, for the card only.

    Cross-validation: sized to the rows (cross_validation.fold_plan: more folds, and a repeat,
    on small data), stratified for classification, on a sample of at most `sample_limit` training
    rows. Every comparison ranks by the mean fold score less one standard error
    (out_of_fold.pessimistic); a candidate that answers one class for every row ranks after
    all that do not. `results_` holds the fitted candidates best first (on a tie the earlier in
    the fixed order). `clock` measures the budget and every duration recorded.
    """

    def __init__(
        self,
        task: str,
        columns: list[dict[str, Any]],
        *,
        metric: str | None,
        algorithms: Sequence[str],
        budget_seconds: float,
        cv_folds: int | None = None,
        sample_limit: int = CV_MAX_ROWS,
        random_state: int = SEED,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.task = task
        self.columns = columns
        self.metric = metric  # None: decided from the training rows (metric_)
        self.algorithms = algorithms
        self.budget_seconds = budget_seconds
        self.cv_folds = cv_folds  # None: sized to the rows (cross_validation.fold_plan)
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
            task, schema["columns"], metric=spec.get("metric"), algorithms=algorithms_for(spec, task),
            budget_seconds=float(spec["max_training_seconds"]), sample_limit=CV_MAX_ROWS, clock=clock,
        )

    # --- fitted results --------------------------------------------------------------------

    @property
    def best_(self) -> Candidate:
        """The candidate ranked first."""
        return self.results_[0]

    @property
    def ranking_(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "cv_score": _rounded(c.cv_score), "rank_score": _rounded(c.rank_score)}
                for c in self.results_]

    @property
    def summary_(self) -> dict[str, Any]:
        """What the search did, for the card's `selection`."""
        rows = self._rows
        stratified = "stratified " if self.task == "classification" else ""
        repeated = f", repeated {rows.repeats} times" if rows.repeats > 1 else ""
        out = {
            "method": f"{rows.folds}-fold {stratified}cross-validation{repeated} on the training split, ranked by "
            "the mean fold score less one standard error; each candidate's best setting refitted on the "
            "training rows; the held-out rows only evaluate",
            "metric": self.metric_,
            "metric_origin": self.metric_origin_,
            "folds": rows.folds,
            "repeats": rows.repeats,
            "train_rows": len(rows.x),
            "cv_rows": len(rows.cv_x),
            "test_rows": self.test_rows_,
            "budget_seconds": self._budget,
            "search_budget_seconds": round(self._search_budget, 3),
            "seconds": round(self.seconds_, 3),
            "settings_tried": sum(len(run.trials) for run in self._runs),
            "settings_planned": sum(len(run.settings) for run in self._runs),
            "search_stopped": self.search_stopped_,
            "ranking": self.ranking_,
            "ensemble": self.ensemble_,
        }
        if self.task == "classification":
            out["imbalance"] = self.imbalance_
        else:
            out["target_scales"] = self.target_scales_
        return out

    # --- fit -------------------------------------------------------------------------------

    def fit(self, X: pd.DataFrame, y: pd.Series) -> CandidateSearch:
        """Screen, search, tune thresholds, refit and ensemble on the training rows `X`, `y`
        (see the class)."""
        self._classes = sorted(str(c) for c in pd.unique(y)) if self.task == "classification" else []
        self._decide_metric(y)
        self._check_settings()
        weight_note = class_weight_note(self.task, y, self.metric_)
        scales = ["raw", "log"] if self.task == "regression" and log_scale_worth_trying(y) else ["raw"]
        self.target_scales_ = {"tried": scales, "rule": f"log1p tried when no value is negative and the skewness "
                                                           f"is at least {LOG_SCALE_SKEWNESS:g}"}
        self._started = self.clock()
        self._rows = TrainingRows(self.task, X, y, self.sample_limit, self.cv_folds, self.random_state)
        self._prepared = PreparedFolds(self._rows)
        self._runs: list[CandidateRun] = []
        self.failures_: list[str] = []
        self.skipped_: list[dict[str, str]] = []
        self.search_stopped_: str | None = None
        self.test_rows_: int | None = None
        self.ensemble_: dict[str, Any] | None = None
        with _one_thread_quietly():
            self._screen(weight_note, scales)
            self._search_other_settings()
            self._tune_thresholds()
            fitted = self._refit()
            if not fitted:
                raise TrainingError("no candidate could be trained: " + "; ".join(self.failures_))
            ensemble = self._ensemble(fitted)
        if ensemble is not None:
            fitted.append(ensemble)
        # Stable sort: on a tie the earlier (cheaper, simpler to explain) candidate wins; one that
        # answers a single class for every row comes after every one that does not.
        self.results_ = sorted(fitted, key=lambda c: (c.one_class, self._sign * c.rank_score))
        self.seconds_ = self._elapsed()
        return self

    def _decide_metric(self, y: pd.Series) -> None:
        ratio = class_ratio(y) if self.task == "classification" else None
        is_imbalanced = imbalanced(self.task, y)
        self.imbalance_ = {
            "largest_to_smallest": _rounded(ratio, 3), "imbalanced": is_imbalanced,
            "rule": f"imbalanced when the largest class has at least {IMBALANCE_RATIO:g} times the training rows "
                    "of the smallest",
        }
        self.metric_ = self.metric or default_metric(self.task, is_imbalanced)
        self.metric_origin_ = "spec" if self.metric else (
            "default for an imbalanced target" if is_imbalanced else "default")

    def evaluate(self, X: pd.DataFrame, y: pd.Series) -> CandidateSearch:
        """Each fitted candidate's metrics (and confusion matrix) on the held-out rows `X`, `y`,
        for the card; they change no ranking. One that cannot be evaluated joins `failures_`."""
        order = [run.name for run in self._runs] + ["ensemble"]
        failed = set()
        with _one_thread_quietly():
            for candidate in sorted(self.results_, key=lambda c: order.index(c.name)):
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
        if self.metric_ not in METRICS[self.task] or unknown:
            raise TrainingError(
                f"the spec does not fit a {self.task} task: metric {self.metric_!r}, algorithms {list(self.algorithms)}"
            )

    @property
    def _budget(self) -> float:
        return float(self.budget_seconds)

    @property
    def _search_budget(self) -> float:
        """Seconds from the start within which the other settings are tried (SEARCH_SECONDS)."""
        return min(self._budget, SEARCH_SECONDS + len(self._rows.x) / SEARCH_ROWS_PER_SECOND)

    @property
    def _budget_text(self) -> str:
        if self._search_budget < self._budget:
            return (f"the search budget for {len(self._rows.x)} training rows ({self._search_budget:.1f} s: "
                    f"{SEARCH_SECONDS:g} s + 1 s per {SEARCH_ROWS_PER_SECOND:,} rows)")
        return f"max_training_seconds={self._budget:g}"

    @property
    def _sign(self) -> float:
        """Sorting by sign * score puts the best first."""
        return 1.0 if self.metric_ in LOWER_IS_BETTER else -1.0

    def _elapsed(self) -> float:
        return self.clock() - self._started

    def _reserve(self) -> float:
        """Seconds kept to refit the best setting of every candidate screened so far."""
        return sum(run.refit_estimate(self.metric_, self._rows) for run in self._runs)

    def _screen(self, weight_note: str | None, scales: list[str]) -> None:
        """1. Cross-validate every candidate's default setting (on each scale) while the budget lasts."""
        weighted = weight_note is not None
        frequent = frequent_categories(self._rows.x, self.columns)
        for definition in definitions(self.task, self.columns, list(self.algorithms), weighted, self.random_state,
                                      frequent):
            if self._runs and self._elapsed() + self._reserve() >= self._budget:
                self.skipped_.append({
                    "name": definition.name,
                    "reason": f"max_training_seconds={self._budget:g} spent ({self._elapsed():.2f} s elapsed, "
                    f"{self._reserve():.2f} s kept to refit the candidates before it)",
                })
                continue
            run = CandidateRun(definition, definition.settings(len(self._rows.x)), [weight_note] if weight_note else [])
            for scale in scales:
                self._cross_validate(run, run.settings[0], first=True, scale=scale)
            best = run.best(self.metric_)
            if best is None and all(t.dropped for t in run.trials):
                self.skipped_.append({"name": definition.name, "reason": run.trials[-1].error})
                continue
            if best is None:
                errors = "; ".join(dict.fromkeys(t.error for t in run.trials if t.error))
                self.failures_.append(f"{run.name}: {errors or f'{self.metric_} is undefined in every cross-validation fold'}")
                continue
            run.scale = best.scale
            if len(scales) > 1:
                run.notes.append(self._scale_note(run))
            self._runs.append(run)

    def _scale_note(self, run: CandidateRun) -> str:
        def outcome(trial: Trial) -> str:
            score = trial.rank_score(self.metric_)
            if score is not None:
                return f"{trial.scale} {score:.4f}"
            return f"{trial.scale} " + (f"dropped after {len(trial.check_scores)} folds" if trial.dropped else "failed")

        shown = ", ".join(outcome(t) for t in run.trials)
        target = "a log scale (log1p; answers in the target's units)" if run.scale == "log" else "the target's own scale"
        return f"fitted on {target}: cross-validation {self.metric_} by scale: {shown}"

    def _search_other_settings(self) -> None:
        """2. The other settings of the SEARCH_TOP best candidates, round-robin, best first,
        while the budget lasts."""
        budget = self._search_budget
        ranked = sorted(self._runs, key=lambda run: self._sign * run.best(self.metric_).rank_score(self.metric_))
        searched = ranked[:SEARCH_TOP]
        for run in ranked[SEARCH_TOP:]:
            if len(run.settings) > 1:
                run.notes.append(f"only its default setting was tried: {SEARCH_TOP} candidates scored better in the screen")
                run.settings = run.settings[:1]
        for index in range(1, max((len(run.settings) for run in searched), default=0)):
            for run in searched:
                if index >= len(run.settings):
                    continue
                estimate = run.next_setting_estimate()
                if self._elapsed() + estimate + self._reserve() > budget:
                    self.search_stopped_ = (
                        f"{self._budget_text}: the search stopped after {self._elapsed():.2f} s "
                        f"(the next setting, of {run.name}, would take about {estimate:.2f} s)"
                    )
                    return
                trial = self._cross_validate(run, run.settings[index], first=False, scale=run.scale)
                if trial.interrupted:
                    self.search_stopped_ = (
                        f"{self._budget_text}: the search stopped after {self._elapsed():.2f} s, "
                        f"during a setting of {run.name}"
                    )
                    return

    def _cross_validate(self, run: CandidateRun, params: dict[str, Any], first: bool, scale: str = "raw") -> Trial:
        """Cross-validate one setting. Only a candidate's first setting finishes whatever the budget."""
        cap = row_cap(run.name, params)
        row_set = self._rows.for_cap(cap)
        trial = Trial(dict(params), rows=len(row_set.cv_x), folds=len(row_set.splits), scale=scale,
                      rank_metric=self.metric_)
        twin = same_model(run.name, params, [t for t in run.trials if t.scale == scale])
        if twin is not None:
            trial.same_as, trial.fold_scores, trial.tree_sizes = twin.params, list(twin.fold_scores), list(twin.tree_sizes)
            trial.oof = twin.oof
            run.trials.append(trial)
            return trial
        began = self.clock()
        classes = self._classes or None
        oof = OutOfFold.empty(len(row_set.cv_x), row_set.splits, len(self._classes))
        try:
            folds = self._prepared.get(run.definition, cap)
            for index, fold in enumerate(folds):
                model = fit_model(run.name, on_scale(run.definition.estimator(**params), scale), fold.fit_x, fold.fit_y)
                oof.fill(index, self._predictions(model, fold.validation_x))
                trial.tree_sizes.append(tree_size(run.name, model))
                trial.fold_scores.append(None)  # scored below, once every fold has its predictions
                if first:
                    trial.check_scores.append(fold_score(oof, index, self._check_metric, row_set.cv_y, classes))
                    hopeless = self._hopeless(run, trial, cap, began)
                    if hopeless and index + 1 < len(folds):
                        trial.error, trial.dropped = hopeless, True
                        break
                elif index + 1 < len(folds) and self._elapsed() + self._reserve() > self._search_budget:
                    trial.error = f"the search budget ({self._search_budget:.1f} s) ran out during its folds"
                    trial.interrupted = True
                    break
        except ValueError as exc:  # e.g. too few rows of a class for the SVM's calibration folds
            trial.error = str(exc)
        if trial.error is None:
            trial.oof = oof
            trial.fold_scores = fold_scores(oof, self.metric_, row_set.cv_y, classes)
        trial.seconds = self.clock() - began
        run.trials.append(trial)
        return trial

    @property
    def _check_metric(self) -> str:
        """What early dropping compares: the metric, or ROC AUC where the decision rule is still
        to be tuned (before its threshold or class weights, an unweighted model's balanced
        accuracy can look far worse than it will be)."""
        return "roc_auc" if self.metric_ in THRESHOLD_METRICS else self.metric_

    def _hopeless(self, run: CandidateRun, trial: Trial, cap: int | None, started: float) -> str | None:
        """Why a candidate's screen stops early, or None: after DROP_AFTER_FOLDS folds its mean
        score on them is worse than the leading candidate's on the very same folds by more than
        DROP_MARGIN (absolute; relative for error metrics), or worse at all while its remaining
        folds would take more than SLOW_DROP_SHARE of the search budget (successive halving's
        idea: the time goes to the candidates that are ahead)."""
        done = len(trial.check_scores)
        if done < DROP_AFTER_FOLDS or None in trial.check_scores:
            return None
        key = self._rows.effective_cap(cap)
        metric = self._check_metric
        # The screened candidates and this one's other target scale (a log scale far behind the
        # target's own, or the other way round, is not worth its folds either).
        leaders = [t for other in [*self._runs, run] for t in other.trials
                   if t.complete and t.check_scores and self._rows.effective_cap(row_cap(other.name, t.params)) == key]
        if not leaders:
            return None
        mean = float(np.mean(trial.check_scores))
        leader_means = [(float(np.mean(t.check_scores[:done])), t) for t in leaders if None not in t.check_scores[:done]]
        if not leader_means:
            return None
        lower = metric in LOWER_IS_BETTER
        pick = min if lower else max
        best_mean, best = pick(leader_means, key=lambda pair: pair[0])
        gap = (mean - best_mean) / max(abs(best_mean), 1e-12) if lower else best_mean - mean
        owner = next(other for other in [*self._runs, run] if any(t is best for t in other.trials))
        leader = f"{owner.name} on the {best.scale} scale" if owner is run else owner.name
        behind = f"{metric} {mean:.4f} there, against {best_mean:.4f} for {leader} on the same folds"
        if gap > DROP_MARGIN:
            return f"dropped after {done} of {trial.folds} folds: {behind}"
        remaining = (self.clock() - started) / done * (trial.folds - done)
        if gap > 0 and remaining > SLOW_DROP_SHARE * self._search_budget:
            return (f"dropped after {done} of {trial.folds} folds: behind and slow ({behind}; its other folds "
                    f"would take about {remaining:.1f} s, the search budget is {self._search_budget:.1f} s)")
        return None

    def _predictions(self, model: Any, x: Any) -> np.ndarray:
        """A fold model's answer on validation rows: probabilities over all the classes (a class
        missing from the fold's fitting rows gets 0), or values."""
        if self.task != "classification":
            return np.asarray(model.predict(x), dtype="float64").reshape(-1)
        probabilities = model.predict_proba(x)
        fitted = [str(c) for c in model.classes_]
        if fitted == self._classes:
            return probabilities
        aligned = np.zeros((probabilities.shape[0], len(self._classes)))
        aligned[:, [self._classes.index(c) for c in fitted]] = probabilities
        return aligned

    def _tune_thresholds(self) -> None:
        """3. Each candidate's decision threshold on its best setting's out-of-fold probabilities."""
        for run in self._runs:
            best = run.best(self.metric_)
            self._tune(best, self._rows.for_cap(row_cap(run.name, best.params)).cv_y)

    def _tune(self, trial: Trial, y: pd.Series) -> None:
        """The decision rule a metric that counts every class alike calls for: a binary target's
        threshold, or for more classes weights by inverse class share, where they score better
        out of fold."""
        if self.task != "classification" or trial.oof is None:
            return
        tuned = tune_threshold(trial.oof, self.metric_, y, self._classes)
        if tuned is not None:
            trial.threshold = tuned[0]
            trial.tuned_fold_scores = fold_scores(trial.oof, self.metric_, y, self._classes, trial.threshold)
            return
        weighted = tune_class_weights(trial.oof, self.metric_, y, self._classes)
        if weighted is not None:
            trial.class_weights = weighted[0]
            trial.tuned_fold_scores = fold_scores(trial.oof, self.metric_, y, self._classes, weights=trial.class_weights)

    def _refit(self) -> list[Candidate]:
        """4. Each candidate's best setting refitted on the training rows, in screening order."""
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
            candidate.base = candidate.pipeline
            candidate.pipeline = self._served(candidate.base, candidate.chosen, row_set.fit_x, row_set.fit_y)
            fitted.append(candidate)
        return fitted

    def _served(self, model: Any, trial: Trial, x: pd.DataFrame, y: pd.Series) -> Any:
        """The model as it is served: with its tuned threshold when that is not the default rule,
        or its class weights."""
        if trial.class_weights is not None:
            return reweighted(model, trial.class_weights)
        if trial.threshold is None or trial.threshold == 0.5:
            return model
        return thresholded(model, trial.threshold, x, y)

    def _candidate(self, run: CandidateRun) -> Candidate:
        """The unfitted candidate of a run's best setting, with the notes the card shows."""
        best = run.best(self.metric_)
        cap = row_cap(run.name, best.params)
        tried = [t.params for t in run.trials]
        candidate = Candidate(
            run.name, on_scale(run.definition.pipeline(best.params), best.scale), notes=list(run.notes),
            params=best.params, cv_score=best.score, rank_score=best.rank_score(self.metric_), trials=run.trials,
            untried=[s for s in run.settings if s not in tried], chosen=best,
            one_class=single_class(best.oof, self._classes or None, best.threshold, best.class_weights) if best.oof else False,
            classes=self._classes,
        )
        if candidate.untried or any(t.interrupted for t in run.trials):
            candidate.search_stopped = self.search_stopped_
        for trial in run.trials:
            if trial.error and not trial.interrupted:
                candidate.notes.append(f"setting {trial.params} failed in cross-validation: {trial.error}")
        if best.threshold is not None or best.class_weights is not None:
            candidate.notes.append(self._threshold_note(best))
        train_rows, cv_rows = len(self._rows.x), len(self._rows.cv_x)
        if cv_rows < train_rows and (cap is None or cap >= cv_rows):
            sample = "a stratified sample" if self.task == "classification" else "a sample"
            candidate.notes.append(f"cross-validated on {sample} of {cv_rows} of {train_rows} training rows")
        if run.name == "svm":
            note = svm_variant_note(self.task, best.params, train_rows, len(self._rows.for_cap(cap).fit_x))
            if note:
                candidate.notes.append(note)
        return candidate

    def _threshold_note(self, trial: Trial) -> str:
        default = float(np.mean([s for s in trial.fold_scores if s is not None]))
        if trial.class_weights is not None:
            return (f"answers the class whose probability divided by its share of the training rows is largest: "
                    f"{self.metric_} {trial.score:.4f} out of fold, {default:.4f} for the most probable class")
        if trial.threshold == 0.5:
            return f"decision threshold 0.5 kept: no other threshold scored better out of fold ({self.metric_} {default:.4f})"
        return (f"decision threshold {trial.threshold:.4f} for '{self._classes[1]}' tuned on out-of-fold probabilities: "
                f"{self.metric_} {trial.score:.4f} out of fold, {default:.4f} at 0.5")

    def _ensemble(self, fitted: list[Candidate]) -> Candidate | None:
        """5. The weighted average of the candidates ensemble selection chooses, when it ranks
        above every single candidate. Only candidates cross-validated on the same rows (not the
        sampled exact-kernel SVM) can be averaged out of fold."""
        shared = self._rows.for_cap(None)
        pool = [c for c in fitted if c.chosen.oof is not None and self._rows.effective_cap(row_cap(c.name, c.params)) is None]
        if len(pool) < 2:
            return None
        classes = self._classes or None
        best_single = min(pool, key=lambda c: (c.one_class, self._sign * c.rank_score))
        weights = select_ensemble({c.name: c.chosen.oof for c in pool}, self.metric_, shared.cv_y, classes, best_single.name)
        record: dict[str, Any] = {"method": "ensemble selection (Caruana et al.) on out-of-fold predictions, "
                                            "soft voting / averaging", "weights": weights, "chosen": False}
        self.ensemble_ = record
        if len(weights) < 2:
            record["reason"] = f"no candidate improved {best_single.name} out of fold"
            return None
        members = [c for c in pool if c.name in weights]
        blended = blend([c.chosen.oof for c in members], [weights[c.name] for c in members])
        trial = Trial({"members": weights}, rows=len(shared.cv_x), folds=len(shared.splits), oof=blended,
                      rank_metric=self.metric_,
                      fold_scores=fold_scores(blended, self.metric_, shared.cv_y, classes))
        self._tune(trial, shared.cv_y)
        score = trial.rank_score(self.metric_)
        record.update(cv_score=_rounded(trial.score), rank_score=_rounded(score),
                      best_single={"name": best_single.name, "rank_score": _rounded(best_single.rank_score)})
        if score is None or not better(self.metric_, score, best_single.rank_score):
            record["reason"] = f"it did not rank above {best_single.name}"
            return None
        record["chosen"] = True
        model = ensemble_model(self.task, [(c.name, c.base) for c in members], [weights[c.name] for c in members],
                               self._classes)
        served = self._served(model, trial, shared.fit_x, shared.fit_y)
        shown = ", ".join(f"{name} x{weight}" for name, weight in weights.items())
        notes = [f"{'soft voting' if classes else 'averaging'} of {shown}, chosen by ensemble selection on "
                 "out-of-fold predictions"]
        if trial.threshold is not None or trial.class_weights is not None:
            notes.append(self._threshold_note(trial))
        return Candidate(
            "ensemble", served, notes=notes, params={"members": weights}, cv_score=trial.score, rank_score=score,
            chosen=trial, base=model, members=weights,
            one_class=single_class(blended, classes, trial.threshold, trial.class_weights), classes=self._classes,
        )
