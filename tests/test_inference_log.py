"""Request/response logging as CloudEvents (KServe's inference logger event types) from a real
predict process to a real sink; a sink that is down costs no prediction."""

from __future__ import annotations

import pytest
import requests

from bucketml.storage import LocalStorage
from helpers import Sink, churn_frame, free_port, predict_server, publish, wait_until

RECORD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    storage = LocalStorage(tmp_path_factory.mktemp("inference-log") / "bucket")
    publish(storage, "churn", churn_frame(seed=0), "data.csv", {"algorithms": "logistic_regression"})
    return storage.root


def test_every_inference_call_is_sent_as_a_request_and_a_response_event(bucket, tmp_path):
    port = free_port()
    with Sink(port) as sink, predict_server(bucket, tmp_path, env={"BUCKETML_INFERENCE_LOG_URL": f"http://127.0.0.1:{port}"}) as server:
        wait_until(lambda: server.version_of("churn") == 1, "churn to be served")
        ok = server.predict({"model": "churn", "records": [RECORD]})
        bad = server.predict({"model": "churn", "records": [{"tenure": "soon"}]})
        assert ok.status_code == 200 and bad.status_code == 422
        assert server.get("/v2/health/ready").status_code == 200  # not an inference call: not logged
        wait_until(lambda: len(sink.received) >= 4, "four inference log events")

    assert len(sink.received) == 4
    by_id: dict[str, dict] = {}
    for event in sink.received:
        by_id.setdefault(event["id"], {})[event["type"]] = event
    assert len(by_id) == 2  # a request and its response share an id
    pairs = sorted(by_id.values(), key=lambda pair: pair["org.kubeflow.serving.inference.response"]["bucketmlstatus"])
    for pair, status, answer in zip(pairs, ("200", "422"), (ok, bad)):
        request, response = pair["org.kubeflow.serving.inference.request"], pair["org.kubeflow.serving.inference.response"]
        assert request["inferenceservicename"] == response["inferenceservicename"] == "churn"
        assert request["endpoint"] == "predict" and request["source"] == "/bucketml/predict"
        assert response["bucketmlstatus"] == status
        assert response.data == answer.json()
    assert pairs[0]["org.kubeflow.serving.inference.request"].data == {"model": "churn", "records": [RECORD]}
    assert pairs[0]["org.kubeflow.serving.inference.response"]["bucketmlversion"] == "1"


def test_a_sink_that_is_down_costs_no_prediction(bucket, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    with predict_server(bucket, tmp_path, env={"BUCKETML_INFERENCE_LOG_URL": nobody, "BUCKETML_INFERENCE_LOG_MODE": "request"}) as server:
        wait_until(lambda: server.version_of("churn") == 1, "churn to be served")
        for _ in range(20):
            assert server.predict({"model": "churn", "records": [RECORD]}).status_code == 200

        def dropped() -> float:
            metrics = requests.get(server.url + "/metrics", timeout=5).text
            lines = [line for line in metrics.splitlines() if line.startswith('bucketml_inference_log_dropped_total{reason="sink_error"}')]
            return float(lines[0].split()[-1]) if lines else 0.0

        wait_until(lambda: dropped() == 20, "the 20 undeliverable request events to be counted")
