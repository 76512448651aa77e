"""The Open Inference Protocol (KServe V2) infer request and response, JSON and binary.

Tensors arrive as JSON `data` or, with Triton's binary tensor data extension (what
tritonclient sends by default), as raw bytes after a JSON header whose length is in the
`Inference-Header-Content-Length` header; each such input says its `binary_data_size`.
Outputs are JSON unless the request asks for binary (`parameters.binary_data_output`, or
`binary_data` on a requested output). One input per model column, shape [rows] or [rows, 1];
an input named after an uploaded column the model ignores (its target, a dropped column) is
read, to account for its bytes, and left out.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bucketml.encoding import MAX_ROWS
from bucketml.serving.errors import InvalidInput, InvalidRequest, TooManyRows
from bucketml.serving.request_body import json_object

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMERIC = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
# Which tensor datatypes each column type takes (the metadata advertises the first).
ACCEPTED = {
    "number": {k for k in NUMERIC if k != "BOOL"},
    "string": {"BYTES"},
    "boolean": {"BYTES", "BOOL"},
    "datetime": {"BYTES"},
}


@dataclass
class InferRequest:
    id: Any
    values: dict[str, list]  # column name -> one Python value per row
    rows: int
    outputs: list[str] | None  # requested output names, None for all
    binary: set[str]  # outputs to return as binary data


def parse(body: bytes, header_length: str | None, columns: list[dict],
          ignored: frozenset[str] = frozenset()) -> InferRequest:
    """An infer request for a model with `columns`; inputs named in `ignored` are accepted and
    left out. InvalidRequest or InvalidInput name what is wrong."""
    binary_part = b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise InvalidRequest(f"{HEADER_LENGTH} must be an integer, got {header_length[:20]!r}") from None
        if not 0 <= size <= len(body):
            raise InvalidRequest(f"{HEADER_LENGTH} is {size} but the body has {len(body)} bytes")
        body, binary_part = body[:size], body[size:]
    request = json_object(body)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors, one per column")

    by_name: dict[str, list] = {}
    offset = 0
    kinds = {c["name"]: c["type"] for c in columns}
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput(f"inputs[{i}] must be an object with a 'name'")
        name = tensor["name"]
        label = f"inputs[{i}] ('{name}')"
        if name in by_name:
            raise InvalidInput(f"{label} is sent twice")
        parameters = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
        datatype = tensor.get("datatype")
        if datatype is not None and not isinstance(datatype, str):
            raise InvalidInput(f"{label}: 'datatype' must be a string such as FP32 or BYTES")
        if name in kinds and datatype is not None and datatype not in ACCEPTED[kinds[name]]:
            allowed = " or ".join(sorted(ACCEPTED[kinds[name]], key=lambda d: (d != "FP32", d)))
            raise InvalidInput(f"{label} has datatype {datatype!s:.20}; column '{name}' ({kinds[name]}) takes {allowed}")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary_part):
                raise InvalidRequest(f"{label}: binary_data_size {size!s:.20} does not fit the {len(binary_part) - offset} binary bytes left")
            data = _from_binary(label, datatype, binary_part[offset:offset + size])
            offset += size
        else:
            data = tensor.get("data")
            if not isinstance(data, list):
                raise InvalidInput(f"{label} needs 'data' as a list (or binary data with parameters.binary_data_size)")
            data = _flatten(data)
        _check_shape(label, tensor.get("shape"), len(data))
        by_name[name] = data
    if offset != len(binary_part):
        raise InvalidRequest(f"{len(binary_part) - offset} bytes of binary data are not claimed by any input's binary_data_size")

    names = list(kinds)
    missing = [n for n in names if n not in by_name]
    unknown = [n for n in by_name if n not in kinds and n not in ignored]
    if missing or unknown:
        raise InvalidInput(
            f"inputs must be exactly the model's columns; missing: {', '.join(missing) or 'none'}; "
            f"unknown: {', '.join(unknown) or 'none'}"
        )
    lengths = {len(by_name[n]) for n in names}
    if len(lengths) != 1:
        raise InvalidInput("every input tensor must have the same number of rows")
    rows = lengths.pop()
    if rows == 0:
        raise InvalidInput("input tensors are empty")
    if rows > MAX_ROWS:
        raise TooManyRows(f"at most {MAX_ROWS} rows per request, got {rows}")
    if request.get("id") is not None and not isinstance(request["id"], str):
        raise InvalidRequest("'id' must be a string")
    outputs, binary = _requested_outputs(request)
    return InferRequest(request.get("id"), {n: by_name[n] for n in names}, rows, outputs, binary)


def _flatten(data: list) -> list:
    """Row-major values of a [rows] or [rows, 1] JSON tensor."""
    return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in data]


def _check_shape(label: str, shape: Any, count: int) -> None:
    if shape is None:
        return
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"{label}: 'shape' must be a list of non-negative integers")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"{label}: shape {shape} is not one column; send [rows] or [rows, 1]")
    if shape[0] != count:
        raise InvalidInput(f"{label}: shape {shape} says {shape[0]} rows but the tensor has {count} values")


def _from_binary(label: str, datatype: Any, raw: bytes) -> list:
    if datatype == "BYTES":  # each element: a 4-byte little-endian length, then the bytes
        values, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidRequest(f"{label}: truncated BYTES element length at byte {at}")
            (size,) = struct.unpack_from("<I", raw, at)
            if at + 4 + size > len(raw):
                raise InvalidRequest(f"{label}: a BYTES element of {size} bytes runs past the data")
            try:
                values.append(raw[at + 4:at + 4 + size].decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput(f"{label}: BYTES element at byte {at} is not UTF-8 text") from None
            at += 4 + size
        return values
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"{label}: binary data needs a known datatype, got {datatype!s:.20}")
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise InvalidRequest(f"{label}: {len(raw)} bytes is not a whole number of {datatype} values")
    values = np.frombuffer(raw, dtype=dtype).tolist()
    # NaN is a missing number, as in JSON; infinities are refused by the column check.
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def _requested_outputs(request: dict) -> tuple[list[str] | None, set[str]]:
    parameters = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    all_binary = parameters.get("binary_data_output") is True
    requested = request.get("outputs")
    if requested is None:
        return None, {"*"} if all_binary else set()
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise InvalidRequest("'outputs' must be a list of objects with a 'name'")
    binary = {
        o["name"] for o in requested
        if all_binary or (isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data") is True)
    }
    return [o["name"] for o in requested], binary


def output_tensors(task: str, classes: list[str], answer: dict[str, Any], rows: int) -> list[tuple[str, str, list[int], Any]]:
    """(name, datatype, shape, row-major values) of every output the model has."""
    if task == "classification":
        return [
            ("label", "BYTES", [rows], answer["predictions"]),
            ("probabilities", "FP32", [rows, len(classes)], [p for row in answer["probabilities"] for p in row]),
        ]
    return [("variable", "FP32", [rows], answer["predictions"])]


def response(model: str, version: int, request: InferRequest, tensors: list[tuple[str, str, list[int], Any]]):
    """(body, headers) of the infer response, binary where the request asked for it."""
    available = {t[0]: t for t in tensors}
    names = request.outputs if request.outputs is not None else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InvalidRequest(f"unknown output(s) {', '.join(unknown)}; this model has {', '.join(available)}")
    outputs, blobs = [], []
    for name in names:
        _, datatype, shape, values = available[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if "*" in request.binary or name in request.binary:
            if datatype == "BYTES":
                blob = b"".join(struct.pack("<I", len(e)) + e for e in (str(v).encode("utf-8") for v in values))
            else:
                blob = np.ascontiguousarray(values, dtype=np.float32).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = values
        outputs.append(tensor)
    reply: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request.id is not None:
        reply["id"] = request.id
    header = orjson.dumps(reply)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
