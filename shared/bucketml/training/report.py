"""The human report of a model version: `models/<model>/versions/<n>/report.html`.

One self-contained HTML file (inline CSS, inline SVG plots, no JavaScript, no external URL)
that a person can read without the platform: what was trained on what, how the data looked,
how every candidate did, how the chosen one errs, which columns matter, whether the ONNX model
agrees with sklearn, and with which libraries.

Runs in the train step only: it needs sklearn, pandas and matplotlib, and matplotlib is
imported nowhere else (the predict function never imports this module). Plots use
matplotlib's object API (`Figure` + the SVG canvas, no pyplot), so no global backend or
figure state is touched in a long-running train process, and every rc setting is scoped
with `rc_context`.

Every string that comes from a user (column names, values, class labels, file names) is
escaped with `html.escape` here; inside the SVGs matplotlib's XML writer escapes text, and
math text is switched off so a `$` in a name is just a dollar sign.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import io
import json
import math
import re
import threading
import time
from collections.abc import Iterable
from importlib import metadata as importlib_metadata
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from bucketml.serving.runtime import datetime_input
from bucketml.contracts.spec import LOWER_IS_BETTER

MAX_POINTS = 1000  # scatter points per plot (a sample above this keeps the SVG small)
MAX_CURVE_POINTS = 400  # points per ROC / precision-recall curve
MAX_CURVES = 10  # classes drawn one-vs-rest (those with the most test rows)
MAX_HEATMAP_LABELS = 30  # classes in the confusion matrix before it becomes a table note
TOP_FEATURES = 20
PERMUTATION_ROWS = 500  # test rows used for permutation importance
PERMUTATION_REPEATS = 3
PERMUTATION_BUDGET_SECONDS = 10.0  # fewer repeats (at least one) when predicting is slow
LABEL_CHARS = 24  # class and column names are shortened to this in plots (tables show them whole)

_RENDERING = threading.Lock()

CHOSEN_COLOR = "#1f6feb"
OTHER_COLOR = "#9aa7b4"

RC = {
    "svg.fonttype": "none",  # text stays text: small, selectable, escaped by the XML writer
    "svg.hashsalt": "bucketml",  # deterministic ids (made unique per figure in `_svg`)
    "text.parse_math": False,  # '$' in a column name is not math
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
 margin:0;background:#f6f8fa}
main{max-width:1100px;margin:0 auto;padding:24px 32px 48px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 10px;padding-bottom:4px;border-bottom:1px solid #d0d7de}
h3{font-size:16px;margin:22px 0 8px}
.sub{color:#59636e;margin:0 0 16px}
nav{margin:8px 0 16px;font-size:13px}nav a{margin-right:14px;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.facts th{width:190px}
tr.chosen td{background:#ddf4ff;font-weight:600}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}.info{background:#ddf4ff;color:#0550ae}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;border-radius:6px;margin:6px 0}
.note{color:#59636e;font-size:13px}
figure{margin:10px 0 18px}figure svg{max-width:100%;height:auto;display:block}
figcaption{color:#59636e;font-size:13px;margin-top:2px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:16px}
code{background:#f6f8fa;padding:0 4px;border-radius:4px;font-size:12.5px}
footer{margin-top:40px;color:#59636e;font-size:12px}
"""


# --- entry point -------------------------------------------------------------------------------


def render_report(
    card: dict[str, Any],
    pipeline,
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
    model = model if model is not None else card.get("model", "?")
    version = version if version is not None else card.get("version", "?")
    created = created or card.get("created") or _now()
    report = _Report()
    nav = "".join(f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text in SECTIONS)
    # rcParams are global to the process: one report at a time (the train function runs threads).
    # One OpenMP thread for the model's predictions, as in training (spinning threads on a busy
    # CPU made HistGradientBoosting's predict many times slower).
    with _RENDERING, matplotlib.rc_context(RC), threadpool_limits(limits=1, user_api="openmp"):
        body = [
            _header(card, model, version, created, f"<nav>{nav}</nav>"),
            _profile_section(report, card),
            _candidates_section(report, card),
            _evaluation_section(report, card, pipeline, x_test, y_test),
            _importance_section(report, card, pipeline, x_test, y_test),
            _parity_section(card),
            _libraries_section(card),
        ]
    title = f"{model} v{version} — bucketml report"
    document = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n"
        "<body><main>\n" + "\n".join(body) +
        f"\n<footer>Generated by bucketml at {_e(_now())}. This file is self-contained: "
        "every plot is inline SVG; it loads nothing and runs no script.</footer>\n"
        "</main></body></html>\n"
    )
    return document.encode("utf-8")


SECTIONS = [
    ("profile", "Data"),
    ("candidates", "Candidates"),
    ("evaluation", "Evaluation"),
    ("importance", "Feature importance"),
    ("parity", "ONNX parity"),
    ("libraries", "Libraries"),
]


# --- helpers -----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Escaped text for HTML content and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _num(value: Any, digits: int = 4) -> str:
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


def _share(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


def _short(text: Any, chars: int = LABEL_CHARS) -> str:
    text = str(text)
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _table(headers: list[str], rows: Iterable[list[Any]], numeric: Iterable[int] = (), row_classes=None, css: str = "") -> str:
    """A table of escaped cells; `numeric` column indexes are right-aligned."""
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    lines = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="n">{_e(c)}</td>' if j in numeric else f"<td>{_e(c)}</td>" for j, c in enumerate(row))
        klass = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        lines.append(f"<tr{klass}>{cells}</tr>")
    klass = f' class="{css}"' if css else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _facts(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)  # values are escaped by callers
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def _scalar_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The metrics that are single numbers (a confusion matrix or per-class lists are not)."""
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Report:
    """Figure numbering, so ids inside the inline SVGs are unique in the document."""

    def __init__(self) -> None:
        self.figures = 0

    def figure(self, fig: Figure, caption: str, alt: str) -> str:
        self.figures += 1
        svg = _svg(fig, f"f{self.figures}-", alt)
        return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


_TAG = re.compile(r"(<[^>]*>)")
_ID = re.compile(r'\bid="([^"]+)"')
_REF = re.compile(r'(href="#|url\(#)([^")]+)')


def _svg(fig: Figure, prefix: str, alt: str) -> str:
    """The figure as an inline <svg> element: no XML prolog, no metadata (it names URLs), no
    namespace declarations (the HTML parser knows SVG), ids made unique with `prefix`, and
    an accessible title."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue().decode("utf-8")
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)
    parts = _TAG.split(text)
    for i in range(1, len(parts), 2):  # tags only: text content is left as matplotlib escaped it
        tag = parts[i]
        if i == 1:  # the <svg ...> element itself
            tag = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", tag)
            tag = tag.replace("<svg", f'<svg role="img" aria-label="{_e(alt)}"', 1)
        tag = _ID.sub(lambda m: f'id="{prefix}{m.group(1)}"', tag)
        parts[i] = _REF.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}", tag)
    return "".join(parts).strip()


def _new_figure(width: float, height: float, cols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols)


# --- header ----------------------------------------------------------------------------------


def _header(card: dict[str, Any], model: str, version: Any, created: str, nav: str) -> str:
    metric = card.get("metric")
    metrics = card.get("metrics") or {}
    lineage = card.get("lineage") or {}
    upload = lineage.get("upload") or {}
    promotion = card.get("promotion") or {}
    score = metrics.get(metric)
    facts = [
        ("model", _e(model)),
        ("version", _e(version)),
        ("task", _e(card.get("task"))),
        ("target", f"<code>{_e(card.get('target'))}</code>"),
        ("algorithm", _e(card.get("algorithm"))),
        ("chosen by", _chosen_by(card, metric, score)),
        ("created", _e(created)),
        ("upload", f"<code>{_e(upload.get('name'))}</code> in bucket <code>{_e(upload.get('bucket'))}</code>"),
        ("upload generation / MD5", f"{_e(upload.get('generation'))} / <code>{_e(upload.get('md5Hash'))}</code>"),
        ("prepared data", f"<code>{_e(lineage.get('prepared'))}</code>"),
    ]
    if card.get("training_seconds") is not None:
        facts.append(("training time", _e(f"{card['training_seconds']:.2f} s (all candidates, export and parity check)")))
    if promotion:
        state = "became current" if promotion.get("promoted") else "not made current"
        facts.append(("promotion", f"{_e(state)} — {_e(promotion.get('reason'))} (policy {_e(promotion.get('policy'))})"))
    scalars = _scalar_metrics(metrics)
    metric_table = _table(["metric", "value"], [[k, _num(v)] for k, v in scalars.items()], numeric=[1])
    warnings = (card.get("data") or {}).get("warnings") or []
    alert = "".join(f'<div class="warn">⚠ {_e(w)}</div>' for w in warnings)
    return (
        f"<h1>{_e(model)} <span class=\"note\">version {_e(version)}</span></h1>"
        f'<p class="sub">{_e(card.get("task"))} of <code>{_e(card.get("target"))}</code> by '
        f"{_e(card.get('algorithm'))}: {_e(metric)} = <b>{_e(_num(score))}</b> on the held-out rows</p>"
        f"{nav}{alert}{_facts(facts)}<h3>Metrics of this version (held-out rows)</h3>{metric_table}"
    )


def _chosen_by(card: dict[str, Any], metric: str, score: Any) -> str:
    chosen = next((c for c in card.get("candidates") or [] if c.get("name") == card.get("algorithm")), {})
    held_out = f"held-out rows: <b>{_e(_num(score))}</b>"
    if "cv_score" in chosen:
        return (f"{_e(metric)}, cross-validated on the training rows: <b>{_e(_num(_number(chosen.get('cv_score'))))}</b>"
                f"; on the {held_out}")
    return f"{_e(metric)} on the {held_out}"


# --- data profile ----------------------------------------------------------------------------


def _column_summary(col: dict[str, Any]) -> str:
    if col.get("type") == "datetime":
        text = f"{col.get('min')} … {col.get('max')}; parts {', '.join(col.get('parts') or [])}"
        return text + (f"; {col['unparsed']} not dates" if col.get("unparsed") else "")
    if "mean" in col:
        return (f"min {_num(col.get('min'))}, max {_num(col.get('max'))}, mean {_num(col.get('mean'))}, "
                f"std {_num(col.get('std'))}, median {_num(col.get('p50'))}")
    if col.get("top"):
        shown = ", ".join(f"{_short(t['value'])} ({t['count']})" for t in col["top"][:5])
        return shown + (", …" if len(col["top"]) > 5 else "")
    if col.get("examples"):
        return "e.g. " + ", ".join(_short(e) for e in col["examples"])
    return ""


def _profile_section(report: _Report, card: dict[str, Any]) -> str:
    profile = card.get("profile") or {}
    data = card.get("data") or {}
    out = ['<h2 id="profile">Data</h2>']
    rows = profile.get("rows") or data.get("rows") or {}
    if rows:
        out.append(f"<p>Rows: {_e(rows.get('uploaded', '?'))} uploaded, {_e(rows.get('used', rows.get('uploaded', '?')))} "
                   f"used, {_e(rows.get('train', '?'))} for training and {_e(rows.get('test', '?'))} held out for testing.</p>")
    columns = profile.get("columns")
    if columns:
        out.append("<h3>Columns</h3>")
        out.append(_table(
            ["column", "type", "missing", "distinct", "summary"],
            [[c.get("name"), c.get("type"), _share(c.get("missing_share")), c.get("distinct", ""), _column_summary(c)]
             for c in columns],
            numeric=[2, 3],
        ))
    else:
        schema_columns = (card.get("schema") or {}).get("columns") or []
        out.append('<p class="note">This version has no data profile (it was prepared before profiles existed); '
                   "the model's columns:</p>")
        out.append(_table(["column", "type"], [[c.get("name"), c.get("type")] for c in schema_columns]))
    dropped = profile.get("dropped", data.get("dropped")) or []
    if dropped:
        out.append("<h3>Dropped columns</h3>")
        out.append(_table(["column", "kind", "why"], [[d.get("column"), d.get("kind", ""), d.get("reason")] for d in dropped]))
    warnings = profile.get("warnings", data.get("warnings")) or []
    if warnings:
        out.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
    notes = profile.get("notes", data.get("notes")) or []
    if notes:
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    target = profile.get("target") or {}
    if target:
        out.append(f"<h3>Target <code>{_e(target.get('name'))}</code></h3>")
        classes = target.get("classes")
        if classes:
            total = sum(classes.values()) or 1
            ordered = sorted(classes.items(), key=lambda item: -item[1])
            out.append(_table(["class", "rows", "share"], [[k, v, _share(v / total)] for k, v in ordered], numeric=[1, 2]))
            if target.get("imbalance_ratio") is not None:
                out.append(f"<p>Largest/smallest class ratio: {_e(_num(target['imbalance_ratio'], 2))}.</p>")
            if target.get("training_only_classes"):
                out.append("<p>Used for training only (too few rows to hold any out): "
                           f"{_e(', '.join(target['training_only_classes']))}.</p>")
            shown = ordered[:MAX_HEATMAP_LABELS]
            fig, ax = _new_figure(7.5, max(1.6, 0.28 * len(shown) + 0.8))
            ax.barh([_short(k) for k, _ in shown][::-1], [v for _, v in shown][::-1], color=CHOSEN_COLOR)
            ax.set_xlabel("rows")
            ax.grid(axis="y", visible=False)
            more = f" (the {len(shown)} largest of {len(ordered)})" if len(ordered) > len(shown) else ""
            out.append(report.figure(fig, f"Rows per class{_e(more)}, over the rows used.", "class distribution"))
        else:
            out.append(_table(["distinct", "min", "p25", "median", "mean", "p75", "max", "std"],
                              [[target.get("distinct", ""), *(_num(target.get(k)) for k in
                                                               ("min", "p25", "p50", "mean", "p75", "max", "std"))]],
                              numeric=range(8)))
    return "\n".join(out)


# --- candidates ------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _candidate_score(candidate: dict[str, Any], metric: str) -> tuple[float | None, str]:
    """What ranked the candidate: its cross-validation score when the card has one (selection
    on the training rows), else its held-out score; and which of the two it is."""
    if "cv_score" in candidate:
        return _number(candidate.get("cv_score")), "cv"
    return _number((candidate.get("metrics") or {}).get(metric)), "held-out"


def _candidate_seconds(candidate: dict[str, Any]) -> float:
    return float(_number(candidate.get("search_seconds")) or 0.0) + float(_number(candidate.get("fit_seconds")) or 0.0)


def _candidates_section(report: _Report, card: dict[str, Any]) -> str:
    metric = card.get("metric")
    chosen = card.get("algorithm")
    candidates = card.get("candidates") or []
    failures = [str(f) for f in card.get("candidate_failures") or []]
    out = ['<h2 id="candidates">Candidates</h2>']
    cross_validated = any("cv_score" in c for c in candidates)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    if candidates:
        if cross_validated:
            out.append(f"<p>Candidates were ranked by <b>{_e(metric)}</b> ({direction} is better) from cross-validation "
                       "on the training rows; the best whose ONNX export agrees with sklearn was chosen. The held-out "
                       "metrics are for information: they chose nothing.</p>")
        else:
            out.append(f"<p>Every candidate was fitted on the training rows and scored on the held-out rows; the best by "
                       f"<b>{_e(metric)}</b> ({direction} is better) whose ONNX export agrees with sklearn was chosen.</p>")
        names = []
        for c in candidates:
            names.extend(k for k in _scalar_metrics(c.get("metrics")) if k not in names)
        names.sort(key=lambda k: k != metric)  # the chosen metric first
        timed = any("search_seconds" in c for c in candidates)
        headers = ["candidate", ""]
        if cross_validated:
            headers += [f"CV {metric}", "settings"]
        headers += [f"held-out {k}" if cross_validated else k for k in names]
        headers += ["search + fit seconds" if timed else "fit seconds", "notes"]
        rows, classes = [], []
        for c in candidates:
            scalars = _scalar_metrics(c.get("metrics"))
            passed_over = [f.split(": ", 1)[1] for f in failures if f.startswith(f"{c.get('name')}: ")]
            notes = list(c.get("notes") or []) + [f"not exported: {p}" for p in passed_over]
            if c.get("search_stopped"):
                notes.append(str(c["search_stopped"]))
            state = "chosen" if c.get("name") == chosen else ""
            row = [c.get("name"), state]
            if cross_validated:
                cv, spread = _number(c.get("cv_score")), _number(c.get("cv_std"))
                row += [_num(cv) + (f" ± {_num(spread)}" if cv is not None and spread is not None else ""),
                        ", ".join(f"{k}={v}" for k, v in (c.get("params") or {}).items())]
            row += [_num(scalars.get(k)) for k in names]
            row += [_num(_candidate_seconds(c), 3), "; ".join(notes)]
            rows.append(row)
            classes.append("chosen" if state else "")
        first_number = 2 + (2 if cross_validated else 0)
        numeric = ([2] if cross_validated else []) + list(range(first_number, first_number + len(names) + 1))
        out.append(_table(headers, rows, numeric=numeric, row_classes=classes))
        scored = [c for c in candidates if _candidate_score(c, metric)[0] is not None]
        if scored:
            kind = "cross-validation on the training rows" if cross_validated else "held-out rows"
            fig, (left, right) = _new_figure(9.5, max(1.8, 0.45 * len(scored) + 1.0), cols=2)
            labels = [_short(c.get("name")) for c in scored][::-1]
            colors = [CHOSEN_COLOR if c.get("name") == chosen else OTHER_COLOR for c in scored][::-1]
            values = [_candidate_score(c, metric)[0] for c in scored][::-1]
            left.barh(labels, values, color=colors)
            left.set_xlabel(f"{metric} ({kind})")
            left.set_title("score")
            for y, v in enumerate(values):
                left.text(v, y, f" {v:.4g}", va="center", fontsize=8)
            right.barh(labels, [_candidate_seconds(c) for c in scored][::-1], color=colors)
            right.set_xlabel("seconds")
            right.set_title("search and fit time" if timed else "fit time")
            right.set_yticklabels([])
            for ax in (left, right):
                ax.grid(axis="y", visible=False)
                ax.margins(x=0.18)
            out.append(report.figure(fig, f"Score ({_e(metric)}, {_e(kind)}) and time of every candidate; the chosen "
                                          "one in blue.", "candidate scores and times"))
    fitted = {c.get("name") for c in candidates}
    not_fitted = [f for f in failures if f.split(": ", 1)[0] not in fitted]
    skipped = card.get("skipped") or []
    if not_fitted or skipped:
        out.append("<h3>Candidates not compared</h3>")
        rows = [[f.split(": ", 1)[0], "failed", f.split(": ", 1)[-1]] for f in not_fitted]
        rows += [[s.get("name"), "skipped", s.get("reason")] for s in skipped]
        out.append(_table(["candidate", "", "why"], rows))
    return "\n".join(out)


# --- evaluation --------------------------------------------------------------------------------


def _evaluation_section(report: _Report, card: dict[str, Any], pipeline, x: pd.DataFrame, y: pd.Series) -> str:
    out = ['<h2 id="evaluation">Evaluation on the held-out rows</h2>',
           f"<p>{len(x)} rows the model never saw during fitting.</p>"]
    if card.get("task") == "classification":
        out += _classification(report, pipeline, x, y)
    else:
        out += _regression(report, pipeline, x, y)
    return "\n".join(out)


def _thin(*arrays: np.ndarray, limit: int = MAX_CURVE_POINTS) -> list[np.ndarray]:
    """Every array at the same evenly spaced indexes (first and last kept)."""
    if len(arrays[0]) <= limit:
        return list(arrays)
    index = np.unique(np.linspace(0, len(arrays[0]) - 1, limit).round().astype(int))
    return [a[index] for a in arrays]


def _classification(report: _Report, pipeline, x: pd.DataFrame, y: pd.Series) -> list[str]:
    from sklearn.metrics import (
        auc,
        average_precision_score,
        confusion_matrix,
        precision_recall_curve,
        precision_recall_fscore_support,
        roc_curve,
    )

    classes = [str(c) for c in pipeline.classes_]
    actual = y.astype(str).to_numpy()
    predicted = np.asarray(pipeline.predict(x)).astype(str)
    out = []

    # Confusion matrix.
    matrix = confusion_matrix(actual, predicted, labels=classes)
    n = len(classes)
    if n <= MAX_HEATMAP_LABELS:
        size = min(9.0, max(3.8, 0.45 * n + 2.4))
        fig, ax = _new_figure(size + 1.0, size)
        edges = np.arange(n + 1) - 0.5
        cells = ax.pcolormesh(edges, edges, matrix, cmap="Blues", edgecolors="white", linewidth=0.5)  # vector cells
        ax.set(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5), aspect="equal")
        fig.colorbar(cells, ax=ax, shrink=0.8, label="rows")
        ax.grid(False)
        ax.set_xticks(range(n), [_short(c) for c in classes], rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticks(range(n), [_short(c) for c in classes])
        ax.set_xlabel("predicted class")
        ax.set_ylabel("actual class")
        if n <= 15:
            threshold = matrix.max() / 2 if matrix.size else 0
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if matrix[i, j] > threshold else "#1f2328")
        out.append("<h3>Confusion matrix</h3>")
        out.append(report.figure(fig, "Rows: actual class; columns: predicted class; cells count held-out rows. "
                                      "The diagonal is right.", "confusion matrix"))
    else:
        out.append(f'<p class="note">{n} classes: too many for a readable confusion matrix; see the table below.</p>')
    precision, recall, f1, support = precision_recall_fscore_support(actual, predicted, labels=classes, zero_division=0)
    out.append(_table(["class", "test rows", "precision", "recall", "f1"],
                      [[c, int(s), _num(float(p)), _num(float(r)), _num(float(f))]
                       for c, p, r, f, s in zip(classes, precision, recall, f1, support)], numeric=[1, 2, 3, 4]))

    # ROC and precision-recall curves, one-vs-rest.
    if not hasattr(pipeline, "predict_proba"):
        out.append('<p class="note">This model gives no probabilities: no ROC or precision-recall curves.</p>')
        return out
    probabilities = np.asarray(pipeline.predict_proba(x))
    if n == 2:
        shown = [1]  # the second class is the positive one, as in sklearn
        explain = f"the positive class is <code>{_e(classes[1])}</code>"
    else:
        present = [i for i in range(n) if 0 < support[i] < len(actual)]
        shown = sorted(present, key=lambda i: -support[i])[:MAX_CURVES]
        explain = "one class against the rest"
        if len(present) > len(shown):
            explain += f", the {len(shown)} classes with the most test rows of {len(present)}"
    shown = [i for i in shown if 0 < support[i] < len(actual)]
    if not shown:
        out.append('<p class="note">The held-out rows do not have both outcomes of any class: no curves.</p>')
        return out
    fig, (roc_ax, pr_ax) = _new_figure(10.0, 4.4, cols=2)
    for i in shown:
        truth = actual == classes[i]
        fpr, tpr, _ = roc_curve(truth, probabilities[:, i])
        area = auc(fpr, tpr)
        fpr, tpr = _thin(fpr, tpr)
        roc_ax.plot(fpr, tpr, lw=1.6, label=f"{_short(classes[i], 18)} (AUC {area:.3f})")
        precision_, recall_, _ = precision_recall_curve(truth, probabilities[:, i])
        ap = average_precision_score(truth, probabilities[:, i])
        recall_, precision_ = _thin(recall_, precision_)
        pr_ax.step(recall_, precision_, where="post", lw=1.6, label=f"{_short(classes[i], 18)} (AP {ap:.3f})")
    roc_ax.plot([0, 1], [0, 1], ls="--", color="#8c959f", lw=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision–recall", xlim=(-0.02, 1.02), ylim=(-0.02, 1.05))
    if n == 2:
        base = float(np.mean(actual == classes[1]))
        pr_ax.axhline(base, ls="--", color="#8c959f", lw=1)
    roc_ax.legend(loc="lower right", fontsize=7.5)
    pr_ax.legend(loc="lower left", fontsize=7.5)
    out.append("<h3>ROC and precision–recall curves</h3>")
    out.append(report.figure(fig, f"From the predicted probabilities; {explain}. Dashed: a model that guesses.",
                             "ROC and precision-recall curves"))
    return out


def _regression(report: _Report, pipeline, x: pd.DataFrame, y: pd.Series) -> list[str]:
    actual = y.to_numpy(dtype="float64")
    predicted = np.asarray(pipeline.predict(x), dtype="float64").reshape(-1)
    residual = actual - predicted
    sample = np.arange(len(actual))
    note = ""
    if len(sample) > MAX_POINTS:
        sample = np.sort(np.random.default_rng(0).choice(len(actual), MAX_POINTS, replace=False))
        note = f" A random {MAX_POINTS} of the {len(actual)} rows are drawn."
    fig, (left, right) = _new_figure(10.0, 4.4, cols=2)
    left.scatter(actual[sample], predicted[sample], s=12, alpha=0.6, color=CHOSEN_COLOR, edgecolors="none")
    finite = np.concatenate([actual[np.isfinite(actual)], predicted[np.isfinite(predicted)]])
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        left.plot([low, high], [low, high], ls="--", color="#8c959f", lw=1)
    left.set(xlabel="actual", ylabel="predicted", title="predicted vs actual")
    right.scatter(predicted[sample], residual[sample], s=12, alpha=0.6, color=CHOSEN_COLOR, edgecolors="none")
    right.axhline(0, ls="--", color="#8c959f", lw=1)
    right.set(xlabel="predicted", ylabel="actual − predicted", title="residuals")
    out = ["<h3>Predicted vs actual, and residuals</h3>",
           report.figure(fig, "Left: a perfect model puts every point on the dashed line. Right: the error of each row "
                              f"against its prediction; a pattern means the model misses something.{_e(note)}",
                         "predicted versus actual and residual plots")]
    fig, ax = _new_figure(6.0, 3.0)
    ax.hist(residual[np.isfinite(residual)], bins=min(40, max(5, len(residual) // 5)), color=CHOSEN_COLOR)
    ax.set(xlabel="actual − predicted", ylabel="rows", title="distribution of the errors")
    out.append(report.figure(fig, "Errors on all held-out rows.", "residual histogram"))
    out.append(_table(["rows", "mean error", "mean absolute error", "largest absolute error"],
                      [[len(residual), _num(float(np.mean(residual))), _num(float(np.mean(np.abs(residual)))),
                        _num(float(np.max(np.abs(residual))))]], numeric=range(4)))
    return out


# --- feature importance ------------------------------------------------------------------------


def _client_column(schema_columns: list[dict[str, Any]]) -> dict[str, str]:
    """Model frame column -> the column a client sends (datetime parts -> their column)."""
    owner = {}
    for c in schema_columns:
        owner[c["name"]] = c["name"]
        if c.get("type") == "datetime":
            for part in c.get("parts") or []:
                owner[datetime_input(c["name"], part)] = c["name"]
    return owner


def _output_owners(prepare) -> list[str] | None:
    """For each output feature of the fitted ColumnTransformer, the input column it comes from
    (one-hot parts -> their column), or None when the mapping is not certain."""
    from sklearn.preprocessing import OneHotEncoder

    owners: list[str] = []
    for name, transformer, columns in prepare.transformers_:
        if transformer == "drop" or len(columns) == 0:
            continue
        if transformer == "passthrough":
            owners.extend(columns)
            continue
        step = transformer.steps[-1][1] if hasattr(transformer, "steps") else transformer
        outputs = transformer.get_feature_names_out(columns)
        if isinstance(step, OneHotEncoder) and step.drop is None and not getattr(step, "infrequent_categories_", None):
            mapped = [col for col, categories in zip(columns, step.categories_) for _ in categories]
        elif len(outputs) == len(columns):
            mapped = list(columns)
        else:
            return None
        if len(mapped) != len(outputs):
            return None
        owners.extend(mapped)
    total = len(prepare.get_feature_names_out())
    return owners if len(owners) == total else None


def _model_importance(pipeline, owner: dict[str, str]) -> tuple[str, dict[str, float]] | None:
    """What the fitted estimator says about its inputs, summed per client column, or None."""
    steps = getattr(pipeline, "steps", None)
    if not steps or len(steps) < 2:
        return None
    prepare, estimator = steps[0][1], steps[-1][1]
    if hasattr(estimator, "feature_importances_"):
        values = np.asarray(estimator.feature_importances_, dtype="float64").reshape(-1)
        how = ("impurity-based importance of the forest (<code>feature_importances_</code>), "
               "the parts of a one-hot encoded or date column summed; the values add up to 1")
    elif hasattr(estimator, "coef_"):
        coef = np.atleast_2d(np.asarray(estimator.coef_, dtype="float64"))
        values = np.abs(coef).mean(axis=0)
        how = ("absolute coefficients of the linear model on standardised numbers and one-hot categories"
               + (" (mean over the classes)" if coef.shape[0] > 1 else "")
               + ", the parts of a one-hot encoded or date column summed")
    else:
        return None
    try:
        owners = _output_owners(prepare)
    except (AttributeError, ValueError, TypeError):  # a transformer without feature names
        return None
    if owners is None or len(owners) != len(values):
        return None
    summed: dict[str, float] = {}
    for column, value in zip(owners, values):
        key = owner.get(column, column)
        summed[key] = summed.get(key, 0.0) + float(value)
    return how, summed


def _permutation_importance(
    pipeline, task: str, owner: dict[str, str], x: pd.DataFrame, y: pd.Series
) -> tuple[str, dict[str, float], dict[str, float]]:
    """Drop in accuracy (R² for regression) when one client column's values are shuffled
    across the held-out rows (all parts of a date column together)."""
    from sklearn.metrics import accuracy_score, r2_score

    if len(x) > PERMUTATION_ROWS:
        picked = np.sort(np.random.default_rng(0).choice(len(x), PERMUTATION_ROWS, replace=False))
        x, y = x.iloc[picked], y.iloc[picked]
    x = x.reset_index(drop=True)
    truth = y.astype(str).to_numpy() if task == "classification" else y.to_numpy(dtype="float64")

    def metric(frame: pd.DataFrame) -> float:
        predicted = np.asarray(pipeline.predict(frame))
        if task == "classification":
            return float(accuracy_score(truth, predicted.astype(str)))
        return float(r2_score(truth, predicted.astype("float64").reshape(-1)))

    groups: dict[str, list[str]] = {}
    for frame_column in x.columns:
        groups.setdefault(owner.get(frame_column, frame_column), []).append(frame_column)
    started = time.perf_counter()
    base = metric(x)
    one = max(time.perf_counter() - started, 1e-4)
    repeats = int(max(1, min(PERMUTATION_REPEATS, PERMUTATION_BUDGET_SECONDS / (one * max(1, len(groups))))))
    rng = np.random.default_rng(0)
    means, spreads = {}, {}
    for column, frame_columns in groups.items():
        drops = []
        for _ in range(repeats):
            order = rng.permutation(len(x))
            shuffled = x.copy()
            for c in frame_columns:
                shuffled[c] = x[c].to_numpy()[order]
            drops.append(base - metric(shuffled))
        means[column], spreads[column] = float(np.mean(drops)), float(np.std(drops))
    name = "accuracy" if task == "classification" else "R²"
    how = (f"permutation importance: how much {name} drops on {len(x)} held-out rows when the column's values are "
           f"shuffled ({repeats} shuffle{'s' if repeats != 1 else ''}, mean; ± the spread)")
    return how, means, spreads


@dataclasses.dataclass
class Importance:
    method: str  # "model" (feature_importances_ or coefficients) or "permutation"
    how: str  # what the numbers are, as HTML
    values: dict[str, float]  # client-facing column -> importance
    spreads: dict[str, float]  # column -> spread over the shuffles (permutation only)


def feature_importance(
    pipeline, task: str, schema_columns: list[dict[str, Any]], x: pd.DataFrame, y: pd.Series
) -> Importance:
    """Importance per column a client sends: the estimator's own numbers when it has them
    (forests: `feature_importances_`; linear models: |coefficients|), mapped back through the
    ColumnTransformer's output features (one-hot parts and date parts summed per column);
    otherwise (gradient boosting, SVMs) permutation importance on the held-out rows."""
    owner = _client_column(schema_columns)
    found = _model_importance(pipeline, owner)
    if found is None:
        how, values, spreads = _permutation_importance(pipeline, task, owner, x, y)
        method = "permutation"
    else:
        (how, values), spreads, method = found, {}, "model"
    known = {c["name"] for c in schema_columns}
    return Importance(method, how, {k: v for k, v in values.items() if k in known}, spreads)


def _importance_section(report: _Report, card: dict[str, Any], pipeline, x: pd.DataFrame, y: pd.Series) -> str:
    out = ['<h2 id="importance">Feature importance</h2>']
    schema_columns = (card.get("schema") or {}).get("columns") or [{"name": c, "type": "number"} for c in x.columns]
    importance = feature_importance(pipeline, card.get("task"), schema_columns, x, y)
    how, spreads = importance.how, importance.spreads
    ordered = sorted(importance.values.items(), key=lambda item: -item[1])
    out.append(f"<p>Per input column: {how}.</p>")
    shown = ordered[:TOP_FEATURES]
    if shown:
        fig, ax = _new_figure(8.0, max(1.8, 0.3 * len(shown) + 0.9))
        labels = [_short(k, 32) for k, _ in shown][::-1]
        heights = [v for _, v in shown][::-1]
        errors = [spreads.get(k, 0.0) for k, _ in shown][::-1] if spreads else None
        ax.barh(labels, heights, xerr=errors, color=CHOSEN_COLOR, ecolor="#59636e", capsize=2)
        ax.axvline(0, color="#59636e", lw=0.8)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("importance")
        more = f" (the {len(shown)} most important of {len(ordered)})" if len(ordered) > len(shown) else ""
        out.append(report.figure(fig, f"Importance per input column{_e(more)}.", "feature importance"))
        rows = [[k, _num(v)] + ([_num(spreads.get(k))] if spreads else []) for k, v in ordered]
        out.append(_table(["column", "importance"] + (["±"] if spreads else []), rows, numeric=[1, 2]))
    return "\n".join(out)


# --- parity and libraries ----------------------------------------------------------------------


def _parity_section(card: dict[str, Any]) -> str:
    parity = card.get("parity") or {}
    out = ['<h2 id="parity">ONNX parity check</h2>']
    if not parity:
        return "\n".join(out + ['<p class="note">No parity result recorded.</p>'])
    passed = parity.get("passed")
    badge = '<span class="badge ok">passed</span>' if passed else '<span class="badge bad">not passed</span>'
    edge = parity.get("edge_rows")
    rows = parity.get("rows")
    facts = [("result", badge),
             ("rows compared", _e(f"{rows}" + (f" (held-out rows plus {edge} edge rows: every value missing; "
                                                "unseen categories)" if edge else "")))]
    if "max_probability_difference" in parity:
        facts += [("max probability difference", _e(_num(parity.get("max_probability_difference")))),
                  ("tolerance", _e(f"{parity.get('tolerance')} absolute, per class probability")),
                  ("label mismatches", _e(parity.get("label_mismatches")))]
    if "max_relative_difference" in parity:
        facts += [("max relative difference", _e(_num(parity.get("max_relative_difference")))),
                  ("tolerance", _e(f"{parity.get('tolerance')} relative to max(1, |value|)"))]
    known = {"passed", "rows", "edge_rows", "max_probability_difference", "max_relative_difference", "tolerance",
             "label_mismatches"}
    facts += [(k, _e(_num(v) if not isinstance(v, (dict, list)) else json.dumps(v))) for k, v in parity.items()
              if k not in known]
    out.append("<p>Before the version was registered, onnxruntime ran the exported <code>model.onnx</code> and "
               "sklearn ran the pipeline on the same rows; the served model computes what was evaluated here.</p>")
    out.append(_facts(facts))
    return "\n".join(out)


def _libraries_section(card: dict[str, Any]) -> str:
    libraries = dict(card.get("libraries") or {})
    libraries.setdefault("matplotlib (this report)", importlib_metadata.version("matplotlib"))
    out = ['<h2 id="libraries">Libraries</h2>',
           _table(["library", "version"], [[k, v] for k, v in libraries.items()])]
    spec = card.get("spec")
    if spec:
        out.append("<h3>Dataset spec in effect</h3>")
        out.append(_table(["setting", "value"], [[k, json.dumps(v) if not isinstance(v, str) else v]
                                                  for k, v in spec.items()]))
    return "\n".join(out)
