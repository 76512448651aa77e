"""Rows as uploaded: predict takes the rows of the file a model was trained from (docs/http-api.md).

The columns of the upload that are not inputs (the target, an identifier, a constant column, a
column the spec drops) may be sent in /predict records, V1 instances and V2 input tensors; they
are ignored, and the model's metadata lists them. A column the upload never had stays a 422.
Real processes, as in tests/test_predict_http.py: functions-framework serves predict over a
folder bucket, and the models are trained in-process from data generated here or from
scikit-learn's bundled datasets.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pytest
import requests
from sklearn.datasets import load_diabetes

from bucketml.serving.runtime import OnnxModel, ignored_inputs
from bucketml.storage.local import LocalStorage
from helpers import churn_frame, predict_server, publish, wait_until

INPUTS = ["tenure", "monthly", "plan", "region"]
IGNORED = {"label", "customer_id", "source", "batch_note"}
V2_TYPES = {"tenure": "FP32", "monthly": "FP32", "plan": "BYTES", "region": "BYTES"}


def uploaded_frame() -> pd.DataFrame:
    """The churn columns and the label, with an identifier (a row number), a constant column and
    a column the spec drops, in an order that interleaves them with the features."""
    frame = churn_frame(seed=3)
    rng = np.random.default_rng(3)
    frame.insert(0, "customer_id", np.arange(1, len(frame) + 1))
    frame.insert(2, "source", "web")
    frame["batch_note"] = rng.choice(["a", "b", "c"], len(frame))
    return frame


def diabetes_uploaded() -> pd.DataFrame:
    frame = load_diabetes(as_frame=True).frame  # ten numeric features and a numeric 'target'
    frame.insert(0, "patient", np.arange(100, 100 + len(frame)))
    frame["site"] = 7.0
    return frame


def records_of(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))  # NaN as null, numpy values as JSON


def assert_422(response: requests.Response, *mentions: str) -> str:
    assert response.status_code == 422, (response.status_code, response.text)
    error = response.json()["error"]
    for mention in mentions:
        assert mention in error, (mention, error)
    return error


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> LocalStorage:
    return LocalStorage(tmp_path_factory.mktemp("rows-as-uploaded") / "bucket")


@pytest.fixture(scope="module")
def server(storage, tmp_path_factory):
    with predict_server(storage.root, tmp_path_factory.mktemp("rows-log")) as running:
        yield running


@pytest.fixture(scope="module")
def models(storage, server) -> dict[str, int]:
    found = {
        "churn": publish(storage, "churn", uploaded_frame(), "churn.csv",
                         metadata={"target": "label", "drop": "batch_note", "algorithms": "logistic_regression"}),
        "diabetes": publish(storage, "diabetes", diabetes_uploaded(), "diabetes.csv", metadata={"algorithms": "ridge"}),
    }
    wait_until(lambda: set(server.get("/v2/health/ready").json().get("models", {})) == set(found), "both models served")
    return found


def test_the_card_records_what_was_not_kept(storage, models):
    from bucketml.registry.model_registry import Registry

    card = Registry(storage).card("churn", models["churn"])
    assert [c["name"] for c in card["schema"]["columns"]] == INPUTS
    kinds = {d["column"]: d["kind"] for d in card["data"]["dropped"]}
    assert kinds == {"customer_id": "identifier", "source": "constant", "batch_note": "spec_drop"}
    assert card["schema"]["target"] == "label"


def test_metadata_lists_the_ignored_columns(server, models):
    for path in ("/v2/models/churn", f"/v2/models/churn/versions/{models['churn']}"):
        body = server.get(path).json()
        assert [i["name"] for i in body["inputs"]] == INPUTS  # the inputs are unchanged
        ignored = body["parameters"]["ignored_inputs"]
        assert ignored[0] == "label" and set(ignored) == IGNORED and len(ignored) == len(IGNORED)
        assert body["parameters"]["task"] == "classification"
    diabetes = server.get("/v2/models/diabetes").json()["parameters"]["ignored_inputs"]
    assert diabetes[0] == "target" and set(diabetes) == {"target", "patient", "site"}


def test_predict_takes_the_uploaded_rows_with_the_same_answers(server, models):
    frame = uploaded_frame()
    uploaded = records_of(frame)
    assert set(uploaded[0]) == set(INPUTS) | IGNORED
    stripped = records_of(frame[INPUTS])
    expected = server.predict({"model": "churn", "records": stripped})
    assert expected.status_code == 200, expected.text
    as_uploaded = server.predict({"model": "churn", "records": uploaded})
    assert as_uploaded.status_code == 200, as_uploaded.text
    assert as_uploaded.json() == expected.json()
    assert len(expected.json()["predictions"]) == len(frame)

    # Mixed: some records as uploaded, some with the inputs only, some with a few extras.
    mixed = [uploaded[0], stripped[1], dict(stripped[2], label="yes"), dict(stripped[3], source=None, customer_id="x")]
    answer = server.predict({"model": "churn", "records": mixed})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == expected.json()["predictions"][:4]

    # features (lists in schema order) are unchanged: the width is the inputs'.
    features = [[r[n] for n in INPUTS] for r in stripped[:5]]
    assert server.predict({"model": "churn", "features": features}).json()["predictions"] == expected.json()["predictions"][:5]
    assert_422(server.predict({"model": "churn", "features": [[*features[0], "yes"]]}), "features[0]", "4")


def test_all_number_models_take_the_uploaded_rows_on_the_columnar_path(server, models):
    frame = diabetes_uploaded()
    inputs = [c for c in frame.columns if c not in ("target", "patient", "site")]
    expected = server.predict({"model": "diabetes", "records": records_of(frame[inputs].iloc[:50])})
    assert expected.status_code == 200, expected.text
    as_uploaded = server.predict({"model": "diabetes", "records": records_of(frame.iloc[:50])})
    assert as_uploaded.status_code == 200, as_uploaded.text
    assert as_uploaded.json() == expected.json()


def test_a_column_the_upload_never_had_is_still_a_422_naming_it(server, models):
    record = dict(records_of(uploaded_frame())[0], colour="red")
    error = assert_422(server.predict({"model": "churn", "records": [record]}), "records[0]", "colour")
    assert error == f"records[0] has unknown column(s) colour; expected {', '.join(INPUTS)}"
    for ignored in ("label", "customer_id"):
        assert ignored not in error
    # A record without an input is still one that lacks it, extras or not.
    lacking = {k: v for k, v in records_of(uploaded_frame())[0].items() if k != "region"}
    assert_422(server.predict({"model": "churn", "records": [lacking]}), "records[0]", "region")
    v1 = server.post("/v1/models/churn:predict", {"instances": [record]})
    assert_422(v1, "colour")


def test_kserve_v1_instances_as_uploaded(server, models):
    frame = uploaded_frame().iloc[:6]
    expected = server.post("/v1/models/churn:predict", {"instances": records_of(frame[INPUTS])})
    answer = server.post("/v1/models/churn:predict", {"instances": records_of(frame)})
    assert expected.status_code == 200 and answer.status_code == 200, answer.text
    assert answer.json() == expected.json()


def v2_inputs(records: list[dict], names: list[str]) -> list[dict]:
    return [{"name": n, "shape": [len(records), 1], "datatype": V2_TYPES[n], "data": [r[n] for r in records]} for n in names]


def test_v2_infer_takes_inputs_named_after_uploaded_columns(server, models):
    records = records_of(uploaded_frame().iloc[:8])
    expected = server.post("/v2/models/churn/infer", {"inputs": v2_inputs(records, INPUTS)})
    assert expected.status_code == 200, expected.text
    extras = [
        {"name": "customer_id", "shape": [8, 1], "datatype": "INT64", "data": [r["customer_id"] for r in records]},
        {"name": "label", "shape": [8], "datatype": "BYTES", "data": [r["label"] for r in records]},
        {"name": "source", "datatype": "BYTES", "data": [r["source"] for r in records]},
    ]
    for path in ("/v2/models/churn/infer", f"/v2/models/churn/versions/{models['churn']}/infer"):
        answer = server.post(path, {"inputs": extras[:1] + v2_inputs(records, INPUTS) + extras[1:]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"] == expected.json()["outputs"]

    # Binary tensor data: an ignored input's bytes are read (and skipped) like any other's.
    label_bytes = b"".join(struct.pack("<I", len(r["label"])) + r["label"].encode() for r in records)
    header = {"inputs": [{"name": "label", "shape": [8], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(label_bytes)}}] + v2_inputs(records, INPUTS)}
    head = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    binary = requests.post(server.url + "/v2/models/churn/infer", data=head + label_bytes, timeout=30, headers=headers)
    assert binary.status_code == 200, binary.text
    assert binary.json()["outputs"] == expected.json()["outputs"]

    # A tensor named after a column the upload never had is still unknown.
    unknown = {"name": "colour", "datatype": "BYTES", "data": ["red"] * 8}
    error = assert_422(server.post("/v2/models/churn/infer", {"inputs": v2_inputs(records, INPUTS) + [unknown]}), "colour")
    assert error == "inputs must be exactly the model's columns; missing: none; unknown: colour"
    # An ignored input does not stand in for a missing one.
    missing = [t for t in v2_inputs(records, INPUTS) if t["name"] != "region"] + extras
    assert_422(server.post("/v2/models/churn/infer", {"inputs": missing}), "missing: region")


def test_a_card_that_records_nothing_ignores_nothing():
    columns = [{"name": "x", "type": "number"}]
    bare = {"schema": {"task": "regression", "columns": columns}}
    assert ignored_inputs(bare) == []
    assert OnnxModel("m", 1, bare).ignored == frozenset()
    # The target alone (a card from before data.dropped), and names that are inputs are never ignored.
    assert ignored_inputs({"schema": {"task": "regression", "target": "y", "columns": columns}}) == ["y"]
    card = {"schema": {"task": "regression", "target": "y", "columns": columns},
            "data": {"dropped": [{"column": "id", "kind": "identifier"}, {"column": "x"}, {"column": "id"}]}}
    assert ignored_inputs(card) == ["y", "id"]
