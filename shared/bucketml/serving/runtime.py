"""The model runtime: one ONNX version behind onnxruntime, loaded, checked and scored.

The seam between what serves a model and what computes its answers, in the shape of MLServer's
MLModel: `load()` turns the stored bytes into a ready session, `predict()` scores columns of
values. numpy and onnxruntime only (never sklearn, never pickle): this is the predict
function's whole model stack, and its start-up time is the cold start users wait for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bucketml.encoding import feeds_from_columns, new_session


class OnnxModel:
    """One version of a model: its card's schema, and an onnxruntime session once loaded."""

    def __init__(self, model: str, version: int, card: dict[str, Any]):
        self.model, self.version, self.card = model, version, card
        self.columns: list[dict[str, Any]] = card["schema"]["columns"]
        self.task: str = card["schema"]["task"]
        self.classes: list[str] = card["schema"].get("classes", [])
        # Every column a number: requests can take the columnar fast path (predict_matrix).
        self.numbers_only = all(c["type"] == "number" for c in self.columns)
        self._inputs = [c.get("input", c["name"]) for c in self.columns]
        # The uploaded columns the model does not take, accepted in requests and dropped.
        self.ignored_inputs: list[str] = ignored_inputs(card)
        self.ignored: frozenset[str] = frozenset(self.ignored_inputs)
        self.reference: Any = None  # monitoring.reference.Reference of the training rows, set by the manager
        self._session: Any = None
        self._output_names: list[str] = []

    def load(self, onnx_bytes: bytes) -> OnnxModel:
        """A session over the bytes, proven to answer before anyone relies on it: one row with
        every value missing is scored. Raises whatever makes the version unservable."""
        self._session = new_session(onnx_bytes)
        self._output_names = [o.name for o in self._session.get_outputs()]
        self.predict({c["name"]: [None] for c in self.columns}, 1)
        return self

    def predict(self, values: dict[str, list], rows: int) -> dict[str, Any]:
        """Score `rows` rows given as {column name: one value per row}."""
        return self._answer(self.outputs(values, rows))

    def predict_matrix(self, matrix: np.ndarray) -> dict[str, Any]:
        """Score a (rows, columns) float32 matrix of a numbers-only model (see encoding.number_matrix)."""
        return self._answer(self.outputs_of_matrix(matrix))

    def outputs(self, values: dict[str, list], rows: int) -> list[np.ndarray]:
        """The session's outputs for `predict`'s input, as arrays: the labels (or values), then for
        a classifier the probabilities in class order. Batch scoring formats them without the
        Python lists of an HTTP answer."""
        return self._session.run(self._output_names, feeds_from_columns(self.columns, values, rows))

    def outputs_of_matrix(self, matrix: np.ndarray) -> list[np.ndarray]:
        """The session's outputs for `predict_matrix`'s input, as arrays (see `outputs`)."""
        rows, width = matrix.shape
        tensors = np.ascontiguousarray(matrix.T).reshape(width, rows, 1)  # one contiguous feed per column
        return self._session.run(self._output_names, dict(zip(self._inputs, tensors)))

    def _answer(self, outputs: list) -> dict[str, Any]:
        answer: dict[str, Any] = {"model": self.model, "version": self.version}
        if self.task == "classification":
            answer["predictions"] = [str(v) for v in outputs[0].tolist()]
            answer["probabilities"] = np.round(outputs[1].astype(np.float64), 6).tolist()
            answer["classes"] = self.classes
        else:
            answer["predictions"] = outputs[0].reshape(-1).astype(np.float64).tolist()
        return answer


def ignored_inputs(card: dict[str, Any]) -> list[str]:
    """The columns of the upload that are not the model's inputs, as the card records them: the
    target, then the columns preprocess dropped (identifiers, constants, what the spec drops...).
    A request may carry them (rows as uploaded); they are ignored. A card that records neither
    (one registered by hand, or older) gives none: such requests stay unknown columns."""
    schema = card.get("schema") or {}
    inputs = {c["name"] for c in schema.get("columns", [])}
    target = schema.get("target", card.get("target"))
    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    names = [target] + [d.get("column") for d in data.get("dropped") or [] if isinstance(d, dict)]
    ignored: list[str] = []
    for name in names:
        if isinstance(name, str) and name and name not in inputs and name not in ignored:
            ignored.append(name)
    return ignored
