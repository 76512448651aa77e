"""The dataset spec: what a user can say about a dataset and the training made from it.

Two sources, per field in this order of precedence:

1. the upload object's custom metadata (`bucketml upload --target/--task/--set KEY=VALUE`,
   `gsutil -h x-goog-meta-KEY:VALUE`): strings, parsed per field (lists comma-separated or a
   JSON list, numbers, `true`/`false`); keys that are not spec fields are ignored (GCS
   metadata carries other things too) and an empty value counts as not set;
2. the optional object `datasets/<model>/bucketml.yaml`: a YAML mapping, where an unknown
   key is an error (it is almost always a typo);
3. `DEFAULTS` (and, for the target, the column-name conventions in `dataset.find_target`).

Both sources are validated with the JSON Schema `SCHEMA` (jsonschema). Anything wrong is a
`Rejection("spec_invalid", ...)` whose message names the source and the field. Whether the
`metric` and `algorithms` fit the task is known only once the task is detected:
`check_for_task` (or `check_metric`) raises the same rejection then.

Imports no machine-learning library: the CLI validates `--set` values with it.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
from typing import Any

import yaml

from bucketml.contracts.rejections import Rejection
from bucketml.storage import NotFound, Storage

SPEC_FILE = "bucketml.yaml"
METADATA = "object metadata"  # the source label of values that came from the object's metadata
DEFAULT = "default"

TASKS = ("auto", "classification", "regression")
# Candidate names per task, as bucketml.training.estimators() builds them (a test keeps the two equal).
ALGORITHMS = {
    "classification": ("svm", "random_forest", "logistic_regression", "gradient_boosting"),
    "regression": ("svm", "random_forest", "ridge", "gradient_boosting"),
}
ALL_ALGORITHMS = ("svm", "random_forest", "logistic_regression", "ridge", "gradient_boosting")
METRICS = {
    "classification": ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss"),
    "regression": ("r2", "rmse", "mae"),
}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "r2"}
LOWER_IS_BETTER = frozenset({"rmse", "mae", "log_loss"})
# Computed from the predicted class probabilities (roc_auc: one-vs-rest macro when multiclass).
PROBABILITY_METRICS = frozenset({"roc_auc", "log_loss"})
PROMOTION = ("always", "if_better")

# Every field with its value when neither source sets it. None means "decided from the data":
# target by the column-name conventions, algorithms = every candidate of the task, metric =
# DEFAULT_METRIC of the task, columns = the file's header row.
DEFAULTS: dict[str, Any] = {
    "target": None,
    "task": "auto",
    "drop": [],
    "id": [],
    "algorithms": None,
    "metric": None,
    "test_size": 0.2,
    "promotion": "always",
    "max_training_seconds": 600,
    "header": "auto",
    "columns": None,
}

_COLUMN_NAME = {"type": "string", "minLength": 1}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://bucketml.dev/schemas/dataset-spec.json",
    "title": "bucketml dataset spec (datasets/<model>/bucketml.yaml, or the upload's object metadata)",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "target": {
            **_COLUMN_NAME,
            "description": "The column to predict. Default: a column named target, label, class or y.",
        },
        "task": {
            "enum": list(TASKS),
            "default": DEFAULTS["task"],
            "description": "auto: classification for strings, booleans and integers with at most 20 values; else regression.",
        },
        "drop": {
            "type": "array",
            "items": _COLUMN_NAME,
            "default": DEFAULTS["drop"],
            "description": "Columns that are not features.",
        },
        "id": {
            "type": "array",
            "items": _COLUMN_NAME,
            "default": DEFAULTS["id"],
            "description": "Columns that identify rows; never features.",
        },
        "algorithms": {
            "type": "array",
            "items": {"enum": list(ALL_ALGORITHMS)},
            "minItems": 1,
            "uniqueItems": True,
            "description": "Candidates to train (default: all of the task's). Classification: "
            + ", ".join(ALGORITHMS["classification"]) + "; regression: " + ", ".join(ALGORITHMS["regression"]) + ".",
        },
        "metric": {
            "enum": [m for task in ("classification", "regression") for m in METRICS[task]],
            "description": "Metric that chooses the best candidate and its settings (3-fold cross-validation on the "
            "training rows) and compares versions (on the held-out rows). Classification: "
            + ", ".join(METRICS["classification"]) + " (default accuracy; log_loss: lower is better); regression: "
            + ", ".join(METRICS["regression"]) + " (default r2; rmse and mae: lower is better).",
        },
        "test_size": {
            "type": "number",
            "minimum": 0.05,
            "maximum": 0.5,
            "default": DEFAULTS["test_size"],
            "description": "Share of the rows held out for testing.",
        },
        "promotion": {
            "enum": list(PROMOTION),
            "default": DEFAULTS["promotion"],
            "description": "always: a new version becomes current; if_better: only if it beats the current "
            "version on the new held-out rows (by the metric).",
        },
        "max_training_seconds": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": DEFAULTS["max_training_seconds"],
            "description": "Budget for the candidates' cross-validated hyperparameter search and refits; once "
            "spent, the search stops at the best setting found so far and candidates not started are skipped. "
            "The first candidate always runs.",
        },
        "header": {
            "enum": ["auto", True, False],
            "default": DEFAULTS["header"],
            "description": "Whether the file's first row is a header; false for files without one.",
        },
        "columns": {
            "type": "array",
            "items": _COLUMN_NAME,
            "minItems": 1,
            "uniqueItems": True,
            "description": "Names for the columns of a file without a header row, in file order.",
        },
    },
}
FIELDS = tuple(SCHEMA["properties"])
LIST_FIELDS = frozenset({"drop", "id", "algorithms", "columns"})
NUMBER_FIELDS = frozenset({"test_size", "max_training_seconds"})


# --- reading --------------------------------------------------------------------------------


def spec_file(model: str) -> str:
    return f"datasets/{model}/{SPEC_FILE}"


def effective_spec(storage: Storage, model: str, metadata: dict[str, str] | None) -> dict[str, Any]:
    """Every field with defaults filled, plus `target_origin` ("object metadata", "spec" or
    None) and `origins` (field -> "object metadata", the spec file's name or "default").

    Raises Rejection("spec_invalid", ...) naming the source and the field.
    """
    name = spec_file(model)
    from_file = read_spec_file(storage, model)
    from_metadata = spec_from_metadata(metadata or {})
    return merge(from_metadata, from_file, name)


def read_spec_file(storage: Storage, model: str) -> dict[str, Any]:
    """The validated content of `datasets/<model>/bucketml.yaml`, {} if there is none."""
    name = spec_file(model)
    try:
        raw = storage.read(name)
    except NotFound:
        return {}
    return parse_spec_file(raw, name)


def parse_spec_file(raw: bytes | str, name: str = SPEC_FILE) -> dict[str, Any]:
    try:
        data = yaml.load(raw, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise Rejection("spec_invalid", f"{name} is not valid YAML: {_yaml_problem(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Rejection(
            "spec_invalid",
            f"{name} must be a mapping of settings, e.g. 'target: price' (got a {type(data).__name__})",
        )
    validate(data, name)
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what and where (PyYAML's own text spans lines and names '<byte string>')."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = exc.problem_mark or exc.context_mark
        text = ": ".join(part for part in (exc.context, exc.problem) if part)
        return text + (f" (line {where.line + 1}, column {where.column + 1})" if where else "")
    return " ".join(str(exc).split())


def spec_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The spec fields among an object's custom metadata, parsed and validated.

    Keys are matched case-insensitively, with '-' read as '_' (`x-goog-meta-test-size`).
    """
    found: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for raw_key, raw_value in metadata.items():
        key = str(raw_key).strip().lower().replace("-", "_")
        if key not in FIELDS:
            continue
        value = "" if raw_value is None else str(raw_value).strip()
        if not value:
            continue  # an empty value is "not set"
        if key in keys:
            raise Rejection(
                "spec_invalid", f"{METADATA} sets '{key}' twice ('{keys[key]}' and '{raw_key}'); keep one"
            )
        keys[key] = str(raw_key)
        found[key] = _parse_metadata_value(key, value)
    validate(found, METADATA)
    return found


def _parse_metadata_value(key: str, value: str) -> Any:
    if key in LIST_FIELDS:
        if value.startswith("["):  # a JSON list, for names that contain commas
            try:
                items = json.loads(value)
            except ValueError:
                raise _invalid(METADATA, f"'{key}': {value!r} is not a JSON list; use a,b,c or [\"a\", \"b\"]") from None
            if not isinstance(items, list):
                raise _invalid(METADATA, f"'{key}': {value!r} is not a list")
            return items
        return [item.strip() for item in value.split(",") if item.strip()]
    if key in NUMBER_FIELDS:
        try:
            return float(value)
        except ValueError:
            raise _invalid(METADATA, f"'{key}': {value!r} is not a number") from None
    if key == "header":
        lowered = value.lower()
        return {"true": True, "false": False, "auto": "auto"}.get(lowered, value)
    return value


def merge(from_metadata: dict[str, Any], from_file: dict[str, Any], file_name: str) -> dict[str, Any]:
    """Per field: object metadata, then the spec file, then DEFAULTS."""
    spec = copy.deepcopy(DEFAULTS)
    origins = {}
    for field in FIELDS:
        if field in from_metadata:
            spec[field], origins[field] = copy.deepcopy(from_metadata[field]), METADATA
        elif field in from_file:
            spec[field], origins[field] = copy.deepcopy(from_file[field]), file_name
        else:
            origins[field] = DEFAULT
    for field in NUMBER_FIELDS:  # 600.0 from metadata and 600 from YAML are the same setting
        if isinstance(spec[field], float) and spec[field].is_integer():
            spec[field] = int(spec[field])
    spec["target_origin"] = {METADATA: "object metadata", DEFAULT: None}.get(origins["target"], "spec")
    spec["origins"] = origins
    return spec


def with_defaults(spec: dict[str, Any] | None) -> dict[str, Any]:
    """A stored effective spec (schema.json, card) with any missing field filled from DEFAULTS,
    so data prepared before a field existed still trains."""
    filled = copy.deepcopy(DEFAULTS)
    filled.update(spec or {})
    return filled


# --- validation -----------------------------------------------------------------------------


def validate(data: dict[str, Any], source: str) -> None:
    """Raise Rejection("spec_invalid") naming `source` and every bad field."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    messages = [_describe(error) for error in errors]
    for field in NUMBER_FIELDS:
        value = data.get(field)
        if isinstance(value, float) and not math.isfinite(value):
            messages.append(f"'{field}' must be a finite number (got {value})")
    if messages:
        raise _invalid(source, "; ".join(dict.fromkeys(messages)))


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema  # ~0.15 s; only when a spec is validated

    cls = jsonschema.validators.validator_for(SCHEMA)
    cls.check_schema(SCHEMA)
    return cls(SCHEMA)


def _invalid(source: str, detail: str) -> Rejection:
    prefix = f"{METADATA} " if source == METADATA else f"{source}: "
    return Rejection("spec_invalid", prefix + detail)


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _choices(values) -> str:
    return ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)


TYPE_WORDS = {"string": "a string", "number": "a number", "array": "a list", "object": "a mapping"}


def _describe(error) -> str:
    path = list(error.absolute_path)
    kind, expected, value = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties":
        unknown = [k for k in value if k not in SCHEMA["properties"]]
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            parts.append(f"unknown key {str(key)!r}" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return "; ".join(parts) + f"; the keys are {', '.join(FIELDS)}"
    if kind == "type" and not path:
        return f"must be a mapping of settings (got {type(value).__name__})"
    field = str(path[0]) if path else "?"
    item = len(path) > 1
    if kind == "type":
        if item:
            return f"'{field}': {_got(value)} is not {TYPE_WORDS.get(expected, expected)}"
        return f"'{field}' must be {TYPE_WORDS.get(expected, expected)} (got {_got(value)})"
    if kind == "enum":
        if item:
            return f"'{field}': {_got(value)} is not one of {_choices(expected)}"
        return f"'{field}' must be one of {_choices(expected)} (got {_got(value)})"
    if kind == "minimum":
        return f"'{field}' must be at least {expected} (got {_got(value)})"
    if kind == "maximum":
        return f"'{field}' must be at most {expected} (got {_got(value)})"
    if kind == "exclusiveMinimum":
        return f"'{field}' must be greater than {expected} (got {_got(value)})"
    if kind == "minLength":
        return f"'{field}': names must be non-empty strings" if item else f"'{field}' must be a non-empty string"
    if kind == "minItems":
        return f"'{field}' must list at least one name (got an empty list)"
    if kind == "uniqueItems":
        seen, repeated = set(), []
        for v in value:
            key = json.dumps(v, sort_keys=True, default=str)
            if key in seen:
                repeated.append(v)
            seen.add(key)
        return f"'{field}' lists {_got(repeated[0]) if repeated else 'a name'} more than once"
    return f"'{field}': {error.message}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # an unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears more than once", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# --- what depends on the task ---------------------------------------------------------------


def _source_prefix(spec: dict[str, Any], field: str) -> str:
    source = (spec.get("origins") or {}).get(field) or "the dataset spec"
    return f"{METADATA} " if source == METADATA else f"{source}: "


def check_metric(spec: dict[str, Any], task: str) -> None:
    """A `metric` of the other task is spec_invalid (known only once the task is detected)."""
    metric = spec.get("metric")
    if metric is None or metric in METRICS[task]:
        return
    other = "regression" if task == "classification" else "classification"
    raise Rejection(
        "spec_invalid",
        f"{_source_prefix(spec, 'metric')}'metric' {metric!r} is a {other} metric but the task is {task}; "
        f"use one of {', '.join(METRICS[task])}, or set task: {other} if the target should be treated so",
    )


def check_algorithms(spec: dict[str, Any], task: str) -> None:
    """Every named algorithm must exist for the detected task."""
    wrong = [name for name in spec.get("algorithms") or () if name not in ALGORITHMS[task]]
    if wrong:
        raise Rejection(
            "spec_invalid",
            f"{_source_prefix(spec, 'algorithms')}'algorithms': {', '.join(map(repr, wrong))} "
            + (f"is not a {task} algorithm" if len(wrong) == 1 else f"are not {task} algorithms")
            + f"; use {', '.join(ALGORITHMS[task])}",
        )


def check_for_task(spec: dict[str, Any], task: str) -> None:
    check_metric(spec, task)
    check_algorithms(spec, task)


def metric_for(spec: dict[str, Any], task: str) -> str:
    return spec.get("metric") or DEFAULT_METRIC[task]


def algorithms_for(spec: dict[str, Any], task: str) -> list[str]:
    return list(spec.get("algorithms") or ALGORITHMS[task])


def better(metric: str, score: float, than: float) -> bool:
    """Strictly better by `metric` (rmse, mae and log_loss: lower is better)."""
    return score < than if metric in LOWER_IS_BETTER else score > than
