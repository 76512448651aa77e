"""The train function over HTTP, as a Knative Trigger delivers to it: model.trained goes to the
event sink (K_SINK), model.published is the reply, and an unreachable sink means a retry that
announces the same version again instead of training a second one."""

from __future__ import annotations

import json

import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import from_http

from bucketml.contracts import events
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage

from helpers import Sink, churn_frame, free_port, function_server


@pytest.fixture
def prepared(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    info = storage.write("datasets/churn/data.csv", churn_frame(seed=4).to_csv(index=False).encode(), content_type="text/csv")
    event = handle_finalized(storage, info.event_data())
    assert event["type"] == events.DATASET_PREPARED, event.data
    return storage, event


def deliver(url: str, event) -> requests.Response:
    headers, body = to_binary(event)
    return requests.post(url, data=body, headers=headers, timeout=300)


def test_trained_goes_to_the_sink_and_published_is_the_reply_with_a_retry_when_the_sink_is_down(tmp_path, prepared):
    storage, event = prepared
    port = free_port()
    env = {"K_SINK": f"http://127.0.0.1:{port}", "BUCKETML_LOG_FORMAT": "json"}
    with function_server("train", storage.root, tmp_path, env) as train:
        # Nothing listens at K_SINK yet: the version is made, but the delivery must be retried.
        refused = deliver(train.url, event)
        assert refused.status_code == 503, refused.text
        assert "event sink" in refused.json()["error"]
        assert Registry(storage).versions("churn") == [1]

        with Sink(port) as sink:
            retried = deliver(train.url, event)
        assert retried.status_code == 200, retried.text
        reply = from_http(dict(retried.headers), retried.content)
        assert [e["type"] for e in sink.received] == [events.MODEL_TRAINED]
        trained = sink.received[0]
        assert reply["type"] == events.MODEL_PUBLISHED
        assert reply.data["version"] == trained.data["version"] == 1
        assert trained["id"] == "trained-churn-1" and trained["bucketmlmodel"] == "churn"
        assert Registry(storage).versions("churn") == [1]  # the retry made no second version

    # Production logging: one JSON object per line, with the fields log pipelines index.
    lines = [json.loads(line) for line in train.log.read_text().splitlines() if line.strip()]
    assert all({"severity", "logger", "message", "time"} <= set(line) for line in lines), lines
    assert any(line["severity"] == "ERROR" and "event sink" in line["message"] for line in lines), lines
    assert any(line["logger"] == "bucketml.train" and "version 1" in line["message"] for line in lines), lines
