"""The human report of a model version: `models/<model>/versions/<n>/report.html`.

One self-contained HTML file (inline CSS, plots as SVG data URIs, no JavaScript, no external
URL) that a person can read without the platform: what was trained on what, how the data
looked, how every candidate did, how the chosen one errs, which columns matter, whether the ONNX
model agrees with sklearn, and with which libraries.

This module turns the typed card (contracts/card.py) and the analysis (analysis.py) into the
tables and figures (plots.py) that templates/report.html.j2 lays out. The template autoescapes
every value, so a column name, value, class label or file name is always text, never markup.
Runs in the train step only (sklearn, pandas, matplotlib); the predict function never loads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import metadata as importlib_metadata
from typing import Any

import jinja2
import pandas as pd
from threadpoolctl import threadpool_limits

from bucketml.contracts.card import Candidate, ColumnProfile, ModelCard, SchemaColumn, SummaryStyle, scalar_metrics
from bucketml.contracts.spec import LOWER_IS_BETTER
from bucketml.timestamps import utc_now
from bucketml.training import plots
from bucketml.training.analysis import (
    ClassificationEvaluation,
    Importance,
    RegressionEvaluation,
    evaluate_classification,
    evaluate_regression,
    feature_importance,
)

__all__ = ["render_report"]

MAX_HEATMAP_LABELS = 30  # classes in the confusion matrix (and class plot) before it becomes a table only
TOP_FEATURES = 20

SECTIONS = [
    ("profile", "Data"),
    ("candidates", "Candidates"),
    ("evaluation", "Evaluation"),
    ("importance", "Feature importance"),
    ("parity", "ONNX parity"),
    ("libraries", "Libraries"),
]


# --- how numbers read ------------------------------------------------------------------------------


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def share(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


# The profile's column summaries as the report shows them (`bucketml profile` has its own style).
SUMMARY = SummaryStyle(number=number, shorten=plots.shorten, top=5, more=", …", through=" … ", quartiles=False)


# --- what the template lays out -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of text cells (the template escapes them); `numeric` column indexes are right-aligned."""

    headers: list[str]
    rows: list[list[Any]]
    numeric: frozenset[int] = frozenset()
    row_classes: list[str] | None = None  # a CSS class per row ("chosen"), or none


def table(
    headers: list[str], rows: Iterable[list[Any]], numeric: Iterable[int] = (), row_classes: list[str] | None = None
) -> Table:
    return Table(headers, list(rows), frozenset(numeric), row_classes)


@dataclasses.dataclass(frozen=True)
class CandidateView:
    cross_validated: bool
    direction: str  # "lower" or "higher" is better
    table: Table | None
    plot: str | None  # scores and times, an SVG data URI
    score_kind: str
    not_compared: Table | None


@dataclasses.dataclass(frozen=True)
class ClassificationView:
    evaluation: ClassificationEvaluation
    matrix_plot: str | None  # None when there are too many classes to draw
    per_class: Table
    curves_plot: str | None


@dataclasses.dataclass(frozen=True)
class RegressionView:
    evaluation: RegressionEvaluation
    scatter_plot: str
    histogram_plot: str
    errors: Table
    sample_size: int


@dataclasses.dataclass(frozen=True)
class ImportanceView:
    importance: Importance
    shown: int
    total: int
    plot: str | None
    table: Table | None


# --- entry point ---------------------------------------------------------------------------------------


def render_report(
    card: ModelCard,
    pipeline: Any,
    x_test: pd.DataFrame,
    y_test: pd.Series,
    *,
    model: str | None = None,
    version: int | None = None,
    created: str | None = None,
) -> bytes:
    """report.html (UTF-8) for the version described by `card`, whose sklearn `pipeline` was
    chosen, evaluated on the held-out split (`x_test`, `y_test`) as training loaded it.

    `model`, `version` and `created` default to the card's (the registry adds them to the
    card after the report is written, so the trainer passes them).
    """
    # One OpenMP thread for the model's predictions, as in training (spinning threads on a busy
    # CPU made HistGradientBoosting's predict many times slower).
    with plots.drawing(), threadpool_limits(limits=1, user_api="openmp"):
        context = {
            "card": card,
            "model": model if model is not None else (card.model or "?"),
            "version": version if version is not None else (card.version if card.version is not None else "?"),
            "created": created or card.created or utc_now("seconds"),
            "sections": SECTIONS,
            "metrics": table(["metric", "value"], [[k, number(v)] for k, v in scalar_metrics(card.metrics).items()],
                             numeric=[1]),
            "profile": _profile(card),
            "candidates": _candidates(card),
            "classification": _classification(pipeline, x_test, y_test) if card.task == "classification" else None,
            "regression": _regression(pipeline, x_test, y_test) if card.task != "classification" else None,
            "test_rows": len(x_test),
            "importance": _importance(card, pipeline, x_test, y_test),
            "parity_other": {k: json.dumps(v) if isinstance(v, (dict, list)) else number(v)
                             for k, v in (card.parity.other_facts() if card.parity else {}).items()},
            "libraries": _libraries(card),
            "spec": table(["setting", "value"], [[k, v if isinstance(v, str) else json.dumps(v)]
                                                 for k, v in (card.spec or {}).items()]) if card.spec else None,
            "generated": utc_now("seconds"),
        }
    return _template().render(context).encode("utf-8")


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("bucketml.training", "templates"),
        autoescape=True,  # every value is text unless the template says otherwise
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render, not the reader
        finalize=lambda value: "" if value is None else value,  # a missing fact is blank, not "None"
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(num=number, share=share, summary=lambda column: column.summary(SUMMARY))
    return environment.get_template("report.html.j2")


# --- sections --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProfileView:
    columns: Table | None  # the profile's columns, or None for cards made before profiles
    schema_columns: Table
    dropped: Table | None
    warnings: list[str]
    notes: list[str]
    target: ColumnProfile | None
    classes: Table | None
    class_plot: str | None
    classes_shown: int
    classes_total: int
    target_stats: Table | None


def _profile(card: ModelCard) -> ProfileView:
    profile, data = card.profile, card.data
    columns = None
    if profile is not None and profile.columns:
        columns = table(["column", "type", "missing", "distinct", "summary"],
                        [[c.name, c.type, share(c.missing_share), c.distinct if c.distinct is not None else "",
                          c.summary(SUMMARY)] for c in profile.columns], numeric=[2, 3])
    schema_columns = table(["column", "type"], [[c.name, c.type] for c in card.schema_columns])
    dropped_list = (profile.dropped if profile is not None and profile.dropped else None) or (data.dropped if data else [])
    dropped = table(["column", "kind", "why"], [[d.column, d.kind or "", d.reason] for d in dropped_list]) if dropped_list else None
    warnings = (profile.warnings if profile is not None and profile.warnings else None) or (data.warnings if data else [])
    notes = (profile.notes if profile is not None and profile.notes else None) or (data.notes if data else [])
    target = profile.target if profile is not None else None
    classes = class_plot = target_stats = None
    shown = ordered = []
    if target is not None and target.classes:
        total = sum(target.classes.values()) or 1
        ordered = sorted(target.classes.items(), key=lambda item: -item[1])
        classes = table(["class", "rows", "share"], [[k, v, share(v / total)] for k, v in ordered], numeric=[1, 2])
        shown = ordered[:MAX_HEATMAP_LABELS]
        class_plot = plots.class_distribution(shown)
    elif target is not None:
        target_stats = table(["distinct", "min", "p25", "median", "mean", "p75", "max", "std"],
                             [[target.distinct if target.distinct is not None else "",
                               *(number(getattr(target, k)) for k in ("min", "p25", "p50", "mean", "p75", "max", "std"))]],
                             numeric=range(8))
    return ProfileView(columns, schema_columns, dropped, warnings, notes, target, classes, class_plot, len(shown),
                       len(ordered), target_stats)


def _candidate_score(candidate: Candidate, metric: str) -> float | None:
    """What ranked the candidate: its cross-validation score when the card has one (selection
    on the training rows), else its held-out score."""
    value = candidate.cv_score if candidate.cross_validated else candidate.metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _candidates(card: ModelCard) -> CandidateView:
    metric, candidates = card.metric, card.candidates
    cross_validated = any(c.cross_validated for c in candidates)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    score_kind = "cross-validation on the training rows" if cross_validated else "held-out rows"
    comparison = plot = None
    if candidates:
        names: list[str] = []
        for c in candidates:
            names.extend(k for k in c.scalar_metrics if k not in names)
        names.sort(key=lambda k: k != metric)  # the chosen metric first
        timed = any("search_seconds" in c.model_fields_set for c in candidates)
        headers = ["candidate", ""]
        if cross_validated:
            headers += [f"CV {metric}", "settings"]
        headers += [f"held-out {k}" if cross_validated else k for k in names]
        headers += ["search + fit seconds" if timed else "fit seconds", "notes"]
        rows, classes = [], []
        for c in candidates:
            passed_over = [f.reason for f in card.candidate_failures if f.name == c.name and f.reason is not None]
            notes = list(c.notes) + [f"not exported: {p}" for p in passed_over]
            if c.search_stopped:
                notes.append(c.search_stopped)
            state = "chosen" if c.name == card.algorithm else ""
            row: list[Any] = [c.name, state]
            if cross_validated:
                cv, spread = c.cv_score, c.cv_std
                row += [number(cv) + (f" ± {number(spread)}" if cv is not None and spread is not None else ""),
                        ", ".join(f"{k}={v}" for k, v in c.params.items())]
            row += [number(c.scalar_metrics.get(k)) for k in names]
            row += [number(c.seconds, 3), "; ".join(notes)]
            rows.append(row)
            classes.append(state)
        first_number = 2 + (2 if cross_validated else 0)
        numeric = ([2] if cross_validated else []) + list(range(first_number, first_number + len(names) + 1))
        comparison = table(headers, rows, numeric=numeric, row_classes=classes)
        scored = [c for c in candidates if _candidate_score(c, metric) is not None]
        if scored:
            plot = plots.candidate_scores(
                [c.name for c in scored], [_candidate_score(c, metric) for c in scored], [c.seconds for c in scored],
                [c.name == card.algorithm for c in scored], f"{metric} ({score_kind})",
                "search and fit time" if timed else "fit time")
    fitted = {c.name for c in candidates}
    not_fitted = [f for f in card.candidate_failures if f.name not in fitted]
    not_compared = None
    if not_fitted or card.skipped:
        not_compared = table(["candidate", "", "why"], [[f.name, "failed", f.why] for f in not_fitted]
                             + [[s.name, "skipped", s.reason] for s in card.skipped])
    return CandidateView(cross_validated, direction, comparison, plot, score_kind, not_compared)


def _classification(pipeline: Any, x: pd.DataFrame, y: pd.Series) -> ClassificationView:
    evaluation = evaluate_classification(pipeline, x, y)
    matrix_plot = plots.confusion_matrix(evaluation) if len(evaluation.classes) <= MAX_HEATMAP_LABELS else None
    per_class = table(["class", "test rows", "precision", "recall", "f1"],
                      [[s.label, s.support, number(s.precision), number(s.recall), number(s.f1)]
                       for s in evaluation.per_class], numeric=[1, 2, 3, 4])
    curves_plot = plots.roc_and_precision_recall(evaluation) if evaluation.curves else None
    return ClassificationView(evaluation, matrix_plot, per_class, curves_plot)


def _regression(pipeline: Any, x: pd.DataFrame, y: pd.Series) -> RegressionView:
    evaluation = evaluate_regression(pipeline, x, y)
    residual = evaluation.residual
    errors = table(["rows", "mean error", "mean absolute error", "largest absolute error"],
                   [[len(residual), number(float(residual.mean())), number(float(abs(residual).mean())),
                     number(float(abs(residual).max()))]], numeric=range(4))
    return RegressionView(evaluation, plots.predicted_and_residuals(evaluation), plots.residual_histogram(evaluation),
                          errors, len(evaluation.sample))


def _importance(card: ModelCard, pipeline: Any, x: pd.DataFrame, y: pd.Series) -> ImportanceView:
    columns: Sequence[SchemaColumn] = card.schema_columns or [SchemaColumn(name=c, type="number") for c in x.columns]
    importance = feature_importance(pipeline, card.task, columns, x, y)
    ranked = importance.ranked()
    shown = ranked[:TOP_FEATURES]
    if not shown:
        return ImportanceView(importance, 0, len(ranked), None, None)
    spreads = importance.spreads
    rows = [[k, number(v)] + ([number(spreads.get(k))] if spreads else []) for k, v in ranked]
    return ImportanceView(importance, len(shown), len(ranked), plots.importance_bars(shown, spreads),
                          table(["column", "importance"] + (["±"] if spreads else []), rows, numeric=[1, 2]))


def _libraries(card: ModelCard) -> Table:
    libraries = dict(card.libraries)
    libraries.setdefault("matplotlib (this report)", importlib_metadata.version("matplotlib"))
    return table(["library", "version"], [[k, v] for k, v in libraries.items()])
