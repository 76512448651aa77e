"""The predict function over real HTTP (docs/http-api.md, "predict function").

functions-framework serves functions/predict/main.py in its own process (--asgi: one uvicorn
worker) over a folder bucket. Models are trained in-process through the library
(preprocess, then train, which registers the version and moves the pointer) while the server
runs, so the server only ever learns of them by polling current.json or by a /reload event.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from sklearn.datasets import load_diabetes

from bucketml.registry.model_registry import Registry
from bucketml.storage.local import LocalStorage
from helpers import churn_frame, predict_server, publish, wait_until

POLL_SECONDS = 0.3
PUBLISHED = "bucketml.model.published.v1"

# Churn records: likely churn, likely stay, everything missing, unseen categories.
RECORDS = [
    {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"},
    {"tenure": 60, "monthly": 35.0, "plan": "pro", "region": "south"},
    {"tenure": None, "monthly": None, "plan": None, "region": None},
    {"tenure": 12, "monthly": 70, "plan": "enterprise", "region": "mars"},
]
GOOD_RECORD = RECORDS[0]


# --- helpers -----------------------------------------------------------------------------


def diabetes_frame() -> pd.DataFrame:
    return load_diabetes(as_frame=True).frame  # ten numeric features and a numeric 'target'


def schema_names(storage: LocalStorage, model: str, version: int) -> list[str]:
    return [c["name"] for c in Registry(storage).card(model, version)["schema"]["columns"]]


def assert_json_error(response: requests.Response, status: int, *mentions: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    for mention in mentions:
        assert mention in body["error"], (mention, body["error"])
    return body["error"]


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> LocalStorage:
    return LocalStorage(tmp_path_factory.mktemp("predict-http") / "bucket")


@pytest.fixture(scope="module")
def server(storage, tmp_path_factory):
    with predict_server(storage.root, tmp_path_factory.mktemp("predict-log"), POLL_SECONDS) as running:
        yield running


@pytest.fixture(scope="module")
def models(storage, server) -> dict[str, Any]:
    """churn (classification) then diabetes (regression), published while predict runs."""
    before = server.get("/v2/health/ready")
    found: dict[str, Any] = {"ready_before": (before.status_code, before.json())}
    found["churn"] = publish(storage, "churn", churn_frame(seed=0), "first.csv")
    started = time.monotonic()
    wait_until(lambda: server.get("/v2/health/ready").status_code == 200, "the first model to be served")
    found["pickup_seconds"] = time.monotonic() - started
    after = server.get("/v2/health/ready")
    found["ready_after"] = (after.status_code, after.json())
    # While churn is the only model, a request may leave out "model" (but a version still counts).
    found["only_model"] = {
        str(version): server.predict({"version": version, "records": [GOOD_RECORD]}) for version in (None, 1, 99)
    }
    found["diabetes"] = publish(storage, "diabetes", diabetes_frame(), "diabetes.csv")
    wait_until(lambda: "diabetes" in server.get("/v2/health/ready").json()["models"], "diabetes to be served")
    return found


# --- health ------------------------------------------------------------------------------


def test_ready_only_once_a_model_is_published_and_picked_up_without_restart(server, models):
    status, body = models["ready_before"]
    assert status == 503 and body["ready"] is False and body["models"] == {}
    status, body = models["ready_after"]
    assert status == 200 and body == {"ready": True, "models": {"churn": models["churn"]}}
    assert models["pickup_seconds"] < 10
    assert server.process.poll() is None  # the same process: picked up by polling, no restart
    live = server.get("/v2/health/live")
    assert live.status_code == 200 and live.json() == {"live": True}
    ready = server.get("/v2/health/ready").json()
    assert set(ready["models"]) == {"churn", "diabetes"}


# --- /predict ----------------------------------------------------------------------------


def test_predict_records_and_seed_style_features(server, storage, models):
    response = server.predict({"model": "churn", "records": RECORDS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "version", "predictions", "probabilities", "classes"}
    assert body["model"] == "churn" and isinstance(body["version"], int)
    assert response.headers["Bucketml-Model-Version"] == str(body["version"])
    assert body["classes"] == ["no", "yes"]
    assert len(body["predictions"]) == len(RECORDS) and set(body["predictions"]) <= {"no", "yes"}
    assert len(body["probabilities"]) == len(RECORDS)
    for row, label in zip(body["probabilities"], body["predictions"]):
        assert len(row) == 2 and all(0 <= p <= 1 for p in row)
        assert sum(row) == pytest.approx(1, abs=1e-4)
        assert body["classes"][int(np.argmax(row))] == label
    # The model learned something: short tenure, high bill and the basic plan churn; the opposite stays.
    assert body["predictions"][:2] == ["yes", "no"]

    names = schema_names(storage, "churn", body["version"])
    assert names == ["tenure", "monthly", "plan", "region"]
    features = [[record[n] for n in names] for record in RECORDS]
    seed = server.predict({"model": "churn", "version": body["version"], "features": features})
    assert seed.status_code == 200, seed.text
    assert seed.headers["Bucketml-Model-Version"] == str(seed.json()["version"])
    assert seed.json() == body


def test_a_single_served_model_needs_no_name_but_honours_a_version(models):
    default, pinned, unknown = (models["only_model"][v] for v in ("None", "1", "99"))
    assert default.status_code == 200 and default.json()["model"] == "churn"
    assert default.headers["Bucketml-Model-Version"] == str(default.json()["version"])
    assert pinned.status_code == 200 and pinned.json()["version"] == 1
    assert_json_error(unknown, 404, "churn", "99")


def test_several_models_served_at_once(server, models):
    anonymous = server.predict({"records": [GOOD_RECORD]})
    assert_json_error(anonymous, 400, "churn", "diabetes", "model")

    churn = server.predict({"model": "churn", "records": [GOOD_RECORD]})
    assert churn.status_code == 200 and churn.json()["model"] == "churn" and "classes" in churn.json()

    row = diabetes_frame().drop(columns="target").iloc[0].to_dict()
    diabetes = server.predict({"model": "diabetes", "records": [row, dict(row, bmi=None)]})
    assert diabetes.status_code == 200, diabetes.text
    body = diabetes.json()
    assert body["model"] == "diabetes" and body["version"] == models["diabetes"]
    assert diabetes.headers["Bucketml-Model-Version"] == str(models["diabetes"])
    assert set(body) == {"model", "version", "predictions"}  # regression: no probabilities or classes
    assert len(body["predictions"]) == 2 and all(isinstance(p, float) and np.isfinite(p) for p in body["predictions"])

    for path, request in (
        ("/predict", {"model": "nope", "records": [GOOD_RECORD]}),
        ("/predict", {"model": "nope", "version": 1, "records": [GOOD_RECORD]}),
        ("/v1/models/nope:predict", {"instances": [GOOD_RECORD]}),
        ("/v2/models/nope/infer", {"inputs": [{"name": "tenure", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}),
    ):
        assert_json_error(server.post(path, request), 404, "nope")
    assert_json_error(server.get("/v2/models/nope"), 404, "nope")
    assert_json_error(server.get("/v2/models/nope/ready"), 404, "nope")


# --- validation --------------------------------------------------------------------------


def _record(**changes) -> dict:
    return dict(GOOD_RECORD, **changes)


VALIDATION = {
    # name: (method, path, request kwargs, status, words the error must contain)
    "invalid JSON": ("POST", "/predict", {"data": b'{"records": [', "headers": {"Content-Type": "application/json"}}, 400, ["JSON"]),
    "JSON nested too deeply": ("POST", "/predict", {"data": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}, 400, ["JSON"]),
    "body not UTF-8": ("POST", "/predict", {"data": b"\xff\xfe{", "headers": {"Content-Type": "application/json"}}, 400, ["JSON"]),
    "body is a list": ("POST", "/predict", {"json": [GOOD_RECORD]}, 400, ["object"]),
    "body is a string": ("POST", "/predict", {"json": "records"}, 400, ["object"]),
    "neither records nor features": ("POST", "/predict", {"json": {"model": "churn"}}, 400, ["records", "features"]),
    "model not a string": ("POST", "/predict", {"json": {"model": 7, "records": [GOOD_RECORD]}}, 400, ["'model'"]),
    "version not an integer": ("POST", "/predict", {"json": {"model": "churn", "version": "latest", "records": [GOOD_RECORD]}}, 400, ["'version'"]),
    "records not a list": ("POST", "/predict", {"json": {"model": "churn", "records": GOOD_RECORD}}, 422, ["records"]),
    "records empty": ("POST", "/predict", {"json": {"model": "churn", "records": []}}, 422, ["records"]),
    "record not an object": ("POST", "/predict", {"json": {"model": "churn", "records": [[3, 99.5, "basic", "north"]]}}, 422, ["records[0]"]),
    "record missing a column": (
        "POST", "/predict",
        {"json": {"model": "churn", "records": [GOOD_RECORD, {k: v for k, v in GOOD_RECORD.items() if k != "region"}]}},
        422, ["records[1]", "region"],
    ),
    "unknown column": ("POST", "/predict", {"json": {"model": "churn", "records": [_record(colour="red")]}}, 422, ["colour"]),
    "string for a numeric column": ("POST", "/predict", {"json": {"model": "churn", "records": [_record(tenure="three")]}}, 422, ["tenure"]),
    "boolean for a numeric column": ("POST", "/predict", {"json": {"model": "churn", "records": [_record(monthly=True)]}}, 422, ["monthly"]),
    "object for a string column": ("POST", "/predict", {"json": {"model": "churn", "records": [_record(plan={"a": 1})]}}, 422, ["plan"]),
    # The JSON parser refuses a number beyond double range, naming where it is.
    "integer too large for a number": ("POST", "/predict", {"json": {"model": "churn", "records": [_record(tenure=10**400)]}}, 422, ["tenure", "float32"]),
    "both records and features": ("POST", "/predict", {"json": {"model": "churn", "records": [GOOD_RECORD], "features": [[3, 99.5, "basic", "north"]]}}, 400, ["records", "features", "one"]),
    "features row too short": ("POST", "/predict", {"json": {"model": "churn", "features": [[3, 99.5, "basic"]]}}, 422, ["features[0]", "4"]),
    "features row too long": ("POST", "/predict", {"json": {"model": "churn", "features": [[3, 99.5, "basic", "north"], [1, 2, "pro", "east", 5]]}}, 422, ["features[1]"]),
    "features not rows": ("POST", "/predict", {"json": {"model": "churn", "features": [3, 99.5, "basic", "north"]}}, 422, ["features[0]"]),
    "too many records": ("POST", "/predict", {"json": {"model": "churn", "records": [GOOD_RECORD] * 10_001}}, 413, ["10000"]),
    "too many feature rows": ("POST", "/predict", {"json": {"model": "churn", "features": [[1, 2, "pro", "east"]] * 10_001}}, 413, ["10000"]),
    "invalid model name": ("POST", "/predict", {"json": {"model": "../../etc", "version": 1, "records": [GOOD_RECORD]}}, 404, ["../../etc"]),
    "unknown route": ("GET", "/nope", {}, 404, ["/nope"]),
    "unknown route under v2": ("GET", "/v2/models/churn/explain", {}, 404, []),
    "wrong method on /predict": ("GET", "/predict", {}, 405, ["GET"]),
    "wrong method on infer": ("GET", "/v2/models/churn/infer", {}, 405, []),
    "wrong method on live": ("POST", "/v2/health/live", {"json": {}}, 405, []),
    "v1 without instances": ("POST", "/v1/models/churn:predict", {"json": {"records": [GOOD_RECORD]}}, 422, []),
    "v1 instance with an unknown column": ("POST", "/v1/models/churn:predict", {"json": {"instances": [_record(region=None) | {"extra": 1}]}}, 422, ["extra"]),
    "infer with too many rows": (
        "POST", "/v2/models/churn/infer",
        {"json": {"inputs": [{"name": n, "datatype": "FP32" if n in ("tenure", "monthly") else "BYTES",
                              "shape": [10_001, 1], "data": [v] * 10_001} for n, v in GOOD_RECORD.items()]}},
        413, ["10000"],
    ),
    "v1 with too many instances": ("POST", "/v1/models/churn:predict", {"json": {"instances": [GOOD_RECORD] * 10_001}}, 413, ["10000"]),
    "invalid model name in a v2 route": ("GET", "/v2/models/a%20b/versions/1", {}, 404, ["a b"]),
    "infer without inputs": ("POST", "/v2/models/churn/infer", {"json": {"outputs": []}}, 400, ["inputs"]),
    "infer tensor without data": ("POST", "/v2/models/churn/infer", {"json": {"inputs": [{"name": "tenure"}]}}, 422, ["tenure", "data"]),
}


@pytest.mark.parametrize("case", list(VALIDATION), ids=list(VALIDATION))
def test_bad_requests_are_json_4xx_naming_the_field(server, models, case):
    method, path, kwargs, status, mentions = VALIDATION[case]
    response = requests.request(method, server.url + path, timeout=30, **kwargs)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert_json_error(response, status, *mentions)


# --- Open Inference Protocol (KServe V2) -------------------------------------------------


def tensors(records: list[dict], names: list[str], types: dict[str, str]) -> list[dict]:
    return [
        {"name": n, "shape": [len(records), 1], "datatype": types[n], "data": [r[n] for r in records]} for n in names
    ]


def test_open_inference_protocol(server, storage, models):
    meta = server.get("/v2/models/churn")
    assert meta.status_code == 200, meta.text
    body = meta.json()
    version = int(body["versions"][0])
    assert meta.headers["Bucketml-Model-Version"] == str(version)
    names = schema_names(storage, "churn", version)
    assert [i["name"] for i in body["inputs"]] == names
    types = {i["name"]: i["datatype"] for i in body["inputs"]}
    assert types == {"tenure": "FP32", "monthly": "FP32", "plan": "BYTES", "region": "BYTES"}
    assert all(i["shape"] == [-1, 1] for i in body["inputs"])
    assert [o["name"] for o in body["outputs"]] == ["label", "probabilities"]

    diabetes = server.get("/v2/models/diabetes").json()
    assert [i["name"] for i in diabetes["inputs"]] == schema_names(storage, "diabetes", models["diabetes"])
    assert {i["datatype"] for i in diabetes["inputs"]} == {"FP32"}

    ready = server.get("/v2/models/churn/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert server.get(f"/v2/models/churn/versions/{version}/ready").status_code == 200

    expected = server.predict({"model": "churn", "version": version, "records": RECORDS}).json()
    for path in ("/v2/models/churn/infer", f"/v2/models/churn/versions/{version}/infer"):
        response = server.post(path, {"id": "req-1", "inputs": tensors(RECORDS, names, types)})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model_name"] == "churn" and answer["model_version"] == str(version) and answer["id"] == "req-1"
        assert response.headers["Bucketml-Model-Version"] == str(version)
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert set(outputs) == {"label", "probabilities"}
        assert outputs["label"]["data"] == expected["predictions"]
        assert outputs["label"]["shape"] == [len(RECORDS)]
        assert outputs["probabilities"]["shape"] == [len(RECORDS), 2]
        assert outputs["probabilities"]["data"] == [p for row in expected["probabilities"] for p in row]

    # Tensors in any order, data as [n, 1] nested lists, are the same request.
    nested = [dict(t, data=[[v] for v in t["data"]]) for t in reversed(tensors(RECORDS, names, types))]
    again = server.post("/v2/models/churn/infer", {"inputs": nested})
    assert again.status_code == 200 and again.json()["outputs"][0]["data"] == expected["predictions"]

    missing = [t for t in tensors(RECORDS, names, types) if t["name"] != "region"]
    assert_json_error(server.post("/v2/models/churn/infer", {"inputs": missing}), 422, "region")
    ragged = tensors(RECORDS, names, types)
    ragged[0]["data"] = ragged[0]["data"][:2]
    assert_json_error(server.post("/v2/models/churn/infer", {"inputs": ragged}), 422, "rows")

    # Regression: one output, 'variable', equal to /predict's.
    row = diabetes_frame().drop(columns="target").iloc[:3].to_dict("records")
    d_names = [i["name"] for i in diabetes["inputs"]]
    d_expected = server.predict({"model": "diabetes", "records": row}).json()["predictions"]
    d_answer = server.post("/v2/models/diabetes/infer", {"inputs": tensors(row, d_names, dict.fromkeys(d_names, "FP32"))})
    assert d_answer.status_code == 200, d_answer.text
    assert [o["name"] for o in d_answer.json()["outputs"]] == ["variable"]
    assert d_answer.json()["outputs"][0]["data"] == d_expected


def test_v2_datatypes_shapes_and_binary_framing_errors_name_the_input(server, models):
    good = [
        {"name": "tenure", "shape": [1], "datatype": "INT64", "data": [3]},  # any numeric datatype for a number
        {"name": "monthly", "shape": [1, 1], "datatype": "FP64", "data": [[99.5]]},
        {"name": "plan", "shape": [1], "datatype": "BYTES", "data": ["basic"]},
        {"name": "region", "shape": [1], "datatype": "BYTES", "data": ["north"]},
    ]
    answer = server.post("/v2/models/churn/infer", {"inputs": good})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == server.predict({"model": "churn", "records": [GOOD_RECORD]}).json()["predictions"]

    def with_change(index: int, **change) -> dict:
        return {"inputs": [dict(t, **change) if i == index else t for i, t in enumerate(good)]}

    assert_json_error(server.post("/v2/models/churn/infer", with_change(2, datatype="FP32")), 422, "plan", "BYTES")
    assert_json_error(server.post("/v2/models/churn/infer", with_change(0, datatype="BYTES")), 422, "tenure", "FP32")
    assert_json_error(server.post("/v2/models/churn/infer", with_change(0, shape=[1, 3])), 422, "tenure", "one column")
    assert_json_error(server.post("/v2/models/churn/infer", with_change(0, shape=[2])), 422, "tenure", "2 rows")
    duplicate = {"inputs": good + [good[0]]}
    assert_json_error(server.post("/v2/models/churn/infer", duplicate), 422, "tenure", "twice")
    unknown_output = {"inputs": good, "outputs": [{"name": "scores"}]}
    assert_json_error(server.post("/v2/models/churn/infer", unknown_output), 400, "scores", "label, probabilities")

    # Binary framing that does not add up is a 400 naming the problem, never a 5xx.
    header = b'{"inputs": [{"name": "tenure", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 8}}]}'
    for length, body, mention in (
        ("abc", header, "integer"),
        (str(len(header) + 100), header, "body has"),
        (str(len(header)), header + b"\0\0\0\0", "binary_data_size"),
    ):
        response = requests.post(server.url + "/v2/models/churn/infer", data=body, timeout=10,
                                 headers={"Inference-Header-Content-Length": length})
        assert_json_error(response, 400, mention)


def test_tritonclient_http_drives_the_v2_endpoints(server, models):
    """The Triton HTTP client, with its defaults (binary tensor data both ways) and with JSON."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    version = str(models["churn"])
    assert client.is_model_ready("churn") and client.is_model_ready("churn", version)
    metadata = client.get_model_metadata("churn", version)
    assert [i["name"] for i in metadata["inputs"]] == ["tenure", "monthly", "plan", "region"]

    expected = server.predict({"model": "churn", "version": models["churn"], "records": RECORDS}).json()
    rows = len(RECORDS)

    def inputs(binary: bool) -> list:
        made = []
        for spec in metadata["inputs"]:
            name, datatype = spec["name"], spec["datatype"]
            values = [r[name] for r in RECORDS]
            if datatype == "FP32":
                array = np.array([np.nan if v is None else v for v in values], dtype=np.float32).reshape(rows, 1)
            else:
                array = np.array(["" if v is None else v for v in values], dtype=object).reshape(rows, 1)
            made.append(triton.InferInput(name, [rows, 1], datatype).set_data_from_numpy(array, binary_data=binary))
        return made

    # Defaults: binary inputs, every output binary.
    result = client.infer("churn", inputs(binary=True), model_version=version, request_id="r-1")
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_version"] == version
    assert [v.decode() for v in result.as_numpy("label")] == expected["predictions"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], atol=1e-6)
    assert result.as_numpy("probabilities").shape == (rows, 2)

    # JSON inputs, one output asked for, in JSON.
    result = client.infer("churn", inputs(binary=False), outputs=[triton.InferRequestedOutput("label", binary_data=False)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert list(result.as_numpy("label")) == expected["predictions"]

    # Regression through the client; a wrong request surfaces as the client's exception with our message.
    frame = diabetes_frame().drop(columns="target").iloc[:3]
    d_meta = client.get_model_metadata("diabetes")
    d_inputs = [
        triton.InferInput(i["name"], [3, 1], "FP32").set_data_from_numpy(frame[[i["name"]]].to_numpy(np.float32))
        for i in d_meta["inputs"]
    ]
    d_expected = server.predict({"model": "diabetes", "records": frame.to_dict("records")}).json()["predictions"]
    np.testing.assert_allclose(client.infer("diabetes", d_inputs).as_numpy("variable"), d_expected, rtol=1e-6)
    with pytest.raises(triton.InferenceServerException, match="region"):
        client.infer("churn", inputs(binary=True)[:3])
    client.close()


def test_all_number_models_take_the_columnar_path_with_the_same_answers_and_errors(server, models):
    """diabetes has only number columns: /predict converts a request in one numpy step; the
    answers must equal the value-by-value path (V2 infer) and bad values must still be named."""
    frame = diabetes_frame().drop(columns="target").iloc[:5]
    names = list(frame.columns)
    rows = frame.to_numpy().tolist()
    rows[1][2] = None  # missing
    rows[2][0] = str(rows[2][0])  # a numeric string is a number
    expected = server.post("/v2/models/diabetes/infer", {"inputs": [
        {"name": n, "datatype": "FP64", "shape": [5], "data": [r[j] if not isinstance(r[j], str) else float(r[j]) for r in rows]}
        for j, n in enumerate(names)
    ]}).json()["outputs"][0]["data"]
    by_features = server.predict({"model": "diabetes", "features": rows}).json()["predictions"]
    by_records = server.predict({"model": "diabetes", "records": [dict(zip(names, r)) for r in rows]}).json()["predictions"]
    assert by_features == by_records
    np.testing.assert_allclose(by_features, expected, rtol=1e-6)

    for value, mention in ((True, "expects a number"), (1e39, "float32"), ("soon", "expects a number")):
        bad = [list(rows[0])]
        bad[0][3] = value
        assert_json_error(server.predict({"model": "diabetes", "features": bad}), 422, names[3], mention)


# --- KServe V1 ---------------------------------------------------------------------------


def test_kserve_v1_predict(server, models):
    expected = server.predict({"model": "churn", "records": RECORDS}).json()
    response = server.post("/v1/models/churn:predict", {"instances": RECORDS})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == expected["predictions"]
    assert response.headers["Bucketml-Model-Version"] == str(response.json()["version"]) == str(expected["version"])

    row = diabetes_frame().drop(columns="target").iloc[:2]
    d_expected = server.predict({"model": "diabetes", "records": row.to_dict("records")}).json()["predictions"]
    as_records = server.post("/v1/models/diabetes:predict", {"instances": row.to_dict("records")})
    as_lists = server.post("/v1/models/diabetes:predict", {"instances": row.values.tolist()})
    assert as_records.json()["predictions"] == as_lists.json()["predictions"] == d_expected


# --- versions and reload -----------------------------------------------------------------


def test_version_pinning(server, storage, models):
    before = server.predict({"model": "churn", "records": RECORDS})
    old = before.json()["version"]
    new = publish(storage, "churn", churn_frame(rows=300, seed=1), "second.csv")
    assert new > old
    wait_until(lambda: server.version_of("churn") == new, f"churn version {new} to be picked up by polling")

    pinned = server.predict({"model": "churn", "version": old, "records": RECORDS})
    assert pinned.status_code == 200, pinned.text
    assert pinned.json() == before.json()  # the very same model answers, not just the same number
    assert pinned.headers["Bucketml-Model-Version"] == str(old)

    default = server.predict({"model": "churn", "records": RECORDS})
    assert default.json()["version"] == new and default.headers["Bucketml-Model-Version"] == str(new)
    as_string = server.predict({"model": "churn", "version": str(old), "records": RECORDS})
    assert as_string.json()["version"] == old

    meta = server.get(f"/v2/models/churn/versions/{old}")
    assert meta.status_code == 200 and meta.json()["versions"] == [str(old)]
    infer = server.post(f"/v2/models/churn/versions/{old}/infer", {"inputs": tensors(RECORDS, schema_names(storage, "churn", old), {
        "tenure": "FP32", "monthly": "FP32", "plan": "BYTES", "region": "BYTES"})})
    assert infer.status_code == 200 and infer.json()["model_version"] == str(old)
    assert infer.json()["outputs"][0]["data"] == before.json()["predictions"]

    assert_json_error(server.predict({"model": "churn", "version": 99, "records": RECORDS}), 404, "churn", "99")
    assert_json_error(server.get("/v2/models/churn/versions/99"), 404, "99")
    assert_json_error(server.post("/v2/models/churn/versions/99/infer", {"inputs": []}), 404, "99")


def published_event(model: str, version: int) -> tuple[dict, bytes]:
    event = CloudEvent(
        {"type": PUBLISHED, "source": "/bucketml/train", "subject": model, "datacontenttype": "application/json"},
        {"model": model, "version": version},
    )
    return to_binary(event)


def test_reload_event_serves_the_new_version_at_once(server, storage, models):
    new = publish(storage, "churn", churn_frame(rows=260, seed=2), "third.csv")
    headers, body = published_event("churn", new)
    response = server.post("/reload", data=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.content == b""
    # No waiting: the reload answered only once the version was loaded.
    assert server.version_of("churn") == new
    diabetes = server.post("/reload", data=published_event("diabetes", models["diabetes"])[1],
                           headers=published_event("diabetes", models["diabetes"])[0])
    assert diabetes.status_code == 202 and server.version_of("diabetes") == models["diabetes"]

    assert_json_error(server.post("/reload", data=b"not an event", headers={"Content-Type": "text/plain"}), 400)
    assert_json_error(server.post("/reload", {"model": "churn"}), 400)  # plain JSON, no CloudEvent attributes
    no_model_headers, no_model_body = to_binary(
        CloudEvent({"type": PUBLISHED, "source": "/bucketml/train"}, {"version": new})
    )
    assert_json_error(server.post("/reload", data=no_model_body, headers=no_model_headers), 400, "model")
    bad_data_headers, _ = published_event("churn", new)
    assert_json_error(server.post("/reload", data=b"[1, 2", headers=bad_data_headers), 400)
    assert_json_error(server.get("/reload"), 405)
    assert server.version_of("churn") == new  # still serving after the malformed events


# --- metrics (the predict process's imports: tests/test_predict_imports.py) ----------------


def test_prometheus_metrics_count_requests_rows_and_versions(server, models):
    before = server.get("/metrics")
    assert before.status_code == 200 and before.headers["Content-Type"].startswith("text/plain")
    record = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}
    for _ in range(3):
        assert server.predict({"model": "churn", "records": [record, record]}).status_code == 200
    assert server.predict({"model": "churn", "records": [{"tenure": 1}]}).status_code == 422
    text = server.get("/metrics").text

    def sample(name: str, **labels) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    version = str(server.version_of("churn"))
    assert sample("bucketml_predict_requests_total", endpoint="predict", code="200", model="churn", version=version) >= 3
    assert sample("bucketml_predict_requests_total", endpoint="predict", code="422") >= 1
    assert sample("bucketml_predict_rows_total", model="churn", version=version) >= 6
    assert sample("bucketml_predict_request_seconds_count", endpoint="predict") >= 4
