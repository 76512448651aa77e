"""sklearn Pipeline -> ONNX, and the parity gate that must pass before a version exists."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import onnx
import pandas as pd
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType

from bucketml.training.column_types import with_datetime_parts
from bucketml.encoding import datetime_input, feeds_from_columns, new_session

PROBABILITY_TOLERANCE = 1e-3  # absolute, per class probability
VALUE_TOLERANCE = 1e-3  # relative to max(1, |value|), for regression
TIE_MARGIN = 1e-4  # labels may differ only where sklearn's top two probabilities are this close


class ParityError(Exception):
    """The ONNX model does not compute what the sklearn pipeline computes."""


def onnx_inputs(columns: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """One input per original column (float32 for numbers, string for strings and booleans),
    and one float32 input per part of a datetime column (`signup__year`, ...)."""
    inputs = []
    for c in columns:
        if c["type"] == "datetime":
            inputs.extend((datetime_input(c["name"], part), FloatTensorType([None, 1])) for part in c["parts"])
        else:
            inputs.append((c["name"], FloatTensorType([None, 1]) if c["type"] == "number" else StringTensorType([None, 1])))
    return inputs


def served_columns(columns: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The schema's columns with the ONNX input names that take them (`names` in the order of
    `onnx_inputs`): "input" for a column, "inputs" {part: name} for a datetime column."""
    names = iter(names)
    served = []
    for c in columns:
        if c["type"] == "datetime":
            served.append(dict(c, inputs={part: next(names) for part in c["parts"]}))
        else:
            served.append(dict(c, input=next(names)))
    return served


def to_onnx(pipeline, schema: dict[str, Any]) -> tuple[bytes, list[str]]:
    """One ONNX input per original column, or per datetime part (see `onnx_inputs`).

    Returns the model and its input names in that order: the converter renames columns
    that are not valid identifiers ('petal width (cm)' becomes 'petal_width__cm_');
    `served_columns` records them per column.
    """
    inputs = onnx_inputs(schema["columns"])
    options = {}
    if schema["task"] == "classification":
        options[id(pipeline.steps[-1][1])] = {"zipmap": False}  # plain probability matrix, not dicts
    with warnings.catch_warnings():
        # The converter reads SVC attributes that sklearn 1.9 flags as deprecated, and hands
        # onnx booleans for integer attributes (tree ensembles), which onnx<1.34 only warns about.
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        model = convert_sklearn(pipeline, initial_types=inputs, options=options)
    names = [i.name for i in model.graph.input]
    if len(names) != len(inputs):
        raise ParityError(f"the ONNX model has {len(names)} inputs for {len(inputs)} columns")
    return model.SerializeToString(), names


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))


def with_metadata(onnx_bytes: bytes, metadata: dict[str, str]) -> bytes:
    model = onnx.load_from_string(onnx_bytes)
    set_metadata(model, metadata)
    return model.SerializeToString()


def edge_rows(schema: dict[str, Any], x: pd.DataFrame) -> pd.DataFrame:
    """Rows users will send: every value missing, and categories (and dates) never seen in
    training. Datetime parts are computed from the raw text, as for every other row."""
    unseen_values = {"string": "__never_seen__", "boolean": "true", "datetime": "2100-01-01T23:59:00"}
    rows = []
    for unseen in (False, True):
        row = {}
        for c in schema["columns"]:
            if c["type"] == "number":
                row[c["name"]] = np.nan
            else:
                row[c["name"]] = unseen_values.get(c["type"], "__never_seen__") if unseen else ""
        rows.append(row)
    edge = pd.DataFrame(rows, columns=x.columns)
    for c in schema["columns"]:
        edge[c["name"]] = edge[c["name"]].astype("float32" if c["type"] == "number" else object)
    return with_datetime_parts(edge, schema["columns"])


def check_parity(onnx_bytes: bytes, pipeline, schema: dict[str, Any], x: pd.DataFrame) -> dict[str, Any]:
    """Run both on `x` plus edge rows; raise ParityError with the first disagreement."""
    rows = pd.concat([x, edge_rows(schema, x)], ignore_index=True)
    session = new_session(onnx_bytes)
    columns = {c["name"]: rows[c["name"]].tolist() for c in schema["columns"]}
    outputs = session.run(None, feeds_from_columns(schema["columns"], columns, len(rows)))
    report: dict[str, Any] = {"rows": len(rows), "edge_rows": len(rows) - len(x)}
    if schema["task"] == "classification":
        labels, probabilities = outputs[0], outputs[1]
        expected_labels = pipeline.predict(rows)
        expected_probabilities = pipeline.predict_proba(rows)
        gap = float(np.max(np.abs(probabilities - expected_probabilities)))
        top2 = np.sort(expected_probabilities, axis=1)[:, -2:]
        ties = (top2[:, 1] - top2[:, 0]) <= TIE_MARGIN
        mismatched = np.flatnonzero((labels.astype(str) != expected_labels.astype(str)) & ~ties)
        report.update(max_probability_difference=gap, tolerance=PROBABILITY_TOLERANCE, label_mismatches=len(mismatched))
        if len(mismatched) or gap > PROBABILITY_TOLERANCE:
            raise ParityError(
                f"ONNX disagrees with sklearn: {len(mismatched)} label mismatches, "
                f"max probability difference {gap:.2g} (tolerance {PROBABILITY_TOLERANCE})"
            )
    else:
        values = outputs[0].reshape(-1)
        expected = pipeline.predict(rows).reshape(-1)
        relative = np.abs(values - expected) / np.maximum(1.0, np.abs(expected))
        gap = float(np.max(relative))
        report.update(max_relative_difference=gap, tolerance=VALUE_TOLERANCE)
        if gap > VALUE_TOLERANCE:
            raise ParityError(f"ONNX disagrees with sklearn: max relative difference {gap:.2g} (tolerance {VALUE_TOLERANCE})")
    report["passed"] = True
    return report
