"""Checks on a model's bytes before onnxruntime sees them, without the onnx package (the
predict function has onnxruntime and numpy only).

An ONNX tensor may keep its values in another file ("external data": `data_location` EXTERNAL
and a `location`). Given a model as bytes, onnxruntime resolves that location against the
process's working directory and reads the file. A bucketml version is one self-contained
model.onnx, so a model that refers to external data is refused before it is loaded, whatever
onnxruntime would make of it.
"""

from __future__ import annotations

from typing import Iterator


class UnsafeModel(ValueError):
    """The bytes are not a self-contained ONNX model."""


# Where a TensorProto can sit, by message and field number (onnx/onnx.proto, IR version 11):
# graph initializers, constants in node attributes (also in subgraphs and functions), sparse
# tensors' values and indices, training graphs.
_CHILDREN = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
DATA_LOCATION_EXTERNAL = 1
# onnxruntime reads external data only for a tensor whose external_data has the key "location".
LOCATION = b"location"
MAX_DEPTH = 100  # protobuf's own default recursion limit


def refuse_external_data(model: bytes) -> None:
    """Raise UnsafeModel if a tensor of the ONNX model `model` keeps its data outside it."""
    model = bytes(model)
    stack = [("model", 0, len(model), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        # A message whose bytes lack the word cannot hold a tensor that names a file: skipped at
        # C speed, so a large forest's attributes (unpacked numbers) are not walked in Python.
        if model.find(LOCATION, start, end) < 0:
            continue
        if depth > MAX_DEPTH:
            raise UnsafeModel("not an ONNX model: messages nested too deeply")
        children = _CHILDREN.get(kind, {})
        name, external = "", False
        for number, value, span in _fields(model, start, end):
            if kind == "tensor":
                if number == TENSOR_NAME and span:
                    name = model[span[0]:span[1]].decode("utf-8", "replace")
                elif number == TENSOR_EXTERNAL_DATA or (number == TENSOR_DATA_LOCATION and value == DATA_LOCATION_EXTERNAL):
                    external = True
            elif number in children and span:
                stack.append((children[number], *span, depth + 1))
        if external:
            raise UnsafeModel(
                f"tensor '{name}' keeps its data in an external file (ONNX external data); bucketml loads a model "
                "only from its own bytes and refuses external data: export the model as one self-contained file"
            )


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int | None, tuple[int, int] | None]]:
    """(field number, varint value, (start, end) of a length-delimited value) of each field of
    the protobuf message in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        value = span = None
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            span, pos = (pos, pos + length), pos + length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise UnsafeModel(f"not an ONNX model: protobuf wire type {wire} in field {number}")
        if pos > end:
            raise UnsafeModel("not an ONNX model: a protobuf field runs past the end of its message")
        yield number, value, span


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise UnsafeModel("not an ONNX model: a malformed protobuf varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
