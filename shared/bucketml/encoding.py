"""How a column's values become model inputs: the one encoding training and serving share.

Training types an upload's columns and checks the exported ONNX model (the parity gate, the
report) with this code, and the predict function encodes every request with it, so a value is
read the same way in both places (docs/columns.md). numpy only: it is on the predict
function's cold-start path, and onnxruntime is imported on first use (see `onnxruntime`).

Values the column cannot take raise `InvalidInput` (a request's rows over `MAX_ROWS`:
`TooManyRows`); what status a client gets for them is the HTTP layer's business.
"""

from __future__ import annotations

import json
import math
import operator
import re
from typing import Any

import numpy as np

from bucketml.onnx_guard import refuse_external_data

MAX_ROWS = 10_000  # rows one request may carry
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the models take float32

BOOLEAN_TRUE = frozenset({"true", "yes", "t", "y"})
BOOLEAN_FALSE = frozenset({"false", "no", "f", "n"})
DATETIME_PARTS = ("year", "month", "day", "dayofweek", "hour")
# ISO 8601 as numpy parses it: a date, optionally a time ('T' or a space), optionally a zone.
ISO_DATETIME = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})(?P<time>[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?"
    r"(?P<zone>Z|[+-]\d{2}:?\d{2})?$"
)

Columns = list[dict[str, Any]]  # a model card's schema["columns"]


class InvalidInput(ValueError):
    """A value or a row that the model's columns cannot take; the message names it."""


class TooManyRows(InvalidInput):
    """More rows than one request may carry (MAX_ROWS)."""


# --- onnxruntime sessions --------------------------------------------------------------------


def onnxruntime():
    """Imported on first use, not at module import: functions-framework imports the function
    in gunicorn's master before forking the worker, and an onnxruntime loaded before a fork
    hangs or aborts when the worker exits."""
    import onnxruntime

    return onnxruntime


def new_session(onnx_bytes: bytes):
    """An onnxruntime session over self-contained ONNX bytes (bucketml.onnx_guard refuses others)."""
    refuse_external_data(onnx_bytes)  # before onnxruntime could read a file the model names
    ort = onnxruntime()
    return ort.InferenceSession(onnx_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])


def session_options():
    # Single rows dominate: one thread, no spinning (idle spinning threads burn a core).
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.add_session_config_entry("session.load_model_format", "ONNX")  # never the ORT format
    return options


# --- one value -------------------------------------------------------------------------------


def _number(column: str, value: Any) -> float:
    """A JSON value for a numeric column: a number, a numeric string, or null/'' for missing."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond float range
            number = math.inf
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise InvalidInput(f"column '{column}' expects a number or null, got {json.dumps(value)[:40]}")
    if math.isnan(number):
        return number  # NaN is how a missing number is spelled, too
    if abs(number) > FLOAT32_MAX:
        raise InvalidInput(f"column '{column}' expects a number within float32 range, got {json.dumps(value)[:40]}")
    return number


def _string(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # the same spelling training used for numeric-looking categories
    if isinstance(value, (str, int, float, bool)):
        return str(value).strip()
    raise InvalidInput(f"column '{column}' expects a string or null, got {type(value).__name__}")


def boolean_label(value: Any) -> str | None:
    """'true' / 'false' for a boolean-like value, '' for missing, None if it is not boolean-like.

    true/false, yes/no, t/f, y/n in any case, JSON booleans, and 1/0.
    """
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            return ""
        return {1: "true", 0: "false"}.get(value) if value in (0, 1) else None
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return ""
        if text in BOOLEAN_TRUE:
            return "true"
        if text in BOOLEAN_FALSE:
            return "false"
    return None


def _boolean(column: str, value: Any) -> str:
    label = boolean_label(value)
    if label is None:
        raise InvalidInput(f"column '{column}' expects true or false (or yes/no), or null, got {json.dumps(value, default=str)[:40]}")
    return label


# --- datetimes -------------------------------------------------------------------------------


def datetime_input(column: str, part: str) -> str:
    """The model column (and, unless the converter renames it, ONNX input) of one date part."""
    return f"{column}__{part}"


def parse_datetimes(values: list) -> np.ndarray:
    """datetime64[s] per value; NaT for missing and for anything that is not ISO 8601 that numpy
    parses. A zone (Z, +02:00) is converted to UTC; naive values are taken as they are."""
    stamps = np.full(len(values), np.datetime64("NaT"), dtype="datetime64[s]")
    where, texts, offsets = [], [], []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            continue
        match = ISO_DATETIME.match(value.strip())
        if not match:
            continue
        zone = match["zone"]
        where.append(i)
        texts.append(match["date"] + (match["time"] or ""))
        if zone and zone != "Z":
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            offsets.append(sign * (int(digits[:2]) * 60 + int(digits[2:])))
        else:
            offsets.append(0)
    if not where:
        return stamps
    try:
        parsed = np.array(texts, dtype="datetime64[s]")
    except ValueError:  # one bad value (a 13th month) fails the whole array: parse one by one
        parsed = np.full(len(texts), np.datetime64("NaT"), dtype="datetime64[s]")
        for j, text in enumerate(texts):
            try:
                parsed[j] = np.datetime64(text, "s")
            except ValueError:
                pass
    stamps[np.array(where)] = parsed - np.array(offsets, dtype="timedelta64[m]")
    return stamps


def datetime_parts_of(stamps: np.ndarray, parts=DATETIME_PARTS) -> dict[str, np.ndarray]:
    """float32 parts of datetime64 values, NaN where the value is missing (NaT)."""
    missing = np.isnat(stamps)
    safe = np.where(missing, np.datetime64(0, "s"), stamps).astype("datetime64[s]")
    days = safe.astype("datetime64[D]")
    months = safe.astype("datetime64[M]")
    compute = {
        "year": lambda: safe.astype("datetime64[Y]").astype(np.int64) + 1970,
        "month": lambda: months.astype(np.int64) % 12 + 1,
        "day": lambda: (days - months.astype("datetime64[D]")).astype(np.int64) + 1,
        "dayofweek": lambda: (days.astype(np.int64) + 3) % 7,  # Monday 0 (1970-01-01 was a Thursday)
        "hour": lambda: (safe - days).astype("timedelta64[h]").astype(np.int64),
    }
    out = {}
    for part in parts:
        values = compute[part]().astype(np.float32)
        values[missing] = np.nan
        out[part] = values
    return out


def datetime_parts(values: list, parts=DATETIME_PARTS) -> dict[str, np.ndarray]:
    """Raw date strings -> {part: float32 array}, NaN for missing or unparseable values."""
    return datetime_parts_of(parse_datetimes(values), parts)


def _datetimes(column: str, values: list) -> np.ndarray:
    stamps = parse_datetimes(values)
    for value, stamp in zip(values, stamps):
        if np.isnat(stamp) and not (value is None or (isinstance(value, str) and not value.strip())):
            raise InvalidInput(
                f"column '{column}' expects an ISO 8601 date or time such as 2024-05-01 or 2024-05-01T10:30:00, "
                f"or null, got {json.dumps(value, default=str)[:40]}"
            )
    return stamps


# --- columns of values -> ONNX feeds ---------------------------------------------------------


def feeds_from_columns(columns: Columns, values: dict[str, list], rows: int) -> dict[str, np.ndarray]:
    """ONNX feeds: one (rows, 1) tensor per column, float32 or string, keyed by input name.

    A datetime column is one client-facing column and several model inputs: one float32 tensor
    per part (year, month, ...), named in the column's "inputs".
    """
    feeds = _number_feeds(columns, values, rows)
    for col in columns:
        name, kind = col["name"], col["type"]
        if kind == "number" and col.get("input", name) in feeds:
            continue
        if kind == "datetime":
            parts = datetime_parts_of(_datetimes(name, values[name]), col["parts"])
            inputs = col.get("inputs", {})
            for part, tensor in parts.items():
                feeds[inputs.get(part, datetime_input(name, part))] = tensor.reshape(rows, 1)
            continue
        if kind == "number":
            tensor = np.array([_number(name, v) for v in values[name]], dtype=np.float32)
        elif kind == "boolean":
            tensor = np.array([_boolean(name, v) for v in values[name]], dtype=object)
        else:
            tensor = np.array([_string(name, v) for v in values[name]], dtype=object)
        feeds[col.get("input", name)] = tensor.reshape(rows, 1)
    return feeds


def _number_feeds(columns: Columns, values: dict[str, list], rows: int) -> dict[str, np.ndarray]:
    """The number columns' feeds in one numpy conversion when every value is a plain JSON
    number (the common case, and most of a single-row request's cost when done value by
    value); {} otherwise, and the per-value path types each value and names a bad one."""
    numbers = [c for c in columns if c["type"] == "number"]
    if not numbers:
        return {}
    raw = [values[c["name"]] for c in numbers]
    if not all(type(v) is float or type(v) is int for column in raw for v in column):  # bool is no number
        return {}
    try:
        matrix = np.array(raw, dtype=np.float64)
    except (OverflowError, ValueError):  # an integer beyond float range: the slow path says which
        return {}
    if not (np.abs(matrix) <= FLOAT32_MAX).all():  # NaN never passes <=: let the slow path decide
        return {}
    # (columns, rows, 1): iterating the first axis yields each column's contiguous (rows, 1) feed.
    tensors = matrix.astype(np.float32).reshape(len(numbers), rows, 1)
    return dict(zip([c.get("input", c["name"]) for c in numbers], tensors))


def number_matrix(rows: list, width: int) -> np.ndarray | None:
    """(rows, width) float32 from rows of JSON numbers and nulls (missing), in one numpy
    conversion: the columnar fast path of a model whose columns are all numbers. None when
    a value is anything else (a string, out of float32 range): the per-value path then
    converts or names it. Booleans must be ruled out by the caller: numpy reads true as 1."""
    try:
        matrix = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    if matrix.ndim != 2 or matrix.shape[1] != width:
        return None
    if not (np.abs(matrix[~np.isnan(matrix)]) <= FLOAT32_MAX).all():
        return None
    return matrix.astype(np.float32)


# --- records and feature rows -> columns -----------------------------------------------------


def columns_from_records(columns: Columns, records: Any, ignored: frozenset[str] = frozenset()) -> dict[str, list]:
    names = [c["name"] for c in columns]
    return dict(zip(names, map(list, zip(*rows_from_records(columns, records, ignored)))))


def rows_from_records(columns: Columns, records: Any, ignored: frozenset[str] = frozenset()) -> list:
    """Each record's values in schema order (a tuple per record), after checking the records.

    `ignored`: names a record may also carry, whose values are dropped (the uploaded columns the
    model does not take: its target, the columns preprocess dropped); any other name is unknown."""
    if not isinstance(records, list) or not records:
        raise InvalidInput("'records' must be a non-empty list of objects")
    if len(records) > MAX_ROWS:
        raise TooManyRows(f"at most {MAX_ROWS} records per request, got {len(records)}")
    names = [c["name"] for c in columns]
    known = set(names)
    accepted: set[str] | None = None  # known | ignored, made only when a record has more than known
    for i, record in enumerate(records):
        if type(record) is dict and len(record) == len(known) and known.issuperset(record):
            continue  # exactly the model's columns: the usual case, checked in one step
        if ignored and type(record) is dict:
            if accepted is None:
                accepted = known | ignored
            if accepted.issuperset(record) and record.keys() >= known:
                continue  # a row as uploaded: every column, and some the model ignores
        if not isinstance(record, dict):
            raise InvalidInput(f"records[{i}] must be an object of column: value")
        missing = [n for n in names if n not in record]
        if missing:
            raise InvalidInput(f"records[{i}] lacks column(s) {', '.join(missing)}; send null for an unknown value")
        unknown = [k for k in record if k not in known and k not in ignored]
        if unknown:
            raise InvalidInput(f"records[{i}] has unknown column(s) {', '.join(map(str, unknown))}; expected {', '.join(names)}")
    if len(names) == 1:  # itemgetter of one name gives the value, not a tuple
        return [(record[names[0]],) for record in records]
    return list(map(operator.itemgetter(*names), records))  # one C call per record


def columns_from_features(columns: Columns, rows: Any) -> dict[str, list]:
    rows = rows_from_features(columns, rows)
    return {c["name"]: [row[j] for row in rows] for j, c in enumerate(columns)}


def rows_from_features(columns: Columns, rows: Any) -> list:
    """`features` rows, checked to be lists of one value per column."""
    if not isinstance(rows, list) or not rows:
        raise InvalidInput("'features' must be a non-empty list of rows")
    if len(rows) > MAX_ROWS:
        raise TooManyRows(f"at most {MAX_ROWS} rows per request, got {len(rows)}")
    width = len(columns)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            names = ", ".join(c["name"] for c in columns)
            raise InvalidInput(f"features[{i}] must be a list of {width} values in schema order: {names}")
    return rows
