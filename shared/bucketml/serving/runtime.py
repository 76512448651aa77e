"""Serving ONNX versions: input validation, onnxruntime sessions, and hot reload.

Imports numpy and onnxruntime only (never sklearn, never pickle): this is the predict
function's whole model stack, and its start-up time is the cold start users wait for.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import orjson

from bucketml.onnx_guard import refuse_external_data
from bucketml.registry.model_registry import Registry, RegistryError, check_model_name
from bucketml.storage import InvalidObjectName, NotFound, StorageError

log = logging.getLogger("bucketml.serving")

MAX_ROWS = 10_000
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the models take float32
VERSION_CACHE = 8  # explicitly requested (non-current) versions kept loaded per replica
RETRY_FAILED_SECONDS = 30.0  # a version that failed to load is tried again this often, not every poll
# A look at the pointers that has not come back after this long (a storage client retrying through
# an outage, a hung mount) shows in readiness as the bucket being unreachable, until it comes back.
STALLED_SECONDS = 3.0


class InputError(ValueError):
    """The request is wrong; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class UnknownModel(InputError):
    def __init__(self, message: str):
        super().__init__(message, 404)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body's JSON object. orjson first (fast); Python's json as the fallback,
    because clients built on it (tritonclient's JSON mode among them) send NaN for a missing
    number, which strict JSON has no spelling for."""
    try:
        body = orjson.loads(raw)
    except (ValueError, RecursionError) as exc:  # orjson refuses nesting deeper than 1024
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise InputError(f"request body is not valid JSON: {exc}", 400) from None
    if not isinstance(body, dict):
        raise InputError("request body must be a JSON object", 400)
    return body


def onnxruntime():
    """Imported on first use, not at module import: functions-framework imports the function
    in gunicorn's master before forking the worker, and an onnxruntime loaded before a fork
    hangs or aborts when the worker exits."""
    import onnxruntime

    return onnxruntime


def new_session(onnx_bytes: bytes):
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
        raise InputError(f"column '{column}' expects a number or null, got {json.dumps(value)[:40]}")
    if math.isnan(number):
        return number  # NaN is how a missing number is spelled, too
    if abs(number) > FLOAT32_MAX:
        raise InputError(f"column '{column}' expects a number within float32 range, got {json.dumps(value)[:40]}")
    return number


def _string(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # the same spelling training used for numeric-looking categories
    if isinstance(value, (str, int, float, bool)):
        return str(value).strip()
    raise InputError(f"column '{column}' expects a string or null, got {type(value).__name__}")


# --- booleans and datetimes: the SAME code types training data (bucketml.columns) and requests ---

BOOLEAN_TRUE = frozenset({"true", "yes", "t", "y"})
BOOLEAN_FALSE = frozenset({"false", "no", "f", "n"})
DATETIME_PARTS = ("year", "month", "day", "dayofweek", "hour")
# ISO 8601 as numpy parses it: a date, optionally a time ('T' or a space), optionally a zone.
ISO_DATETIME = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})(?P<time>[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?"
    r"(?P<zone>Z|[+-]\d{2}:?\d{2})?$"
)


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


def _boolean(column: str, value: Any) -> str:
    label = boolean_label(value)
    if label is None:
        raise InputError(f"column '{column}' expects true or false (or yes/no), or null, got {json.dumps(value, default=str)[:40]}")
    return label


def _datetimes(column: str, values: list) -> np.ndarray:
    stamps = parse_datetimes(values)
    for value, stamp in zip(values, stamps):
        if np.isnat(stamp) and not (value is None or (isinstance(value, str) and not value.strip())):
            raise InputError(
                f"column '{column}' expects an ISO 8601 date or time such as 2024-05-01 or 2024-05-01T10:30:00, "
                f"or null, got {json.dumps(value, default=str)[:40]}"
            )
    return stamps


def feeds_from_columns(columns: list[dict], values: dict[str, list], rows: int) -> dict[str, np.ndarray]:
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


def _number_feeds(columns: list[dict], values: dict[str, list], rows: int) -> dict[str, np.ndarray]:
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


def columns_from_records(columns: list[dict], records: Any) -> dict[str, list]:
    names = [c["name"] for c in columns]
    return dict(zip(names, map(list, zip(*rows_from_records(columns, records)))))


def rows_from_records(columns: list[dict], records: Any) -> list:
    """Each record's values in schema order (a tuple per record), after checking the records."""
    if not isinstance(records, list) or not records:
        raise InputError("'records' must be a non-empty list of objects")
    if len(records) > MAX_ROWS:
        raise InputError(f"at most {MAX_ROWS} records per request, got {len(records)}", 413)
    names = [c["name"] for c in columns]
    known = set(names)
    for i, record in enumerate(records):
        if type(record) is dict and len(record) == len(known) and known.issuperset(record):
            continue  # exactly the model's columns: the usual case, checked in one step
        if not isinstance(record, dict):
            raise InputError(f"records[{i}] must be an object of column: value")
        missing = [n for n in names if n not in record]
        if missing:
            raise InputError(f"records[{i}] lacks column(s) {', '.join(missing)}; send null for an unknown value")
        unknown = [k for k in record if k not in known]
        if unknown:
            raise InputError(f"records[{i}] has unknown column(s) {', '.join(map(str, unknown))}; expected {', '.join(names)}")
    if len(names) == 1:  # itemgetter of one name gives the value, not a tuple
        return [(record[names[0]],) for record in records]
    return list(map(operator.itemgetter(*names), records))  # one C call per record


def columns_from_features(columns: list[dict], rows: Any) -> dict[str, list]:
    rows = rows_from_features(columns, rows)
    return {c["name"]: [row[j] for row in rows] for j, c in enumerate(columns)}


def rows_from_features(columns: list[dict], rows: Any) -> list:
    """`features` rows, checked to be lists of one value per column."""
    if not isinstance(rows, list) or not rows:
        raise InputError("'features' must be a non-empty list of rows")
    if len(rows) > MAX_ROWS:
        raise InputError(f"at most {MAX_ROWS} rows per request, got {len(rows)}", 413)
    width = len(columns)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            names = ", ".join(c["name"] for c in columns)
            raise InputError(f"features[{i}] must be a list of {width} values in schema order: {names}")
    return rows


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


class LoadedModel:
    """One version with its onnxruntime session, ready to answer."""

    def __init__(self, model: str, version: int, card: dict, onnx_bytes: bytes):
        self.model, self.version, self.card = model, version, card
        self.columns = card["schema"]["columns"]
        self.task = card["schema"]["task"]
        self.classes = card["schema"].get("classes", [])
        self.session = new_session(onnx_bytes)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Every column a number: requests can take the columnar fast path (number_matrix).
        self.numbers_only = all(c["type"] == "number" for c in self.columns)
        self._inputs = [c.get("input", c["name"]) for c in self.columns]
        # Prove it answers before anyone relies on it: one row with every value missing.
        self.predict({c["name"]: [None] for c in self.columns}, 1)

    def predict(self, values: dict[str, list], rows: int) -> dict[str, Any]:
        return self._answer(self.session.run(self.output_names, feeds_from_columns(self.columns, values, rows)))

    def predict_matrix(self, matrix: np.ndarray) -> dict[str, Any]:
        """Score a (rows, columns) float32 matrix of a numbers-only model (see number_matrix)."""
        rows, width = matrix.shape
        tensors = np.ascontiguousarray(matrix.T).reshape(width, rows, 1)  # one contiguous feed per column
        return self._answer(self.session.run(self.output_names, dict(zip(self._inputs, tensors))))

    def _answer(self, outputs: list) -> dict[str, Any]:
        answer: dict[str, Any] = {"model": self.model, "version": self.version}
        if self.task == "classification":
            answer["predictions"] = [str(v) for v in outputs[0].tolist()]
            answer["probabilities"] = np.round(outputs[1].astype(np.float64), 6).tolist()
            answer["classes"] = self.classes
        else:
            answer["predictions"] = outputs[0].reshape(-1).astype(np.float64).tolist()
        return answer


class ModelManager:
    """Which versions this replica serves; follows each model's current pointer.

    A poll of the pointers' generations (metadata only) every `poll_seconds` makes every
    replica pick up a new version even though a published event reaches only one of them.
    A new version is loaded and checked before it replaces the old one; until then, and if
    loading fails, the old one keeps serving.
    """

    def __init__(self, registry: Registry, poll_seconds: float = 1.0):
        self.registry = registry
        self.poll_seconds = poll_seconds
        self._current: dict[str, LoadedModel] = {}
        self._generations: dict[str, int] = {}
        self._pinned: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._errors: dict[str, str] = {}
        self._failed: dict[str, tuple[int, float]] = {}  # model -> (pointer generation, when it failed)
        self._outage: str | None = None  # why the bucket cannot be read now; what is loaded serves on
        self._asking_since: float | None = None  # when the look at the pointers under way began
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._watcher_pid: int | None = None
        self._first_look = threading.Event()

    # Threads do not survive fork (gunicorn forks its workers after importing the function),
    # so the watcher starts in the process that serves requests: right after the fork when
    # the function registers start() with os.register_at_fork (the models load while the
    # server boots), else on the first request.
    def start(self) -> None:
        """Start the watcher, whose first act is loading every current version (returns at once)."""
        with self._lock:
            if self._watcher_pid == os.getpid():
                return
            self._watcher_pid = os.getpid()
            self._first_look = threading.Event()
        threading.Thread(target=self._watch, name="bucketml-pointer-watch", daemon=True).start()

    def ensure_watching(self, timeout: float = 60.0) -> None:
        """Started, and the first look at the pointers done (requests wait for it once)."""
        if self._watcher_pid != os.getpid():
            self.start()
        self._first_look.wait(timeout)

    def _watch(self) -> None:
        first = True
        while True:
            try:
                self.refresh()
            except Exception:  # a bucket hiccup must not kill the watcher; the old model serves on
                log.exception("refreshing models failed")
            if first:  # even after a failure: requests then get a clear "not served" answer
                self._first_look.set()
                first = False
            time.sleep(self.poll_seconds)

    def refresh(self, model: str | None = None) -> None:
        with self._refresh_lock:
            try:
                models = [model] if model else self._ask(self.registry.models)
            except StorageError as exc:
                return self._unreachable(exc)
            for name in models:
                generation, version = 0, None
                try:
                    generation = self._ask(self.registry.pointer_generation, name)
                    if generation == 0 or generation == self._generations.get(name):
                        continue
                    failed = self._failed.get(name)
                    if model is None and failed and failed[0] == generation and time.monotonic() - failed[1] < RETRY_FAILED_SECONDS:
                        continue  # the same broken version: retried now and then (and on /reload), not every poll
                    pointer = self.registry.current(name)
                    version = pointer.version
                    loaded = self._current.get(name)
                    if pointer.version is not None and (loaded is None or loaded.version != pointer.version):
                        fresh = self._load(name, pointer.version)
                        with self._lock:
                            self._current[name] = fresh
                        log.info("serving %s version %s", name, pointer.version)
                    self._generations[name] = pointer.generation
                    self._errors.pop(name, None)
                    self._failed.pop(name, None)
                except Exception as exc:  # a bad version must never take down what is serving
                    if isinstance(exc, StorageError) and not isinstance(exc, (NotFound, InvalidObjectName)):
                        return self._unreachable(exc)  # the bucket, not the version: no verdict on the version
                    message = f"version {version}: {exc}" if version is not None else str(exc)
                    if self._errors.get(name) != message:
                        log.error("could not load the current version of %s (%s); the previous one keeps serving", name, message)
                    self._errors[name] = message
                    self._failed[name] = (generation, time.monotonic())
            if self._outage is not None:
                log.info("the bucket answers again; following the current versions as before")
                self._outage = None

    def _ask(self, question, *args):
        """A look at the bucket's metadata, timed so that errors() can tell one that hangs."""
        self._asking_since = time.monotonic()
        try:
            return question(*args)
        finally:
            self._asking_since = None

    def _unreachable(self, exc: StorageError) -> None:
        """The bucket cannot be read (an outage, a moved folder): keep serving what is loaded,
        say why in readiness (errors), log it once, and look again at the next poll."""
        message = f"cannot reach the bucket to look for a new version, serving what is loaded: {exc}"
        if self._outage is None:
            log.error("%s (%d model(s) loaded)", message, len(self._current))
        self._outage = message

    def _load(self, model: str, version: int) -> LoadedModel:
        card = self.registry.card(model, version)
        return LoadedModel(model, version, card, self.registry.model_bytes(model, version))

    def ready(self) -> bool:
        return bool(self._current)

    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._current)

    def errors(self) -> dict[str, str]:
        errors = dict(self._errors)
        outage, asking = self._outage, self._asking_since
        if outage is None and asking is not None and time.monotonic() - asking > STALLED_SECONDS:
            waited = time.monotonic() - asking
            outage = f"cannot reach the bucket to look for a new version, serving what is loaded: no answer for {waited:.0f}s"
        if outage is not None:  # every loaded model is stuck on its version until the bucket answers
            for name in self._current:
                errors.setdefault(name, outage)
        return errors

    def get(self, model: str | None, version: int | None = None) -> LoadedModel:
        current = self._current
        if model is None:
            if not current:
                if self._outage is not None:
                    raise InputError(f"no model is loaded yet: {self._outage}", 503)
                raise InputError("no model is being served yet; upload a dataset first", 503)
            if len(current) > 1:
                raise InputError(f"several models are served ({', '.join(sorted(current))}); name one with 'model'", 400)
            model = next(iter(current))  # the only one; a requested version still applies
        served = current.get(model)
        if version is None or (served is not None and served.version == version):
            if served is None:
                raise UnknownModel(f"model '{model}' is not served; served models: {', '.join(sorted(current)) or 'none'}")
            return served
        return self._pinned_version(model, version)

    def _pinned_version(self, model: str, version: int) -> LoadedModel:
        key = (model, version)
        with self._lock:
            if key in self._pinned:
                self._pinned.move_to_end(key)
                return self._pinned[key]
        if not 0 <= version < 2**63:  # no stored version; a 300-digit one would be a path segment too long to look up
            raise UnknownModel(f"model '{model}' has no version {version}")
        try:
            check_model_name(model)  # never a storage path from an arbitrary string
            loaded = self._load(model, version)
        except RegistryError as exc:
            raise UnknownModel(str(exc)) from None
        except NotFound:
            raise UnknownModel(f"model '{model}' has no version {version}") from None
        except StorageError as exc:
            if not isinstance(exc, InvalidObjectName):  # not a symlink leading outside: an outage
                raise InputError(f"the bucket is unavailable: {exc}", 503) from None
            raise InputError(f"model '{model}' version {version} cannot be served: {exc}", 409) from None
        except Exception as exc:  # stored but not loadable (refused external data, corrupt): no retry helps
            raise InputError(f"model '{model}' version {version} cannot be served: {exc}", 409) from None
        with self._lock:
            self._pinned[key] = loaded
            while len(self._pinned) > VERSION_CACHE:
                self._pinned.popitem(last=False)
        return loaded
