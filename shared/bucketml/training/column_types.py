"""Typing the feature columns of an upload, and the upload's profile.

Runs in preprocess and train only (pandas is fine here; the predict function never imports
this module). What must behave identically at training and at serving time (boolean
spellings, parsing ISO 8601 dates, date parts) lives in `bucketml.encoding`, numpy only, and is
called from here, so a value is read the same way in both places.

Column types (schema `columns[].type`):
- `number`: float32 input; median-imputed (and scaled for linear models and SVMs).
- `string`: a category; missing is the empty string.
- `boolean`: true/false, yes/no, t/f, y/n in any case; a category with the values "true",
  "false" and "" (missing).
- `datetime`: ISO 8601 values numpy parses; expanded into numeric parts (year, month, day,
  dayofweek, and hour when some value has a time), one float32 model input per part.
Dropped columns (schema `dropped[]`: column, reason, kind): all missing, constant, identifier-
like, free text, target leaks (a WARNING), and what the spec drops (`drop`, `id`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from bucketml.contracts.rejections import Rejection
from bucketml.encoding import (
    DATETIME_PARTS,
    ISO_DATETIME,
    boolean_label,
    datetime_input,
    datetime_parts,
    parse_datetimes,
)

IDENTIFIER_MIN_ROWS = 20
IDENTIFIER_DISTINCT_SHARE = 0.95  # more distinct values than this share of rows: an identifier
FREE_TEXT_MEAN_LENGTH = 50  # characters
FREE_TEXT_DISTINCT_SHARE = 0.5
DATETIME_SHARE = 0.95  # of the present values must parse as ISO 8601 dates
LEAK_MIN_ROWS = 10
TOP_VALUES = 10
TOP_VALUE_CHARS = 80

# Drop kinds (schema `dropped[].kind`).
ALL_MISSING, CONSTANT, IDENTIFIER, FREE_TEXT, TARGET_LEAK = "all_missing", "constant", "identifier", "free_text", "target_leak"
SPEC_DROP, SPEC_ID = "spec_drop", "spec_id"


@dataclasses.dataclass
class Typing:
    """Feature columns ({"name", "type"[, "parts"]}), dropped columns ({"column", "reason",
    "kind"}), and what the user should know (notes) or check (warnings)."""

    columns: list[dict[str, Any]]
    dropped: list[dict[str, str]]
    notes: list[str]
    warnings: list[str]


def class_label(value: Any) -> str:
    """Class labels are strings everywhere (model, card, answers); 1.0 and 1 are the same class."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _names(value: Any) -> list[str]:
    """A spec's `drop` / `id`: one column name or a list of them."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)]
    return [str(v) for v in value]


def type_columns(
    frame: pd.DataFrame,
    target: str,
    y: pd.Series | None = None,
    task: str | None = None,
    spec: dict[str, Any] | None = None,
) -> Typing:
    """Type every column but the target. `y` (the target as labels or floats, same index as
    `frame`) enables the leak check. Raises Rejection('no_features') when nothing is left."""
    spec = spec or {}
    typing = Typing([], [], [], [])
    by_spec: dict[str, tuple[str, str]] = {}
    for key, kind, reason in (("drop", SPEC_DROP, "dropped by the spec"), ("id", SPEC_ID, "identifier (named by the spec's 'id')")):
        for name in _names(spec.get(key)):
            if name == target:
                typing.warnings.append(f"the spec's '{key}' names the target '{target}'; it stays the target")
            elif name not in frame.columns:
                typing.warnings.append(f"the spec's '{key}' names column '{name}', which is not in the file")
            else:
                by_spec.setdefault(name, (kind, reason))
    for name in frame.columns:
        if name == target:
            continue
        if name in by_spec:
            kind, reason = by_spec[name]
            typing.dropped.append({"column": name, "reason": reason, "kind": kind})
            continue
        _type_one(typing, name, frame[name], target, y, task)
    for col in typing.columns:  # a date's part columns must not overwrite columns of the file
        if col["type"] == "datetime" and any(datetime_input(col["name"], p) in frame.columns for p in col["parts"]):
            col["type"] = "string"
            del col["parts"]
            typing.notes.append(f"'{col['name']}' holds dates but is used as a category: the file already has its part columns")
    if not typing.columns:
        why = "; ".join(f"{d['column']}: {d['reason']}" for d in typing.dropped) or "the file has only the target column"
        raise Rejection("no_features", f"no usable feature columns remain ({why})")
    return typing


def _type_one(typing: Typing, name: str, col: pd.Series, target: str, y: pd.Series | None, task: str | None) -> None:
    def drop(kind: str, reason: str) -> None:
        typing.dropped.append({"column": name, "reason": reason, "kind": kind})

    rows = len(col)
    present = col.dropna()
    if present.empty:
        return drop(ALL_MISSING, "all values missing")
    distinct = int(present.nunique())
    if distinct <= 1 and len(present) == rows:
        return drop(CONSTANT, f"constant (every row is {class_label(present.iloc[0])!r})")
    leak = _leak(col, y, task, target) if y is not None else None
    if leak:
        typing.warnings.append(f"column '{name}' is {leak}: a target leak, dropped (a model cannot have it when predicting)")
        return drop(TARGET_LEAK, f"{leak} (target leak)")
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    if numeric:
        values = present.astype("float64")
        if (
            rows >= IDENTIFIER_MIN_ROWS and len(present) == rows and distinct == rows
            and bool(np.all(np.mod(values, 1) == 0)) and values.max() - values.min() == rows - 1
        ):
            return drop(IDENTIFIER, "identifier-like (consecutive integers, one per row: a row number)")
        typing.columns.append({"name": name, "type": "number"})
        return
    if pd.api.types.is_bool_dtype(col) or all(boolean_label(v) is not None for v in pd.unique(present)):
        typing.columns.append({"name": name, "type": "boolean"})
        return
    texts = present.astype(str).str.strip()
    parsed = ~np.isnat(parse_datetimes(texts.tolist())) if _maybe_dates(texts) else None
    if parsed is not None and parsed.mean() >= DATETIME_SHARE:
        has_time = bool(texts[parsed].str.match(r"\d{4}-\d{2}-\d{2}[T ]\d").any())
        parts = [p for p in DATETIME_PARTS if p != "hour" or has_time]
        typing.columns.append({"name": name, "type": "datetime", "parts": parts})
        unparsed = int((~parsed).sum())
        if unparsed:
            typing.notes.append(f"{unparsed} values of '{name}' are not ISO 8601 dates; they are treated as missing")
        return
    share = distinct / len(present)
    mean_length = float(texts.str.len().mean())
    if mean_length > FREE_TEXT_MEAN_LENGTH and share > FREE_TEXT_DISTINCT_SHARE:
        return drop(FREE_TEXT, f"free text (long strings, {mean_length:.0f} characters on average, {distinct} distinct)")
    if len(present) >= IDENTIFIER_MIN_ROWS and share > IDENTIFIER_DISTINCT_SHARE:
        return drop(IDENTIFIER, f"identifier-like ({distinct} distinct values in {len(present)} rows)")
    typing.columns.append({"name": name, "type": "string"})


def _maybe_dates(texts: pd.Series) -> bool:
    """A cheap first look (the ISO pattern on a sample) before every value is parsed."""
    sample = texts if len(texts) <= 1000 else texts.sample(1000, random_state=0)
    return bool(sample.str.match(ISO_DATETIME.pattern).mean() >= 0.8)


def _leak(col: pd.Series, y: pd.Series, task: str | None, target: str) -> str | None:
    """Why `col` is the target in disguise (identical, or a one-to-one relabelling), or None."""
    mask = col.notna() & y.notna()
    count = int(mask.sum())
    if count < LEAK_MIN_ROWS or count < len(col) / 2:
        return None
    if col[mask].nunique() != y[mask].nunique():  # cheap: one-to-one needs as many values as classes
        return None
    values = col[mask].map(class_label).to_numpy(dtype=object)
    labels = y[mask].map(class_label).to_numpy(dtype=object)
    if len(set(labels)) < 2:
        return None
    if np.array_equal(values, labels):
        return f"identical to the target '{target}'"
    classes = len(set(labels))
    if task != "classification" and classes > count / 2:
        return None  # a continuous target: every unique-per-row column would "map" one-to-one
    pairs = pd.DataFrame({"value": values, "label": labels})
    if pairs.groupby("value")["label"].nunique().max() == 1 and pairs.groupby("label")["value"].nunique().max() == 1:
        return f"a one-to-one relabelling of the target '{target}'"
    return None


def normalise(frame: pd.DataFrame, columns: list[dict[str, Any]]) -> pd.DataFrame:
    """The prepared (raw, client-facing) columns: numbers as float32; strings stripped with ''
    for missing; booleans as 'true'/'false'/''; datetimes as their ISO text, '' where missing
    or unparseable. Datetime parts are derived from the text by `with_datetime_parts`."""
    out = {}
    for col in columns:
        name, kind = col["name"], col["type"]
        values = frame[name]
        if kind == "number":
            out[name] = values.astype("float32")
        elif kind == "boolean":
            out[name] = _respell(values, lambda v: boolean_label(v) or "")
        elif kind == "datetime":
            texts = [v.strip() if isinstance(v, str) else None for v in values]
            stamps = parse_datetimes(texts)
            out[name] = pd.Series(
                [t if not np.isnat(s) else "" for t, s in zip(texts, stamps)], index=frame.index, dtype=object
            )
        else:
            out[name] = _respell(values, class_label)
    return pd.DataFrame(out, index=frame.index)


def _respell(values: pd.Series, spell) -> pd.Series:
    """`spell` applied to each distinct value once (not to every row); '' for missing."""
    present = values.dropna()
    spelling = {v: spell(v) for v in pd.unique(present)}
    out = pd.Series("", index=values.index, dtype=object)
    out[present.index] = [spelling[v] for v in present]
    return out


def model_columns(columns: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(numeric, categorical) column names of the frame the sklearn pipeline takes: numbers and
    datetime parts; strings and booleans."""
    numbers, categories = [], []
    for col in columns:
        if col["type"] == "number":
            numbers.append(col["name"])
        elif col["type"] == "datetime":
            numbers.extend(datetime_input(col["name"], part) for part in col["parts"])
        else:
            categories.append(col["name"])
    return numbers, categories


MAX_LISTED_CATEGORIES = 1000


def with_categories(columns: list[dict[str, Any]], frame: pd.DataFrame) -> list[dict[str, Any]]:
    """`columns` with, for each string and boolean column, the values the model was trained on
    (`categories`, sorted, missing '' left out; at most MAX_LISTED_CATEGORIES, then
    `categories_truncated` and the `distinct` count). Other values are accepted and encode as
    no known category, as in training."""
    listed = []
    for col in columns:
        if col["type"] in ("string", "boolean"):
            seen = sorted(set(frame[col["name"]].astype(str)) - {""})
            col = dict(col, categories=seen[:MAX_LISTED_CATEGORIES])
            if len(seen) > MAX_LISTED_CATEGORIES:
                col.update(categories_truncated=True, distinct=len(seen))
        listed.append(col)
    return listed


def with_datetime_parts(frame: pd.DataFrame, columns: list[dict[str, Any]]) -> pd.DataFrame:
    """`frame` plus one float32 column per datetime part (`signup__year`, ...), computed from
    the raw text with the numpy code the predict function uses. The raw column stays (the
    pipeline ignores it; the parity check feeds it to the ONNX model as a client would)."""
    datetimes = [c for c in columns if c["type"] == "datetime"]
    if not datetimes:
        return frame
    frame = frame.copy()
    for col in datetimes:
        raw = [v if isinstance(v, str) else None for v in frame[col["name"]].tolist()]
        for part, values in datetime_parts(raw, col["parts"]).items():
            frame[datetime_input(col["name"], part)] = values
    return frame


# --- profile ---------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A JSON-safe float: None for NaN and infinities."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _number_summary(values: pd.Series) -> dict[str, float | None]:
    values = values.dropna().astype("float64")
    values = values[np.isfinite(values)]
    if values.empty:
        return {k: None for k in ("min", "max", "mean", "std", "p25", "p50", "p75")}
    quantiles = values.quantile([0.25, 0.5, 0.75]).tolist()
    return {
        "min": _number(values.min()),
        "max": _number(values.max()),
        "mean": _number(values.mean()),
        "std": _number(values.std()) if len(values) > 1 else None,
        "p25": _number(quantiles[0]),
        "p50": _number(quantiles[1]),
        "p75": _number(quantiles[2]),
    }


def _top(values: pd.Series, label=None) -> list[dict[str, Any]]:
    """The most frequent values with their counts; `label` respells values (counted together)."""
    counts = values.value_counts(dropna=True)
    if label is not None:
        counts = counts.groupby(counts.index.map(label)).sum().sort_index(kind="stable").sort_values(ascending=False, kind="stable")
        counts = counts[counts.index != ""]
    return [{"value": str(v)[:TOP_VALUE_CHARS], "count": int(n)} for v, n in counts.head(TOP_VALUES).items()]


def column_profile(col: pd.Series, kind: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """type, missing_share, distinct and a summary by type. `kind` is the column's type, or
    'dropped' (summarised as a number or as strings, by its values)."""
    rows = len(col)
    missing = int(col.isna().sum())
    entry: dict[str, Any] = {
        "name": str(col.name),
        "type": kind,
        "missing_share": missing / rows if rows else 0.0,
        "distinct": int(col.nunique(dropna=True)),
    }
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    if kind == "number" or (kind == "dropped" and numeric):
        entry.update(_number_summary(col))
    elif kind == "boolean":
        entry["top"] = _top(col, lambda v: boolean_label(v) or "")
        entry["distinct"] = len(entry["top"])
    elif kind == "datetime":
        texts = [v.strip() if isinstance(v, str) else None for v in col.tolist()]
        stamps = parse_datetimes(texts)
        parsed = stamps[~np.isnat(stamps)]
        entry["min"] = str(parsed.min()) if len(parsed) else None
        entry["max"] = str(parsed.max()) if len(parsed) else None
        entry["unparsed"] = int(rows - missing - len(parsed))
        if spec:
            entry["parts"] = spec.get("parts", [])
    else:
        entry["top"] = _top(col, class_label)
    return entry


def target_profile(y: pd.Series, task: str) -> dict[str, Any]:
    """Class counts (largest first) with the largest/smallest ratio, or numeric statistics."""
    if task == "classification":
        counts = y.value_counts()
        counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
        return {
            "classes": {str(k): int(v) for k, v in counts.items()},
            "imbalance_ratio": round(float(counts.iloc[0] / counts.iloc[-1]), 4) if len(counts) else None,
        }
    return {"distinct": int(y.nunique()), **_number_summary(y)}


def build_profile(frame: pd.DataFrame, y: pd.Series, schema: dict[str, Any]) -> dict[str, Any]:
    """The profile document (prepared/<model>/<run>/profile.json, card["profile"]).

    Computed from the rows used (those with a target value), every uploaded column in file
    order: the features with their types and the dropped ones with type 'dropped'.
    """
    typed = {c["name"]: c for c in schema["columns"]}
    dropped = {d["column"]: d for d in schema["dropped"]}
    columns = []
    for name in frame.columns:
        if name == schema["target"]:
            continue
        if name in typed:
            columns.append(column_profile(frame[name], typed[name]["type"], typed[name]))
        else:
            entry = column_profile(frame[name], "dropped")
            if name in dropped:
                entry["dropped"] = dropped[name]["reason"]
                if dropped[name].get("kind") in (IDENTIFIER, FREE_TEXT, SPEC_ID) and "top" in entry:
                    entry["examples"] = [t["value"] for t in entry.pop("top")[:3]]  # counts of 1 say nothing
            columns.append(entry)
    target = {"name": schema["target"], "task": schema["task"], "origin": schema.get("target_origin")}
    target.update(target_profile(y, schema["task"]))
    if schema.get("training_only_classes"):
        target["training_only_classes"] = schema["training_only_classes"]
    return {
        "rows": schema["rows"],
        "target": target,
        "columns": columns,
        "dropped": schema["dropped"],
        "notes": schema["notes"],
        "warnings": schema["warnings"],
    }
