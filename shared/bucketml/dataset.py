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
import yaml
from sklearn.model_selection import train_test_split

from .rejections import Rejection
from .storage import NotFound, Storage

TARGET_CONVENTIONS = ("target", "label", "class", "y")
MIN_ROWS = 10
MIN_ROWS_PER_CLASS = 2  # stratified splitting needs two rows of every class
MAX_CLASSES_FOR_INTEGER_TARGET = 20
TEST_SIZE = 0.2
SEED = 42
SPEC_FILE = "bucketml.yaml"
DATASET_SUFFIXES = (".csv",)


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
    return f"rejected/{upload.model}/{upload.filename}.{upload.generation}.json"


def read_spec(storage: Storage, model: str) -> dict[str, Any]:
    """The optional dataset spec `datasets/<model>/bucketml.yaml`."""
    name = f"datasets/{model}/{SPEC_FILE}"
    try:
        raw = storage.read(name)
    except NotFound:
        return {}
    try:
        spec = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise Rejection("spec_invalid", f"{name} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise Rejection("spec_invalid", f"{name} must be a mapping of settings, e.g. 'target: price'")
    return spec


def find_target(frame: pd.DataFrame, upload: Upload, spec: dict[str, Any]) -> tuple[str, str]:
    """(column, where it came from): object metadata, then the spec, then the conventions."""
    for origin, value in (("object metadata", upload.metadata.get("target")), ("spec", spec.get("target"))):
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
    raise Rejection(
        "no_target",
        "no target column found: name it with `bucketml upload --target COLUMN`, with 'target:' in "
        f"datasets/{upload.model}/{SPEC_FILE}, or call the column one of {', '.join(TARGET_CONVENTIONS)}",
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


def class_label(value: Any) -> str:
    """Class labels are strings everywhere (model, card, answers); 1.0 and 1 are the same class."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def type_columns(frame: pd.DataFrame, target: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Feature columns with their type ('number' or 'string'), and the dropped ones with why."""
    columns, dropped = [], []
    rows = len(frame)
    for name in frame.columns:
        if name == target:
            continue
        col = frame[name]
        if col.isna().all():
            dropped.append({"column": name, "reason": "all values missing"})
        elif col.nunique(dropna=True) <= 1 and not col.isna().any():
            dropped.append({"column": name, "reason": "constant"})
        elif pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            columns.append({"name": name, "type": "number"})
        elif rows >= 20 and col.nunique(dropna=True) == rows:
            dropped.append({"column": name, "reason": "identifier-like (a different value on every row)"})
        else:
            columns.append({"name": name, "type": "string"})
    if not columns:
        raise Rejection("no_features", "no usable feature columns remain after dropping empty, constant and identifier columns")
    return columns, dropped


def normalise(frame: pd.DataFrame, columns: list[dict[str, str]]) -> pd.DataFrame:
    """Numbers as float32 (what the ONNX model takes), strings stripped with '' for missing."""
    out = {}
    for col in columns:
        values = frame[col["name"]]
        if col["type"] == "number":
            out[col["name"]] = values.astype("float32")
        else:
            out[col["name"]] = values.map(lambda v: "" if pd.isna(v) else class_label(v)).astype(object)
    return pd.DataFrame(out, index=frame.index)


def prepare(frame: pd.DataFrame, upload: Upload, spec: dict[str, Any]) -> dict[str, Any]:
    """Decide target, task and columns; split. Returns the schema and the two frames."""
    target, target_origin = find_target(frame, upload, spec)
    notes: list[str] = []
    missing_target = int(frame[target].isna().sum())
    if missing_target == len(frame):
        raise Rejection(
            "target_missing",
            f"target column '{target}' has no values; fill it in, or name another column with --target",
        )
    if missing_target:
        frame = frame[frame[target].notna()]
        notes.append(f"dropped {missing_target} rows with no '{target}' value")
    task = detect_task(frame[target], upload.metadata.get("task") or spec.get("task"))
    columns, dropped = type_columns(frame, target)
    features = normalise(frame, columns)
    y = frame[target]
    classes: list[str] = []
    if task == "classification":
        y = y.map(class_label)
        counts = y.value_counts()
        rare = sorted(counts[counts < MIN_ROWS_PER_CLASS].index)
        if rare:
            keep = ~y.isin(rare)
            features, y = features[keep], y[keep]
            notes.append(f"dropped rows of classes with fewer than {MIN_ROWS_PER_CLASS} rows: {', '.join(rare)}")
        classes = sorted(y.unique())
        if len(classes) < 2:
            raise Rejection("one_class", f"target '{target}' has a single class; a classifier needs at least two")
    else:
        y = y.astype("float64")
    if len(features) < MIN_ROWS:
        raise Rejection("too_few_rows", f"{len(features)} usable rows; at least {MIN_ROWS} are needed to train and test")
    test_size = max(TEST_SIZE, len(classes) / len(features)) if classes else TEST_SIZE
    x_train, x_test, y_train, y_test = train_test_split(
        features, y, test_size=test_size, random_state=SEED, stratify=y if classes else None
    )
    schema = {
        "target": target,
        "target_origin": target_origin,
        "task": task,
        "columns": columns,
        "classes": classes,
        "dropped": dropped,
        "notes": notes,
        "rows": {"uploaded": int(len(frame) + missing_target), "train": len(x_train), "test": len(x_test)},
    }
    return {"schema": schema, "train": (x_train, y_train), "test": (x_test, y_test)}


def to_csv(x: pd.DataFrame, y: pd.Series, target: str) -> bytes:
    frame = x.copy()
    frame[target] = y.values
    return frame.to_csv(index=False).encode("utf-8")


def from_csv(raw: bytes, schema: dict[str, Any]) -> tuple[pd.DataFrame, pd.Series]:
    """Read prepared data back with the types the schema fixed (strings stay strings)."""
    dtypes = {c["name"]: ("float32" if c["type"] == "number" else str) for c in schema["columns"]}
    target = schema["target"]
    dtypes[target] = str if schema["task"] == "classification" else "float64"
    frame = pd.read_csv(io.BytesIO(raw), dtype=dtypes, keep_default_na=False, na_values={
        c["name"]: [""] for c in schema["columns"] if c["type"] == "number"
    })
    names = [c["name"] for c in schema["columns"]]
    return frame[names], frame[target]


def load_prepared(storage: Storage, prefix: str) -> tuple[dict[str, Any], tuple, tuple]:
    schema = json.loads(storage.read(prefix + "schema.json"))
    return schema, from_csv(storage.read(prefix + "train.csv"), schema), from_csv(storage.read(prefix + "test.csv"), schema)
