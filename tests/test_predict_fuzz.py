"""Fuzzing the predict function's whole HTTP surface from its own OpenAPI document.

A real predict process (functions-framework, as in test_predict_http) serves one published
model whose schema has a column of every type (number, string, boolean, datetime).
schemathesis generates requests from the document served at /openapi.json (examples, boundary
cases and random ones, valid and invalid, and unexpected methods) for every operation and
sends them to that process: no answer may be a 5xx (but for the two documented 503s, see
`documented_unavailable`), and the process must log no traceback (predict_server checks).

So that generated requests get past "no such model" and "lacks column" into value parsing and
onnxruntime, the document is narrowed to this bucket before generating: the model's name,
version and columns, and one valid example per request body. The document itself (served,
and in docs/openapi.json) stays generic.

BUCKETML_FUZZ_EXAMPLES (default 20) sets the random examples per operation; BUCKETML_FUZZ_SEED
the seed (a fixed default, so that a failure reproduces; another value explores other requests).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error

from bucketml.serving.service import PredictService
from bucketml.registry.model_registry import Registry
from bucketml.storage.local import LocalStorage
from helpers import churn_frame, predict_server, publish, wait_until

MODEL = "fuzz"
MAX_EXAMPLES = int(os.environ.get("BUCKETML_FUZZ_EXAMPLES", "20"))
SEED = int(os.environ.get("BUCKETML_FUZZ_SEED", "20240501"))
ROWS = 2  # every generated infer request has this many rows, so its tensors agree in length
VERSION = 1  # the first version published to a fresh bucket
COLUMNS = [  # what preprocessing makes of mixed_frame (the fixture checks)
    {"name": "tenure", "type": "number"},
    {"name": "monthly", "type": "number"},
    {"name": "plan", "type": "string"},
    {"name": "region", "type": "string"},
    {"name": "member", "type": "boolean"},
    {"name": "signup", "type": "datetime"},
]


def mixed_frame(rows: int = 160, seed: int = 0) -> pd.DataFrame:
    """churn's numbers and strings, plus a boolean column and an ISO 8601 datetime column."""
    frame = churn_frame(rows, seed)
    rng = np.random.default_rng(seed + 1)
    frame.insert(4, "member", rng.choice(["yes", "no", "Yes", "NO"], rows))
    days = np.datetime64("2023-01-01") + rng.integers(0, 730, rows).astype("timedelta64[D]")
    minutes = rng.integers(0, 24 * 60, rows).astype("timedelta64[m]")
    frame.insert(5, "signup", [str(d + m).replace("T", " ") for d, m in zip(days, minutes)])
    return frame


# --- the one model, and the process serving it ----------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, Any]:
    storage = LocalStorage(tmp_path_factory.mktemp("predict-fuzz") / "bucket")
    assert publish(storage, MODEL, mixed_frame(), "data.csv") == VERSION
    columns = Registry(storage).card(MODEL, VERSION)["schema"]["columns"]
    assert [{"name": c["name"], "type": c["type"]} for c in columns] == COLUMNS
    with predict_server(storage.root, tmp_path_factory.mktemp("predict-fuzz-log")) as server:
        wait_until(lambda: server.version_of(MODEL) == VERSION, f"{MODEL} to be served")
        yield {"server": server}


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


# --- narrowing the document to this bucket ---------------------------------------------------

ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:?\d{2})?$"
LIKELY = {  # values a column of each type takes; negative generation and the coverage phase try others
    "number": {"anyOf": [{"type": "number", "minimum": -1e6, "maximum": 1e6}, {"type": "null"},
                         {"type": "string", "pattern": r"^-?[0-9]{1,5}(\.[0-9]{1,3})?$"}]},
    "string": {"$ref": "#/components/schemas/Value"},  # anything scalar is a category
    "boolean": {"enum": [True, False, "yes", "No", "Y", "f", "TRUE", 0, 1, "", None]},
    "datetime": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"},
                           {"type": "string", "pattern": ISO}, {"type": "null"}]},
}
GOOD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": None, "member": "yes", "signup": "2024-05-01 10:30"}
JSON_BODIES = {  # operation -> a valid request body (the example the examples and coverage phases start from)
    ("/predict", "post"): {"model": MODEL, "records": [GOOD]},
    ("/v1/models/{model}:predict", "post"): {"instances": [GOOD, list(GOOD.values())]},
    ("/v2/models/{model}/infer", "post"): {"id": "r-1", "inputs": [
        {"name": c["name"], "datatype": "FP32" if c["type"] == "number" else "BYTES", "shape": [ROWS], "data": [GOOD[c["name"]]] * ROWS}
        for c in COLUMNS
    ]},
    ("/reload", "post"): {"model": MODEL, "version": VERSION},
}
JSON_BODIES["/v2/models/{model}/versions/{version}/infer", "post"] = JSON_BODIES["/v2/models/{model}/infer", "post"]


def _without_examples(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_examples(v) for k, v in node.items() if k not in ("example", "examples")}
    if isinstance(node, list):
        return [_without_examples(v) for v in node]
    return node


def narrowed(document: dict, version: int, columns: list[dict]) -> dict:
    """The served document for this bucket: its model, version and columns, and one valid example
    request per operation with a body (the document's own examples name another model)."""
    doc = _without_examples(copy.deepcopy(document))
    schemas, parameters = doc["components"]["schemas"], doc["components"]["parameters"]
    names = [c["name"] for c in columns]
    values = {c["name"]: LIKELY[c["type"]] for c in columns}

    # Path parameters: this model and version, or anything (a 404).
    parameters["model"]["schema"] = {"anyOf": [{"const": MODEL}, schemas["ModelName"]]}
    parameters["model"]["example"] = MODEL
    parameters["version"]["schema"] = {"anyOf": [{"const": version}, parameters["version"]["schema"]]}
    parameters["version"]["example"] = version
    schemas["ModelName"] = {"const": MODEL}  # in bodies (where it may also be left out)
    schemas["Version"] = {"anyOf": [{"const": version}, schemas["Version"]]}
    schemas["ModelPublishedData"]["properties"]["model"] = {"const": MODEL}

    # Rows: records and feature rows of this model's columns (at most a few per request).
    schemas["Record"] = {"type": "object", "properties": values, "required": names, "additionalProperties": False}
    schemas["Row"] = {"type": "array", "prefixItems": [values[n] for n in names], "items": False, "minItems": len(names)}
    for key in ("records", "features"):
        schemas["PredictRequest"]["properties"][key]["maxItems"] = 4
    schemas["V1Request"]["properties"]["instances"]["maxItems"] = 4

    # Open Inference Protocol: one tensor per column, in order, each of ROWS values, JSON only
    # (the binary framing has its own tests in test_predict_http).
    datatypes = {"number": ["FP32", "FP64", "INT64"], "string": ["BYTES"], "boolean": ["BYTES", "BOOL"], "datetime": ["BYTES"]}
    schemas["InferenceRequest"]["properties"]["inputs"] = {
        "type": "array",
        "items": False,
        "minItems": len(columns),
        "prefixItems": [
            {
                "type": "object",
                "required": ["name", "datatype", "data"],
                "properties": {
                    "name": {"const": c["name"]},
                    "datatype": {"enum": datatypes[c["type"]]},
                    "shape": {"enum": [[ROWS], [ROWS, 1]]},
                    "data": {"type": "array", "minItems": ROWS, "maxItems": ROWS, "items": values[c["name"]]},
                },
            }
            for c in columns
        ],
    }
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        operation = doc["paths"][path]["post"]
        operation["parameters"] = [p for p in operation["parameters"] if "InferenceHeaderContentLength" not in p["$ref"]]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/InferenceRequest"}}}}

    for (path, method), body in JSON_BODIES.items():
        doc["paths"][path][method]["requestBody"]["content"]["application/json"]["example"] = body
    return doc


# --- the check ---------------------------------------------------------------------------------


def documented_unavailable(case, response) -> bool:
    """The two 503s that are documented answers, not server errors: readiness before any model
    is loaded (never the case here, but the answer's own contract), and /reload when the new
    version fails to load (the broker retries; the previous version keeps serving)."""
    try:
        body = response.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    if case.operation.method.upper() == "GET" and case.operation.path == "/v2/health/ready":
        return body.get("ready") is False
    if case.operation.method.upper() == "POST" and case.operation.path == "/reload":
        return str(body.get("error", "")).startswith("could not load the new version of ")
    return False


@schemathesis.check
def no_server_error(ctx, response, case):
    """not_a_server_error, except for the documented 503s above (only those answers, not their
    whole endpoints)."""
    if response.status_code == 503 and documented_unavailable(case, response):
        return None
    return not_a_server_error(ctx, response, case)


# --- the fuzz test -----------------------------------------------------------------------------

# The schema is built at collection from the document PredictService serves at /openapi.json (in
# process; test_the_process_serves_the_document checks the real process serves the same bytes), as
# schemathesis' lazy `from_fixture` loader fails under pytest 9 (it reads Node._nodeid, which pytest
# 9 removed). The requests go to the real process: base_url is given per call.
SERVED_DOCUMENT = json.loads(PredictService(None).openapi(None, b"").body)
schema = schemathesis.openapi.from_dict(
    narrowed(SERVED_DOCUMENT, VERSION, COLUMNS),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": 30,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
            "phases": {"stateful": {"enabled": False}},  # no links between operations to follow
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        }
    ),
)
ANSWERS: dict[str, set[int]] = {}  # operation -> statuses seen, for the last test
CASES: dict[str, int] = {"requests": 0, "5xx": 0}  # the figures printed by the last test (-s)


@schema.parametrize()
def test_no_request_is_answered_with_a_server_error(case, served, session):
    response = case.call_and_validate(base_url=served["server"].url, session=session, checks=[no_server_error])
    ANSWERS.setdefault(case.operation.label, set()).add(response.status_code)
    CASES["requests"] += 1
    CASES["5xx"] += response.status_code >= 500  # only the documented 503s get past the check


# --- 5xx the fuzzing found (or that were found beside it), as plain requests ---------------------

TENSORS = [{"name": k, "data": [v]} for k, v in GOOD.items()]
FOUND = {
    # A model name that is no valid name was a 503 "could not load" (so the broker retried it).
    "reload: invalid model name": ("POST", "/reload", {
        "headers": {"ce-specversion": "1.0", "ce-type": "bucketml.model.published.v1", "ce-source": "x", "ce-id": "1",
                    "Content-Type": "application/json"},
        "data": b'{"model": "\\u0086J"}'}, {400}),
    # A version of 300 digits made a file name too long for the folder bucket (OSError), one of 1000
    # an object name over 1024 bytes (InvalidObjectName): both were 500s, not 404s.
    "v2 metadata: 300-digit version": ("GET", f"/v2/models/{MODEL}/versions/" + "1" * 300, {}, {404}),
    "v2 metadata: 1000-digit version": ("GET", f"/v2/models/{MODEL}/versions/" + "1" * 1000, {}, {404}),
    "predict: 400-digit version": ("POST", "/predict", {"data": b'{"version": ' + b"1" * 400 + b', "records": [{}]}'}, {400, 404}),
    # A datatype that is not a string (unhashable): TypeError in open_inference.parse.
    "infer: datatype an object": ("POST", f"/v2/models/{MODEL}/infer", {"json": {"inputs": [{"name": "plan", "datatype": {}, "data": ["a"]}]}}, {400, 422}),
    # An id beyond 64 bits (parsed by the json fallback) that orjson cannot write back.
    "infer: id beyond 64 bits": ("POST", f"/v2/models/{MODEL}/infer", {"data": b'{"id": ' + b"9" * 400 + b', "inputs": '
                                                                    + json.dumps(TENSORS).encode() + b"}"}, {200, 400, 422}),
}


@pytest.mark.parametrize("case", list(FOUND), ids=list(FOUND))
def test_what_fuzzing_found_is_a_4xx_or_an_answer(served, case):
    method, path, kwargs, statuses = FOUND[case]
    response = requests.request(method, served["server"].url + path, timeout=30, **kwargs)
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"] == "application/json"


# --- the document the process serves -------------------------------------------------------------


def test_the_process_serves_the_document(served):
    """What the real process serves is what the fuzzing was generated from."""
    response = requests.get(served["server"].url + "/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.json() == SERVED_DOCUMENT


def test_the_fuzzing_reached_the_model():
    """Generated requests scored rows on every inference route, not only 4xx (else the narrowing
    no longer fits the model, and the fuzzing tests little)."""
    if not ANSWERS:
        pytest.skip("the fuzz test did not run in this session")
    print(f"\nFIGURES predict fuzz: {CASES['requests']} generated requests over {len(ANSWERS)} operations, "
          f"{CASES['5xx']} answered 5xx (documented 503s only)")
    for label in ("POST /predict", "POST /v1/models/{model}:predict", "POST /v2/models/{model}/infer",
                  "POST /v2/models/{model}/versions/{version}/infer", "POST /reload"):
        assert ANSWERS.get(label, set()) & {200, 202}, (label, ANSWERS.get(label))
