"""sklearn Pipeline -> ONNX, and the parity gate that must pass before a version exists."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto
from skl2onnx import convert_sklearn, update_registered_converter
from skl2onnx._parse import _parse_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from skl2onnx.common.shape_calculator import _infer_linear_classifier_output_types
from sklearn.compose import TransformedTargetRegressor
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import FixedThresholdClassifier

from bucketml.training.candidates import ClassWeightedClassifier
from bucketml.training.column_types import with_datetime_parts
from bucketml.encoding import datetime_input, feeds_from_columns, new_session

PROBABILITY_TOLERANCE = 1e-3  # absolute, per class probability
VALUE_TOLERANCE = 1e-3  # relative to max(1, |value|), for regression
TIE_MARGIN = 1e-4  # labels may differ only where sklearn's top two probabilities are this close


class ParityError(Exception):
    """The ONNX model does not compute what the sklearn pipeline computes."""


# --- the wrappers training puts around a model, in ONNX -----------------------------------------
# skl2onnx has no converter for them (its TunedThresholdClassifierCV converter answers the inner
# model's labels, ignoring the threshold), so each gets one here: the inner model is converted
# as skl2onnx converts a Pipeline step, and a few nodes are added after it.


def _convert_log_target(scope, operator, container) -> None:
    """TransformedTargetRegressor(func=log1p, inverse_func=expm1): the inner model, then expm1."""
    model = operator.raw_operator
    if model.func is not np.log1p or model.inverse_func is not np.expm1:
        raise NotImplementedError("only the log1p/expm1 target transform is converted")
    (value,) = _parse_sklearn(scope, model.regressor_, operator.inputs)
    exponent = scope.get_unique_variable_name("exp_prediction")
    one = scope.get_unique_variable_name("one")
    container.add_initializer(one, TensorProto.FLOAT, [], [1.0])
    container.add_node("Exp", [value.onnx_name], [exponent], name=scope.get_unique_operator_name("Exp"))
    container.add_node("Sub", [exponent, one], [operator.outputs[0].full_name], name=scope.get_unique_operator_name("Sub"))


def _convert_fixed_threshold(scope, operator, container) -> None:
    """FixedThresholdClassifier (binary, on predict_proba): the inner model's probabilities, and
    the label classes_[1] where its probability is at least the threshold, else classes_[0]."""
    model = operator.raw_operator
    if model.response_method != "predict_proba" or len(model.classes_) != 2:
        raise NotImplementedError("only a binary threshold on predict_proba is converted")
    inner = model.estimator_.estimator if isinstance(model.estimator_, FrozenEstimator) else model.estimator_
    scope.add_options(id(inner), options={"zipmap": False})
    container.add_options(id(inner), options={"zipmap": False})
    _, probabilities = _parse_sklearn(scope, inner, operator.inputs)
    column, threshold, classes = (scope.get_unique_variable_name(n) for n in ("positive_column", "threshold", "classes"))
    container.add_initializer(column, TensorProto.INT64, [], [1])
    # float32 like the probabilities; the threshold sits halfway between two probabilities seen
    # in training (out_of_fold.tune_threshold), far from where float32 rounding could flip a row.
    container.add_initializer(threshold, TensorProto.FLOAT, [], [float(np.float32(model.threshold))])
    names = [str(c) for c in model.classes_]
    container.add_initializer(classes, TensorProto.STRING, [2], [n.encode("utf-8") for n in names])
    positive, reached, index = (scope.get_unique_variable_name(n) for n in ("positive", "reached", "label_index"))
    container.add_node("Gather", [probabilities.onnx_name, column], [positive], axis=1,
                       name=scope.get_unique_operator_name("Gather"))
    container.add_node("GreaterOrEqual", [positive, threshold], [reached], name=scope.get_unique_operator_name("GreaterOrEqual"))
    container.add_node("Cast", [reached], [index], to=TensorProto.INT64, name=scope.get_unique_operator_name("Cast"))
    container.add_node("Gather", [classes, index], [operator.outputs[0].full_name], axis=0,
                       name=scope.get_unique_operator_name("Gather"))
    container.add_node("Identity", [probabilities.onnx_name], [operator.outputs[1].full_name],
                       name=scope.get_unique_operator_name("Identity"))


def _convert_class_weighted(scope, operator, container) -> None:
    """ClassWeightedClassifier: the inner model's probabilities, and the class whose probability
    times its weight is largest."""
    model = operator.raw_operator
    inner = model.estimator
    scope.add_options(id(inner), options={"zipmap": False})
    container.add_options(id(inner), options={"zipmap": False})
    _, probabilities = _parse_sklearn(scope, inner, operator.inputs)
    weights, classes = scope.get_unique_variable_name("class_weights"), scope.get_unique_variable_name("classes")
    container.add_initializer(weights, TensorProto.FLOAT, [len(model.weights)], [float(w) for w in model.weights])
    names = [str(c) for c in model.classes_]
    container.add_initializer(classes, TensorProto.STRING, [len(names)], [n.encode("utf-8") for n in names])
    weighted, index = scope.get_unique_variable_name("weighted"), scope.get_unique_variable_name("label_index")
    container.add_node("Mul", [probabilities.onnx_name, weights], [weighted], name=scope.get_unique_operator_name("Mul"))
    container.add_node("ArgMax", [weighted], [index], axis=1, keepdims=0, name=scope.get_unique_operator_name("ArgMax"))
    container.add_node("Gather", [classes, index], [operator.outputs[0].full_name], axis=0,
                       name=scope.get_unique_operator_name("Gather"))
    container.add_node("Identity", [probabilities.onnx_name], [operator.outputs[1].full_name],
                       name=scope.get_unique_operator_name("Identity"))


def _regressor_shape(operator) -> None:
    """[N, 1] float, from any number of inputs (one per column)."""
    operator.outputs[0].type = FloatTensorType([operator.inputs[0].get_first_dimension(), 1])


def _classifier_shape(operator) -> None:
    """Labels [N] and probabilities [N, classes], from any number of inputs (as skl2onnx's own
    TunedThresholdClassifierCV shape calculator does)."""
    _infer_linear_classifier_output_types(operator)


update_registered_converter(TransformedTargetRegressor, "BucketmlLogTargetRegressor", _regressor_shape, _convert_log_target)
update_registered_converter(FixedThresholdClassifier, "BucketmlFixedThresholdClassifier", _classifier_shape,
                            _convert_fixed_threshold, options={"zipmap": [False], "nocl": [False]})
update_registered_converter(ClassWeightedClassifier, "BucketmlClassWeightedClassifier", _classifier_shape,
                            _convert_class_weighted, options={"zipmap": [False], "nocl": [False]})


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
        # A plain probability matrix, not dicts: from the classifier that answers (a Pipeline's last step).
        options[id(pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline)] = {"zipmap": False}
    with warnings.catch_warnings():
        # The converter reads SVC attributes that sklearn 1.9 flags as deprecated, and hands
        # onnx booleans for integer attributes (tree ensembles), which onnx<1.34 only warns about.
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        model = convert_sklearn(pipeline, initial_types=inputs, options=options)
    drop_unused_initializers(model)
    names = [i.name for i in model.graph.input]
    if len(names) != len(inputs):
        raise ParityError(f"the ONNX model has {len(names)} inputs for {len(inputs)} columns")
    return model.SerializeToString(), names


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove constants no node reads (the voting converter leaves one): onnxruntime would warn
    about each one in predict's log every time it loads the model."""
    used = {name for node in model.graph.node for name in node.input}
    for attribute_graph in (a.g for node in model.graph.node for a in node.attribute if a.HasField("g")):
        used.update(name for node in attribute_graph.node for name in node.input)
    unused = [i for i in model.graph.initializer if i.name not in used]
    for initializer in unused:
        model.graph.initializer.remove(initializer)


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


def decision_margin(model, probabilities: np.ndarray) -> np.ndarray:
    """How far each row is from answering another label: the gap between its two most probable
    classes, or for a tuned threshold the distance of the second class's probability from it."""
    if isinstance(model, FixedThresholdClassifier):
        return np.abs(probabilities[:, 1] - model.threshold)
    if isinstance(model, ClassWeightedClassifier):
        probabilities = probabilities * np.asarray(model.weights)
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


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
        ties = decision_margin(pipeline, expected_probabilities) <= TIE_MARGIN
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
