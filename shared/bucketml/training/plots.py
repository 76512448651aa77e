"""The figures of report.html, drawn by matplotlib's SVG backend.

Each figure becomes a `data:image/svg+xml;base64,...` URI for an <img>: the report stays one
self-contained file, and the SVG is used exactly as matplotlib wrote it. An SVG shown as an
image is a document of its own, so its ids cannot clash with the page's or another figure's,
and a browser runs no script and loads nothing from inside it.

matplotlib is imported here and in no other module (the predict function never loads it).
Figures use the object API (`Figure`, no pyplot), so no global backend or figure state is
touched in a long-running train process; rc settings apply only inside `drawing()`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from bucketml.training.analysis import ClassificationEvaluation, RegressionEvaluation

LABEL_CHARS = 24  # class and column names are shortened to this in plots (tables show them whole)
CHOSEN_COLOR = "#1f6feb"
OTHER_COLOR = "#9aa7b4"
GUESS_COLOR = "#8c959f"
AXIS_COLOR = "#59636e"

RC = {
    "svg.fonttype": "none",  # text stays text: small, selectable, escaped by matplotlib's XML writer
    "svg.hashsalt": "bucketml",  # the same ids on every run, so the same model draws the same file
    "text.parse_math": False,  # '$' in a column name is not math
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}

_DRAWING = threading.Lock()


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """The report's rc settings, one report at a time: rcParams are global to the process and
    the train function handles deliveries in threads."""
    with _DRAWING, matplotlib.rc_context(RC):
        yield


def shorten(text: Any, chars: int = LABEL_CHARS) -> str:
    text = str(text)
    return text if len(text) <= chars else text[: chars - 1] + "…"


def svg_uri(fig: Figure) -> str:
    """The figure as an SVG data URI. No date in the metadata, so the file depends only on
    what is drawn."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _new(width: float, height: float, cols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols)


def class_distribution(counts: Sequence[tuple[str, int]]) -> str:
    """Horizontal bars of rows per class, largest on top."""
    fig, ax = _new(7.5, max(1.6, 0.28 * len(counts) + 0.8))
    ax.barh([shorten(k) for k, _ in counts][::-1], [v for _, v in counts][::-1], color=CHOSEN_COLOR)
    ax.set_xlabel("rows")
    ax.grid(axis="y", visible=False)
    return svg_uri(fig)


def candidate_scores(
    labels: Sequence[str], scores: Sequence[float], seconds: Sequence[float], chosen: Sequence[bool], score_label: str,
    time_title: str,
) -> str:
    """Score (left) and time (right) of every candidate; the chosen one in blue."""
    fig, (left, right) = _new(9.5, max(1.8, 0.45 * len(labels) + 1.0), cols=2)
    names = [shorten(name) for name in labels][::-1]
    colors = [CHOSEN_COLOR if is_chosen else OTHER_COLOR for is_chosen in chosen][::-1]
    values = list(scores)[::-1]
    left.barh(names, values, color=colors)
    left.set_xlabel(score_label)
    left.set_title("score")
    for y, v in enumerate(values):
        left.text(v, y, f" {v:.4g}", va="center", fontsize=8)
    right.barh(names, list(seconds)[::-1], color=colors)
    right.set_xlabel("seconds")
    right.set_title(time_title)
    right.set_yticklabels([])
    for ax in (left, right):
        ax.grid(axis="y", visible=False)
        ax.margins(x=0.18)
    return svg_uri(fig)


def confusion_matrix(evaluation: ClassificationEvaluation, numbers_up_to: int = 15) -> str:
    """A heatmap of actual (rows) against predicted (columns) classes, counts written in the
    cells when there are few classes."""
    classes, matrix = evaluation.classes, evaluation.matrix
    n = len(classes)
    size = min(9.0, max(3.8, 0.45 * n + 2.4))
    fig, ax = _new(size + 1.0, size)
    edges = np.arange(n + 1) - 0.5
    cells = ax.pcolormesh(edges, edges, matrix, cmap="Blues", edgecolors="white", linewidth=0.5)  # vector cells
    ax.set(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5), aspect="equal")
    fig.colorbar(cells, ax=ax, shrink=0.8, label="rows")
    ax.grid(False)
    ax.set_xticks(range(n), [shorten(c) for c in classes], rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), [shorten(c) for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    if n <= numbers_up_to:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > threshold else "#1f2328")
    return svg_uri(fig)


def roc_and_precision_recall(evaluation: ClassificationEvaluation) -> str:
    """ROC (left) and precision-recall (right) curves, one per class shown; dashed: guessing."""
    fig, (roc_ax, pr_ax) = _new(10.0, 4.4, cols=2)
    for curve in evaluation.curves:
        roc_ax.plot(curve.fpr, curve.tpr, lw=1.6, label=f"{shorten(curve.label, 18)} (AUC {curve.auc:.3f})")
        pr_ax.step(curve.recall, curve.precision, where="post", lw=1.6,
                   label=f"{shorten(curve.label, 18)} (AP {curve.average_precision:.3f})")
    roc_ax.plot([0, 1], [0, 1], ls="--", color=GUESS_COLOR, lw=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision–recall", xlim=(-0.02, 1.02), ylim=(-0.02, 1.05))
    if evaluation.positive_rate is not None:
        pr_ax.axhline(evaluation.positive_rate, ls="--", color=GUESS_COLOR, lw=1)
    roc_ax.legend(loc="lower right", fontsize=7.5)
    pr_ax.legend(loc="lower left", fontsize=7.5)
    return svg_uri(fig)


def predicted_and_residuals(evaluation: RegressionEvaluation) -> str:
    """Predicted against actual (left) and the error against the prediction (right)."""
    actual, predicted, sample = evaluation.actual, evaluation.predicted, evaluation.sample
    residual = evaluation.residual
    fig, (left, right) = _new(10.0, 4.4, cols=2)
    left.scatter(actual[sample], predicted[sample], s=12, alpha=0.6, color=CHOSEN_COLOR, edgecolors="none")
    finite = np.concatenate([actual[np.isfinite(actual)], predicted[np.isfinite(predicted)]])
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        left.plot([low, high], [low, high], ls="--", color=GUESS_COLOR, lw=1)
    left.set(xlabel="actual", ylabel="predicted", title="predicted vs actual")
    right.scatter(predicted[sample], residual[sample], s=12, alpha=0.6, color=CHOSEN_COLOR, edgecolors="none")
    right.axhline(0, ls="--", color=GUESS_COLOR, lw=1)
    right.set(xlabel="predicted", ylabel="actual − predicted", title="residuals")
    return svg_uri(fig)


def residual_histogram(evaluation: RegressionEvaluation) -> str:
    residual = evaluation.residual
    fig, ax = _new(6.0, 3.0)
    ax.hist(residual[np.isfinite(residual)], bins=min(40, max(5, len(residual) // 5)), color=CHOSEN_COLOR)
    ax.set(xlabel="actual − predicted", ylabel="rows", title="distribution of the errors")
    return svg_uri(fig)


def importance_bars(ranked: Sequence[tuple[str, float]], spreads: dict[str, float]) -> str:
    """Importance per input column, most important on top, ± the spread when there is one."""
    fig, ax = _new(8.0, max(1.8, 0.3 * len(ranked) + 0.9))
    labels = [shorten(k, 32) for k, _ in ranked][::-1]
    heights = [v for _, v in ranked][::-1]
    errors = [spreads.get(k, 0.0) for k, _ in ranked][::-1] if spreads else None
    ax.barh(labels, heights, xerr=errors, color=CHOSEN_COLOR, ecolor=AXIS_COLOR, capsize=2)
    ax.axvline(0, color=AXIS_COLOR, lw=0.8)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("importance")
    return svg_uri(fig)
