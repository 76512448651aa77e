"""From an uploaded CSV to prepared train/test data: reading, target and task, split.

Everything a user can get wrong raises `Rejection` with a machine-readable reason and a
message that says what to do; the preprocess function turns it into a rejected event.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from bucketml.training.column_types import build_profile, class_label, normalise, type_columns, with_datetime_parts
from bucketml.contracts.rejections import Rejection, outcome_object
from bucketml.storage import Storage

TARGET_CONVENTIONS = ("target", "label", "class", "y")
MIN_ROWS = 10
RARE_CLASS_ROWS = 5  # classes with fewer rows are used for training only (none held out)
IMBALANCE_WARNING = 10  # largest/smallest class ratio from which the profile warns
MAX_CLASSES_FOR_INTEGER_TARGET = 20
TEST_SIZE = 0.2
SEED = 42
SPEC_FILE = "bucketml.yaml"
# Longest first: the run id strips the whole suffix.
DATASET_SUFFIXES = (".csv.gz", ".tsv.gz", ".csv", ".tsv")


@dataclasses.dataclass(frozen=True)
class Upload:
    """Which object, at which generation, a run was made from."""

    bucket: str
    name: str
    generation: int
    md5: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.name.split("/")[1]

    @property
    def filename(self) -> str:
        return self.name.rsplit("/", 1)[1]

    @property
    def run_id(self) -> str:
        """Deterministic, so a duplicate delivery of the same upload finds the same run."""
        stem = self.filename
        for suffix in DATASET_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return f"{stem}-{self.generation}"

    def as_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "name": self.name, "generation": str(self.generation), "md5Hash": self.md5}


def dataset_object(name: str) -> bool:
    """True for `datasets/<model>/<file>.csv`, the only objects that start a training."""
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == "datasets" and bool(parts[1]) and parts[2].lower().endswith(DATASET_SUFFIXES)


def prepared_prefix(model: str, run_id: str) -> str:
    return f"prepared/{model}/{run_id}/"


def rejection_object(upload: Upload) -> str:
    return outcome_object("rejected", upload.model, upload.filename, upload.generation)


def find_target(frame: pd.DataFrame, upload: Upload, spec: dict[str, Any]) -> tuple[str, str]:
    """(column, where it came from): object metadata, then the spec, then the conventions.

    `spec` is the effective spec (steps.preprocess.effective_spec): it already chose between the
    object metadata and the spec file and says which in `target_origin`."""
    value, origin = spec.get("target"), spec.get("target_origin") or "spec"
    if value:
        if value not in frame.columns:
            raise Rejection(
                "no_target",
                f"target column '{value}' (from the {origin}) is not in the file; columns are: {', '.join(frame.columns)}",
            )
        return value, origin
    lowered = {c.lower(): c for c in frame.columns}
    for name in TARGET_CONVENTIONS:
        if name in lowered:
            return lowered[name], "convention"
    columns = ", ".join(frame.columns[:20]) + (", ..." if len(frame.columns) > 20 else "")
    raise Rejection(
        "no_target",
        f"no target column found among {columns}: name it with `bucketml upload --target COLUMN`, with "
        f"'target:' in datasets/{upload.model}/{SPEC_FILE}, or call the column one of {', '.join(TARGET_CONVENTIONS)}",
    )


def detect_task(target: pd.Series, requested: str | None) -> str:
    if requested in ("classification", "regression"):
        return requested
    if not pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
        return "classification"
    values = target.dropna()
    integral = bool(np.all(np.mod(values, 1) == 0))
    if integral and values.nunique() <= MAX_CLASSES_FOR_INTEGER_TARGET:
        return "classification"
    return "regression"


def target_values(target: pd.Series, task: str) -> pd.Series:
    """Class labels (strings) or floats; a regression target that is not numeric is refused."""
    if task == "classification":
        return target.map(class_label)
    numbers = pd.to_numeric(target, errors="coerce")
    bad = target[numbers.isna() & target.notna()]
    if len(bad):
        raise Rejection(
            "spec_invalid",
            f"the task is regression but target '{target.name}' has values that are not numbers, e.g. "
            f"{str(bad.iloc[0])[:40]!r}; set task: classification, or fix the values",
        )
    return numbers.astype("float64")


def split(features: pd.DataFrame, y: pd.Series, classes: list[str], rare: list[str], test_size: float) -> tuple[tuple, tuple]:
    """(x_train, y_train), (x_test, y_test). Classification is stratified; the rows of rare
    classes (fewer than RARE_CLASS_ROWS) all go to training, so every class is learned."""
    if not classes:
        x_train, x_test, y_train, y_test = train_test_split(features, y, test_size=test_size, random_state=SEED)
        return (x_train, y_train), (x_test, y_test)
    common = ~y.isin(rare)
    y_common = y[common]
    if y_common.empty:
        raise Rejection(
            "too_few_rows",
            f"every class has fewer than {RARE_CLASS_ROWS} rows; at least one class needs {RARE_CLASS_ROWS} "
            "rows so the model can be tested",
        )
    size = max(test_size, y_common.nunique() / len(y_common))  # at least one test row per class
    x_train, x_test, y_train, y_test = train_test_split(
        features[common], y_common, test_size=size, random_state=SEED, stratify=y_common
    )
    if rare:
        x_train = pd.concat([x_train, features[~common]])
        y_train = pd.concat([y_train, y[~common]])
    return (x_train, y_train), (x_test, y_test)


def prepare(frame: pd.DataFrame, upload: Upload, spec: dict[str, Any]) -> dict[str, Any]:
    """Decide target, task and columns; split; profile. Returns the schema, the two frames and
    the profile (bucketml.training.column_types.build_profile)."""
    target, target_origin = find_target(frame, upload, spec)
    notes: list[str] = list(frame.attrs.get("notes", []))  # what reading the file decided
    uploaded = int(frame.attrs.get("rows_read", len(frame)))
    missing_target = int(frame[target].isna().sum())
    if missing_target == len(frame):
        raise Rejection(
            "target_missing",
            f"target column '{target}' has no values; fill it in, or name another column with --target",
        )
    if missing_target:
        frame = frame[frame[target].notna()]
        notes.append(f"dropped {missing_target} rows with no '{target}' value")
    task = detect_task(frame[target], spec.get("task", "auto"))
    y = target_values(frame[target], task)
    typing = type_columns(frame, target, y, task, spec)
    notes.extend(typing.notes)
    warnings = list(typing.warnings)
    features = normalise(frame, typing.columns)
    classes: list[str] = []
    rare: list[str] = []
    if task == "classification":
        counts = y.value_counts()
        classes = sorted(counts.index)
        if len(classes) < 2:
            raise Rejection("one_class", f"target '{target}' has a single class; a classifier needs at least two")
        rare = sorted(counts[counts < RARE_CLASS_ROWS].index)
        if rare:
            notes.append(
                f"classes with fewer than {RARE_CLASS_ROWS} rows are used for training only (none held out for "
                "testing): " + ", ".join(f"{c} ({counts[c]} rows)" for c in rare)
            )
        ratio = counts.max() / counts.min()
        if ratio >= IMBALANCE_WARNING:
            warnings.append(
                f"target '{target}' is imbalanced: the largest class has {ratio:.1f} times the rows of the smallest; "
                "accuracy flatters a model that ignores the small classes (see balanced_accuracy)"
            )
    if len(features) < MIN_ROWS:
        raise Rejection("too_few_rows", f"{len(features)} usable rows; at least {MIN_ROWS} are needed to train and test")
    (x_train, y_train), (x_test, y_test) = split(features, y, classes, rare, float(spec.get("test_size", TEST_SIZE)))
    schema = {
        "target": target,
        "target_origin": target_origin,
        "task": task,
        "columns": typing.columns,
        "classes": classes,
        "training_only_classes": rare,
        "dropped": typing.dropped,
        "notes": notes,
        "warnings": warnings,
        "rows": {"uploaded": uploaded, "used": len(features), "train": len(x_train), "test": len(x_test)},
        "spec": json.loads(json.dumps(spec, default=str)),
    }
    profile = build_profile(frame, y, schema)
    return {"schema": schema, "train": (x_train, y_train), "test": (x_test, y_test), "profile": profile}


def to_csv(x: pd.DataFrame, y: pd.Series, target: str) -> bytes:
    frame = x.copy()
    frame[target] = y.values
    return frame.to_csv(index=False).encode("utf-8")


def from_csv(raw: bytes, schema: dict[str, Any]) -> tuple[pd.DataFrame, pd.Series]:
    """Read prepared data back with the types the schema fixed (strings stay strings). A
    datetime column keeps its text and gains one float32 column per part (`signup__year`),
    computed by the numpy code the predict function runs on requests."""
    dtypes = {c["name"]: ("float32" if c["type"] == "number" else str) for c in schema["columns"]}
    target = schema["target"]
    dtypes[target] = str if schema["task"] == "classification" else "float64"
    frame = pd.read_csv(io.BytesIO(raw), dtype=dtypes, keep_default_na=False, na_values={
        c["name"]: [""] for c in schema["columns"] if c["type"] == "number"
    })
    names = [c["name"] for c in schema["columns"]]
    return with_datetime_parts(frame[names], schema["columns"]), frame[target]


def load_prepared(storage: Storage, prefix: str) -> tuple[dict[str, Any], tuple, tuple]:
    schema = json.loads(storage.read(prefix + "schema.json"))
    return schema, from_csv(storage.read(prefix + "train.csv"), schema), from_csv(storage.read(prefix + "test.csv"), schema)
