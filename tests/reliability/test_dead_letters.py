"""The dead-letter store: what no subscriber could take is kept, listed, shown and replayed.

The local broker honours the Broker manifest's `delivery.deadLetterSink` the way Knative does:
once a Trigger's retries are spent, it posts the event, with the knativeerror* extensions, to
the `deadletter` function, which keeps it under deadletters/ in the bucket. The CLI reads the
bucket and replays through the broker ingress.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent
from helpers import BUCKETML, Sink, function_server, wait_until

from bucketml.steps import deadletter as dead_letters
from bucketml.contracts import events
from bucketml.local.broker import Broker
from bucketml.storage import open_storage

MANIFESTS = """\
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: default
spec:
  delivery:
    retry: 1
    backoffPolicy: linear
    backoffDelay: PT0.05S
    deadLetterSink:
      ref:
        apiVersion: serving.knative.dev/v1
        kind: Service
        name: deadletter
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: notify-on-published
spec:
  broker: default
  filter:
    attributes:
      type: bucketml.model.published.v1
  subscriber:
    ref:
      apiVersion: serving.knative.dev/v1
      kind: Service
      name: notifier
"""


def published(model: str = "churn") -> CloudEvent:
    return events.platform_event(events.MODEL_PUBLISHED, "train", model, {"model": model, "version": 3})


def cli(*args: str, bucket: Path, broker: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, BUCKETML_BUCKET=str(bucket), **({"BUCKETML_BROKER_URL": broker} if broker else {}))
    return subprocess.run([BUCKETML, "events", *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(params=["local", "gcs"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "bucket"))
    from bucketml.storage.gcs import GCSStorage

    name = f"dead-{uuid.uuid4().hex[:16]}"
    gcs = GCSStorage(name, endpoint=request.getfixturevalue("fake_gcs"))
    gcs.client.create_bucket(name)
    return gcs


def test_the_store_keeps_one_record_per_event_and_destination_and_replays_the_original(storage):
    event = published()
    failed = CloudEvent({**event.get_attributes(), "knativeerrordest": "http://notifier.test/",
                         "knativeerrorcode": "500", "knativeerrordata": base64.b64encode(b"HTTP 500: boom").decode()},
                        event.get_data())
    first = dead_letters.store(storage, failed)
    again = dead_letters.store(storage, failed)  # at-least-once: the sink may get it twice

    assert again.id == first.id and again.record["times"] == 2
    [listed] = dead_letters.listing(storage)
    assert listed.record["error"] == {"destination": "http://notifier.test/", "code": "500", "message": "HTTP 500: boom"}
    assert listed.record["event"]["data"] == {"model": "churn", "version": 3}
    with pytest.raises(dead_letters.DeadLetterNotFound, match="bucketml events dead"):
        dead_letters.get(storage, "0123456789abcdef")
    with pytest.raises(dead_letters.DeadLetterNotFound, match="16 hex digits"):
        dead_letters.get(storage, "../../models/x")

    with Sink() as broker:
        replayed = dead_letters.replay(storage, first.id, broker.url)
        [sent] = broker.received
    assert len(replayed.record["replays"]) == 1
    # The original event, without what Knative added on its way to the sink.
    assert dict(sent.get_attributes()) == dict(event.get_attributes())
    assert sent.get_data() == {"model": "churn", "version": 3}


def test_what_keeps_failing_reaches_the_dead_letter_function_and_the_cli_replays_it(tmp_path):
    bucket = tmp_path / "bucket"
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "topology.yaml").write_text(MANIFESTS)
    # The notifier fails both attempts (first delivery and one retry), then recovers.
    with Sink(statuses=[500, 500]) as notifier, function_server("deadletter", bucket, tmp_path) as deadletter:
        broker = Broker(folder, {"notifier": notifier.url, "deadletter": deadletter.url}, tmp_path / "broker.db", port=0).start()
        try:
            event = published()
            assert events.post(broker.url, event, timeout=5).status_code == 202

            listing = wait_until(lambda: (out := cli("dead", bucket=bucket)).stdout.count("bucketml.model.published.v1") and out,
                                 "the event to reach the dead-letter store")
            assert listing.returncode == 0, listing.stderr
            letter_id = listing.stdout.split()[0]
            assert f"to {notifier.url}: HTTP 500" in listing.stdout
            shown = json.loads(cli("dead", letter_id, bucket=bucket).stdout)
            assert shown["event"]["attributes"]["id"] == event["id"]
            assert shown["error"]["message"].startswith("HTTP 500")
            assert "could not be delivered" in deadletter.log.read_text()  # logged, with the event id
            assert event["id"] in deadletter.log.read_text()
            assert notifier.received == []

            replay = cli("replay", letter_id, bucket=bucket, broker=broker.url)
            assert replay.returncode == 0, replay.stderr
            assert f"replayed {letter_id}" in replay.stdout
            wait_until(lambda: notifier.received, "the replayed event to reach the recovered notifier")
            assert notifier.received[0]["id"] == event["id"]
            assert "replayed 1x" in cli("dead", bucket=bucket).stdout
        finally:
            broker.shutdown()


def test_the_cli_explains_an_unknown_id_and_an_empty_store(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    empty = cli("dead", bucket=bucket)
    assert empty.returncode == 0 and "no dead letters" in empty.stdout
    unknown = cli("replay", "0123456789abcdef", bucket=bucket, broker="http://127.0.0.1:9")
    assert unknown.returncode == 1 and "no dead letter 0123456789abcdef" in unknown.stderr
