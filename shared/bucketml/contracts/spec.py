"""The dataset spec: what a user can say about a dataset and the training made from it.

Two sources, per field in this order of precedence:

1. the upload object's custom metadata (`bucketml upload --target/--task/--set KEY=VALUE`,
   `gsutil -h x-goog-meta-KEY:VALUE`): strings, parsed per field (lists comma-separated or a
   JSON list, numbers, `true`/`false`); keys that are not spec fields are ignored (GCS
   metadata carries other things too) and an empty value counts as not set;
2. the optional object `datasets/<model>/bucketml.yaml`: a YAML mapping, where an unknown
   key is an error (it is almost always a typo);
3. the model's defaults (and, for the target, the column-name conventions of
   `bucketml.training.preparation.find_target`).

Both sources are validated by the pydantic model `DatasetSpec`; its JSON Schema (`SCHEMA`)
is generated from it. Anything wrong is a `Rejection("spec_invalid", ...)` whose message names
the source and the field (docs/datasets.md). Whether the `metric` and `algorithms` fit the
task is known only once the task is detected: `EffectiveSpec.check_for_task` raises the same
rejection then.

Pure: the caller reads bucketml.yaml from the bucket (the preprocess step) and hands over its
bytes. Imports no machine-learning library: the CLI validates `--set` values with it.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
)
from pydantic_core import PydanticCustomError

from bucketml.contracts.rejections import Rejection

SPEC_FILE = "bucketml.yaml"
METADATA = "object metadata"  # the source label of values that came from the object's metadata
DEFAULT = "default"

Task = Literal["auto", "classification", "regression"]
Algorithm = Literal["svm", "random_forest", "logistic_regression", "ridge", "gradient_boosting"]
Metric = Literal["accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "r2", "rmse", "mae"]
Promotion = Literal["always", "if_better", "canary"]
Header = Literal["auto", True, False]

TASKS: tuple[str, ...] = get_args(Task)
ALL_ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
PROMOTION: tuple[str, ...] = get_args(Promotion)
# Candidate names per task, as bucketml.training.candidates.estimators() builds them (a test keeps the two equal).
ALGORITHMS = {
    "classification": ("svm", "random_forest", "logistic_regression", "gradient_boosting"),
    "regression": ("svm", "random_forest", "ridge", "gradient_boosting"),
}
METRICS = {
    "classification": ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss"),
    "regression": ("r2", "rmse", "mae"),
}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "r2"}
# The imbalance rule: a classification target is imbalanced when its largest class has at least
# this many times the training rows of its smallest (training.candidates.imbalanced); its
# default metric is then balanced_accuracy (default_metric).
IMBALANCE_RATIO = 3.0
LOWER_IS_BETTER = frozenset({"rmse", "mae", "log_loss"})
# Computed from the predicted class probabilities (roc_auc: one-vs-rest macro when multiclass).
PROBABILITY_METRICS = frozenset({"roc_auc", "log_loss"})

LIST_FIELDS = frozenset({"drop", "id", "algorithms", "columns"})
NUMBER_FIELDS = frozenset({"test_size", "max_training_seconds", "canary_percent", "canary_min_requests",
                           "drift_threshold"})
WHOLE_NUMBER_FIELDS = frozenset({"canary_percent", "canary_min_requests"})
NULLABLE_FIELDS = ("target", "algorithms", "metric", "columns")  # None: "decided from the data"


def _no_repeats(names: list[Any]) -> list[Any]:
    """A JSON Schema `uniqueItems` that pydantic has no constraint for."""
    seen: set[str] = set()
    for name in names:
        key = json.dumps(name, sort_keys=True, default=str)
        if key in seen:
            raise PydanticCustomError("unique_items", "{repeated} is listed more than once", {"repeated": name})
        seen.add(key)
    return names


ColumnName = Annotated[str, Field(min_length=1)]
Names = list[ColumnName]
UniqueNames = Annotated[list[ColumnName], Field(min_length=1, json_schema_extra={"uniqueItems": True}), AfterValidator(_no_repeats)]
Algorithms = Annotated[list[Algorithm], Field(min_length=1, json_schema_extra={"uniqueItems": True}), AfterValidator(_no_repeats)]


def _from_metadata(info: ValidationInfo) -> bool:
    """Whether the values being validated are object-metadata strings (see `spec_from_metadata`)."""
    return bool(info.context and info.context.get("source") == METADATA)


def _from_a_source(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("source"))


class DatasetSpec(BaseModel):
    """Every spec field with its value when no source sets it. None means "decided from the
    data": target by the column-name conventions, algorithms = every candidate of the task,
    metric = DEFAULT_METRIC of the task, columns = the file's header row."""

    # strict: a YAML `test_size: "0.3"` or `header: 1` is a mistake; metadata strings are
    # parsed by the validators below, which only act when the context says they are metadata.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        title="bucketml dataset spec (datasets/<model>/bucketml.yaml, or the upload's object metadata)",
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://bucketml.dev/schemas/dataset-spec.json",
        },
    )

    target: ColumnName | None = Field(
        None, description="The column to predict. Default: a column named target, label, class or y."
    )
    task: Task = Field(
        "auto",
        description="auto: classification for strings, booleans and integers with at most 20 values; else regression.",
    )
    drop: Names = Field([], description="Columns that are not features.")
    id: Names = Field([], description="Columns that identify rows; never features.")
    algorithms: Algorithms | None = Field(
        None,
        description="Candidates to train (default: all of the task's). Classification: "
        + ", ".join(ALGORITHMS["classification"]) + "; regression: " + ", ".join(ALGORITHMS["regression"]) + ".",
    )
    metric: Metric | None = Field(
        None,
        description="Metric that chooses the best candidate and its settings (cross-validation on the "
        "training rows) and compares versions (on held-out rows). Classification: "
        + ", ".join(METRICS["classification"]) + " (default accuracy, or balanced_accuracy when the largest class "
        "has at least " + f"{IMBALANCE_RATIO:g}" + " times the training rows of the smallest; log_loss: lower is better); regression: "
        + ", ".join(METRICS["regression"]) + " (default r2; rmse and mae: lower is better).",
    )
    test_size: float = Field(
        0.2, ge=0.05, le=0.5, allow_inf_nan=False, description="Share of the rows held out for testing."
    )
    promotion: Promotion = Field(
        "always",
        description="always: a new version becomes current; if_better: only if, by the metric, it is not "
        "worse than the current version on either version's held-out rows (beyond a tolerance) and beats "
        "a trivial baseline (docs/datasets.md); canary: a new version starts as the canary of the current "
        "one (canary_percent of unpinned requests) and the monitor promotes or rolls it back from live "
        "figures (docs/architecture.md).",
    )
    canary_percent: int = Field(
        10, ge=1, le=99, description="promotion: canary: the share of unpinned requests a new version answers "
        "until the monitor decides."
    )
    canary_min_requests: int = Field(
        200, ge=1, le=10_000_000, description="promotion: canary: the requests a canary must answer (all "
        "replicas together) before the monitor decides."
    )
    drift_threshold: float = Field(
        0.2, gt=0, le=10, allow_inf_nan=False, description="The population stability index above which a "
        "served input column counts as drifted from the training rows (bucketml.model.drift.v1)."
    )
    max_training_seconds: float = Field(
        600,
        gt=0,
        allow_inf_nan=False,
        description="Budget for the candidates' cross-validated hyperparameter search and refits; once "
        "spent, the search stops at the best setting found so far and candidates not started are skipped. "
        "The first candidate always runs.",
    )
    header: Header = Field(
        "auto", description="Whether the file's first row is a header; false for files without one."
    )
    columns: UniqueNames | None = Field(
        None, description="Names for the columns of a file without a header row, in file order."
    )

    # --- parsing a source ---------------------------------------------------------------

    @field_validator(*NULLABLE_FIELDS, mode="before")
    @classmethod
    def _set_means_a_value(cls, value: Any, info: ValidationInfo) -> Any:
        # null is the default's "decided from the data", not something a source can say.
        if value is None and _from_a_source(info):
            raise PydanticCustomError("null_value", "null is not a value")
        return value

    @field_validator(*LIST_FIELDS, mode="before")
    @classmethod
    def _metadata_list(cls, value: Any, info: ValidationInfo) -> Any:
        if not (_from_metadata(info) and isinstance(value, str)):
            return value
        if value.startswith("["):  # a JSON list, for names that contain commas
            try:
                return json.loads(value)
            except ValueError:
                raise PydanticCustomError("json_list", "not a JSON list") from None
        return [item.strip() for item in value.split(",") if item.strip()]

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _metadata_number(cls, value: Any, info: ValidationInfo) -> Any:
        if not (_from_metadata(info) and isinstance(value, str)):
            return value
        try:
            number = float(value)
        except ValueError:
            raise PydanticCustomError("not_a_number", "not a number") from None
        # Metadata is text: "30" for a whole-number field is 30 (a fraction stays one, and is refused).
        return int(number) if info.field_name in WHOLE_NUMBER_FIELDS and number.is_integer() else number

    @field_validator("header", mode="before")
    @classmethod
    def _header_word(cls, value: Any, info: ValidationInfo) -> Any:
        if _from_metadata(info) and isinstance(value, str):
            return {"true": True, "false": False, "auto": "auto"}.get(value.lower(), value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # Literal[True] would take 1
            raise PydanticCustomError("literal_error", "not one of the choices")
        return value

    # --- the stored form ------------------------------------------------------------------

    @field_serializer(*NUMBER_FIELDS)
    def _whole_numbers_as_int(self, value: float) -> float | int:
        # 600.0 from metadata and 600 from YAML are the same setting, stored as 600.
        return int(value) if isinstance(value, float) and value.is_integer() else value

    # --- what depends on the task -----------------------------------------------------------

    def algorithms_for(self, task: str) -> list[str]:
        return list(self.algorithms or ALGORITHMS[task])


FIELDS: tuple[str, ...] = tuple(DatasetSpec.model_fields)
DEFAULTS: dict[str, Any] = DatasetSpec().model_dump()
SCHEMA: dict[str, Any] = DatasetSpec.model_json_schema()
# The named choices of each enumerated field, in the words a user types (for messages).
CHOICES: dict[str, tuple[Any, ...]] = {
    "task": TASKS, "algorithms": ALL_ALGORITHMS, "metric": get_args(Metric), "promotion": PROMOTION, "header": get_args(Header),
}


class EffectiveSpec(DatasetSpec):
    """The spec in effect for one upload: every field, and where each value came from."""

    target_origin: str | None = None  # "object metadata", "spec" or None (the conventions decide)
    origins: dict[str, str] = Field(default_factory=dict)  # field -> "object metadata", the spec file or "default"

    def as_json(self) -> dict[str, Any]:
        """The form written to schema.json and the model card."""
        return self.model_dump()

    def check_for_task(self, task: str) -> None:
        """A `metric` or an algorithm of the other task is spec_invalid (known only once the task is detected)."""
        check_for_task(self.as_json(), task)


# --- reading the sources --------------------------------------------------------------------


def spec_file(model: str) -> str:
    return f"datasets/{model}/{SPEC_FILE}"


def parse_spec_file(raw: bytes | str, name: str = SPEC_FILE) -> dict[str, Any]:
    """The fields a bucketml.yaml sets, validated; {} for an empty file."""
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
    return _parsed(data, name)


def spec_from_metadata(metadata: Mapping[str, str | None]) -> dict[str, Any]:
    """The spec fields among an object's custom metadata, parsed and validated.

    Keys are matched case-insensitively, with '-' read as '_' (`x-goog-meta-test-size`).
    """
    found: dict[str, str] = {}
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
        found[key] = value
    return _parsed(found, METADATA)


def validate(data: Mapping[str, Any], source: str) -> None:
    """Raise Rejection("spec_invalid") naming `source` and every bad field."""
    _parsed(data, source)


def _parsed(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The fields `data` sets, as the model parsed them."""
    try:
        parsed = DatasetSpec.model_validate(data, context={"source": source})
    except ValidationError as exc:
        raise _invalid(source, "; ".join(dict.fromkeys(_messages(exc, source)))) from None
    return {field: getattr(parsed, field) for field in FIELDS if field in parsed.model_fields_set}


def merge(from_metadata: Mapping[str, Any], from_file: Mapping[str, Any], file_name: str) -> EffectiveSpec:
    """Per field: object metadata, then the spec file, then the defaults."""
    origins = {
        field: METADATA if field in from_metadata else file_name if field in from_file else DEFAULT for field in FIELDS
    }
    target_origin = {METADATA: "object metadata", DEFAULT: None}.get(origins["target"], "spec")
    return EffectiveSpec(**{**from_file, **from_metadata}, target_origin=target_origin, origins=origins)


def from_sources(spec_file_bytes: bytes | None, file_name: str, metadata: Mapping[str, str | None] | None) -> EffectiveSpec:
    """The spec in effect from the spec file's bytes (None: there is none) and the upload's
    metadata. Raises Rejection("spec_invalid", ...) naming the source and the field; the file
    is checked first, so valid metadata never hides a broken file."""
    from_file = parse_spec_file(spec_file_bytes, file_name) if spec_file_bytes is not None else {}
    return merge(spec_from_metadata(metadata or {}), from_file, file_name)


def with_defaults(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """A stored effective spec (schema.json, card) with any missing field filled from DEFAULTS,
    so data prepared before a field existed still trains."""
    return {**DatasetSpec().model_dump(), **copy.deepcopy(dict(spec or {}))}


# --- turning pydantic's errors into the messages users read ------------------------------------


def _invalid(source: str, detail: str) -> Rejection:
    prefix = f"{METADATA} " if source == METADATA else f"{source}: "
    return Rejection("spec_invalid", prefix + detail)


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _choices(values: tuple[Any, ...]) -> str:
    return ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)


def _messages(exc: ValidationError, source: str) -> list[str]:
    errors = exc.errors()
    unknown = [str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden"]
    messages = [_unknown_keys(unknown)] if unknown else []
    known = [error for error in errors if error["type"] != "extra_forbidden"]
    for error in sorted(known, key=lambda e: [str(part) for part in e["loc"]]):
        messages.append(_describe(error, source))
    return messages


def _unknown_keys(keys: list[str]) -> str:
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        parts.append(f"unknown key {key!r}" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return "; ".join(parts) + f"; the keys are {', '.join(FIELDS)}"


def _what_it_must_be(field: str) -> str:
    if field in LIST_FIELDS:
        return "a list"
    if field in NUMBER_FIELDS:
        return "a number"
    return "a string"


# pydantic's error type for a numeric bound -> how the message says it, and the bound's key in ctx.
BOUND_ERRORS = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
                "greater_than": ("greater than", "gt")}


def _describe(error: Mapping[str, Any], source: str) -> str:
    loc, kind, value, ctx = error["loc"], error["type"], error["input"], error.get("ctx") or {}
    field, item = str(loc[0]), len(loc) > 1
    if kind == "literal_error" or (kind == "null_value" and field == "metric"):
        if item:
            return f"'{field}': {_got(value)} is not one of {_choices(CHOICES[field])}"
        return f"'{field}' must be one of {_choices(CHOICES[field])} (got {_got(value)})"
    if kind in ("string_type", "list_type", "float_type", "null_value"):
        if item:
            return f"'{field}': {_got(value)} is not {_what_it_must_be(field) if kind != 'string_type' else 'a string'}"
        return f"'{field}' must be {_what_it_must_be(field)} (got {_got(value)})"
    if kind == "not_a_number":
        return f"'{field}': {value!r} is not a number"
    if kind == "json_list":
        return f"'{field}': {value!r} is not a JSON list; use a,b,c or [\"a\", \"b\"]"
    if kind == "finite_number":
        return f"'{field}' must be a finite number (got {value})"
    if kind in BOUND_ERRORS:
        words, limit = BOUND_ERRORS[kind]
        return f"'{field}' must be {words} {_bound(ctx[limit])} (got {_got(_number(value, source))})"
    if kind == "string_too_short":
        return f"'{field}': names must be non-empty strings" if item else f"'{field}' must be a non-empty string"
    if kind == "too_short":
        return f"'{field}' must list at least one name (got an empty list)"
    if kind == "unique_items":
        return f"'{field}' lists {_got(ctx['repeated'])} more than once"
    return f"'{field}': {error['msg']}"


def _bound(limit: float) -> str:
    """pydantic hands a float field's bounds over as floats: gt=0 is 0.0, said as 0."""
    return str(int(limit)) if isinstance(limit, float) and limit.is_integer() else str(limit)


def _number(value: Any, source: str) -> Any:
    """A bound is checked on the parsed number: a metadata '-5' is reported as the -5.0 it was read as."""
    if source == METADATA and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what and where (PyYAML's own text spans lines and names '<byte string>')."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = exc.problem_mark or exc.context_mark
        text = ": ".join(part for part in (exc.context, exc.problem) if part)
        return text + (f" (line {where.line + 1}, column {where.column + 1})" if where else "")
    return " ".join(str(exc).split())


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


# --- what depends on the task: for stored specs (dicts) as well as EffectiveSpec ---------------


def _source_prefix(spec: Mapping[str, Any], field: str) -> str:
    source = (spec.get("origins") or {}).get(field) or "the dataset spec"
    return f"{METADATA} " if source == METADATA else f"{source}: "


def check_metric(spec: Mapping[str, Any], task: str) -> None:
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


def check_algorithms(spec: Mapping[str, Any], task: str) -> None:
    """Every named algorithm must exist for the detected task."""
    wrong = [name for name in spec.get("algorithms") or () if name not in ALGORITHMS[task]]
    if wrong:
        raise Rejection(
            "spec_invalid",
            f"{_source_prefix(spec, 'algorithms')}'algorithms': {', '.join(map(repr, wrong))} "
            + (f"is not a {task} algorithm" if len(wrong) == 1 else f"are not {task} algorithms")
            + f"; use {', '.join(ALGORITHMS[task])}",
        )


def check_for_task(spec: Mapping[str, Any], task: str) -> None:
    check_metric(spec, task)
    check_algorithms(spec, task)


def default_metric(task: str, imbalanced: bool = False) -> str:
    """The metric when the spec names none: balanced accuracy for an imbalanced classification
    target (training.candidates.imbalanced), where accuracy rewards ignoring the small classes."""
    return "balanced_accuracy" if task == "classification" and imbalanced else DEFAULT_METRIC[task]


def algorithms_for(spec: Mapping[str, Any], task: str) -> list[str]:
    return list(spec.get("algorithms") or ALGORITHMS[task])


def better(metric: str, score: float, than: float) -> bool:
    """Strictly better by `metric` (rmse, mae and log_loss: lower is better)."""
    return score < than if metric in LOWER_IS_BETTER else score > than
