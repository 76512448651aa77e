"""The GCS event source (bucketml.cloud.gcs_source) without a cluster.

The path is the production one with emulators standing in for Google: fake-gcs-server publishes
bucket notifications to a topic of the Pub/Sub emulator, the adapter pulls them and posts the
finalized CloudEvent to the real local broker (`python -m bucketml.local.broker`), and a recording
subscriber behind a Trigger receives what the broker delivers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bucketml.contracts import events
from bucketml.cloud.gcs_source import to_cloud_event
from helpers import (PUBSUB_PROJECT, PUBSUB_TOPIC, ROOT, Sink, churn_frame, free_port, function_server,
                     long_reliability_test, predict_server, pubsub_subscription, stop_process, wait_for_http,
                     wait_until)

PROJECT = PUBSUB_PROJECT
TOPIC = PUBSUB_TOPIC
BUCKET = "uploads"


# --- conversion, no emulator -------------------------------------------------------------------

def _notification(event_type: str = "OBJECT_FINALIZE", **payload) -> tuple[dict, bytes]:
    resource = {
        "kind": "storage#object", "id": "b/datasets/m/a.csv#17", "name": "datasets/m/a.csv", "bucket": "b",
        "generation": "17", "contentType": "text/csv", "size": "8", "md5Hash": "NE/SMj3TPVwFi3zyfeAp6A==",
        "crc32c": "UloUdw==", "timeCreated": "2026-01-02T03:04:05.123456Z", "updated": "2026-01-02T03:04:05.123999Z",
        "storageClass": "STANDARD", "metadata": {"target": "y"}, **payload,
    }
    attributes = {"eventType": event_type, "bucketId": "b", "objectId": "datasets/m/a.csv", "objectGeneration": "17",
                  "payloadFormat": "JSON_API_V1"}
    return attributes, json.dumps(resource).encode()


def test_a_notification_becomes_the_watchers_finalized_event():
    event = to_cloud_event(*_notification())
    expected = {
        "kind": "storage#object", "id": "b/datasets/m/a.csv/17", "bucket": "b", "name": "datasets/m/a.csv",
        "generation": "17", "metageneration": "1", "contentType": "text/csv", "size": "8",
        "md5Hash": "NE/SMj3TPVwFi3zyfeAp6A==", "timeCreated": "2026-01-02T03:04:05.123Z",
        "updated": "2026-01-02T03:04:05.123Z", "storageClass": "STANDARD", "metadata": {"target": "y"},
    }
    assert event.data == expected
    assert event["type"] == events.OBJECT_FINALIZED
    assert event["source"] == "//storage.googleapis.com/projects/_/buckets/b"
    assert event["subject"] == "objects/datasets/m/a.csv"
    assert event["time"] == "2026-01-02T03:04:05.123Z"
    assert event["id"] == events.finalized_event_id("datasets/m/a.csv", 17)
    # Real GCS sends numbers as strings and a metageneration; both survive as strings.
    data = to_cloud_event(*_notification(metageneration="3", size=8)).data
    assert data["metageneration"] == "3"
    assert data["size"] == "8"


def test_other_event_types_are_not_forwarded_and_bad_finalize_data_is_refused():
    assert to_cloud_event(*_notification("OBJECT_DELETE")) is None
    assert to_cloud_event(*_notification("OBJECT_METADATA_UPDATE")) is None
    with pytest.raises(ValueError):
        to_cloud_event(_notification()[0], b"not json")


# --- the whole path over emulators -------------------------------------------------------------

def _stop(process: subprocess.Popen, group: bool = False) -> None:
    stop_process(process, group)


def _subscription(emulator: str, name: str) -> str:
    return pubsub_subscription(emulator, name)


# The `pubsub_emulator` and `notifying_gcs` fixtures are in conftest.py.


@pytest.fixture
def recorder() -> Iterator[Sink]:
    recorder = Sink()
    yield recorder
    recorder.close()


@pytest.fixture
def broker(tmp_path, recorder) -> Iterator[str]:
    """The local broker with one Trigger taking every event to `recorder`."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "broker.yaml").write_text(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n"
        "spec:\n  delivery:\n    retry: 5\n    backoffPolicy: linear\n    backoffDelay: PT0.1S\n")
    (manifests / "triggers.yaml").write_text(
        "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: everything\nspec:\n  broker: default\n"
        "  subscriber:\n    ref:\n      apiVersion: serving.knative.dev/v1\n      kind: Service\n      name: recorder\n")
    with running_broker(manifests, {"recorder": recorder.url}, tmp_path) as url:
        yield url


@contextlib.contextmanager
def running_broker(manifests: Path, subscribers: dict[str, str], tmp_path: Path, port: int | None = None) -> Iterator[str]:
    """`python -m bucketml.local.broker` routing by `manifests` to `subscribers` (Service name -> URL)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    routes = [arg for name, target in subscribers.items() for arg in ("--subscriber", f"{name}={target}")]
    with open(tmp_path / "broker.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bucketml.local.broker", "--manifests", str(manifests), "--db", str(tmp_path / "broker.db"),
             "--port", str(port), *routes],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"{url}/healthz", process, "the broker to listen", tmp_path / "broker.log")
        yield url
    finally:
        _stop(process)


class Adapter:
    """`python -m bucketml.cloud.gcs_source` as a Knative ContainerSource runs it (settings in the environment)."""

    def __init__(self, emulator: str, subscription: str, sink: str, log_dir: Path):
        self.env = dict(os.environ, PUBSUB_EMULATOR_HOST=emulator, GOOGLE_CLOUD_PROJECT=PROJECT,
                        BUCKETML_PUBSUB_SUBSCRIPTION=subscription, K_SINK=sink, PYTHONUNBUFFERED="1")
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log_dir / f"adapter-{self.starts}.log", "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "bucketml.cloud.gcs_source"], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return "\n".join((self.log_dir / f"adapter-{n}.log").read_text() for n in range(1, self.starts + 1))

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod: the adapter must end cleanly and at once."""
        if self.process is not None and self.process.poll() is None:
            started = time.monotonic()
            _stop(self.process)
            assert self.process.returncode == 0, f"the adapter exited with {self.process.returncode}:\n{self.logs()[-3000:]}"
            assert time.monotonic() - started < 5, "the adapter took more than 5 s to stop"
        assert "Traceback" not in self.logs(), self.logs()


@contextlib.contextmanager
def adapter_to(emulator: str, subscription: str, sink: str, log_dir: Path, tail: int = 3000) -> Iterator[Adapter]:
    """A started Adapter posting to `sink`; stopped (and its log tail printed) on the way out."""
    adapter = Adapter(emulator, subscription, sink, log_dir)
    adapter.start()
    try:
        yield adapter
    finally:
        adapter.stop()
        print(adapter.logs()[-tail:])


def _storage(endpoint: str):
    from bucketml.storage.gcs import GCSStorage

    storage = GCSStorage(BUCKET, endpoint=endpoint)
    try:
        storage.client.create_bucket(BUCKET)
    except Exception as exc:  # the module's second test finds it there
        if "409" not in str(exc) and "already" not in str(exc).lower():
            raise
    return storage


def _assert_matches_object(event, storage) -> None:
    """The event is exactly what finalized_event builds from the object as the GCS client sees it."""
    info = storage.stat(event.data["name"])
    expected = events.finalized_event(BUCKET, info.event_data(), id_=events.finalized_event_id(info.name, info.generation))
    for attribute in ("specversion", "type", "source", "subject", "id", "time", "datacontenttype"):
        assert event[attribute] == expected[attribute], attribute
    assert event.data == expected.data


def _upload(storage, name: str, n: int):
    return storage.write(name, f"x,label\n{n},{n % 2}\n".encode(), content_type="text/csv",
                         metadata={"target": "label", "n": str(n)})


@pytest.mark.parametrize("env, missing", [
    ({"K_SINK": "http://127.0.0.1:9", "GOOGLE_CLOUD_PROJECT": "p"}, "no subscription: pass --subscription or set BUCKETML_PUBSUB_SUBSCRIPTION"),
    ({"K_SINK": "http://127.0.0.1:9", "BUCKETML_PUBSUB_SUBSCRIPTION": "s"}, "no project: pass --project or set GOOGLE_CLOUD_PROJECT"),
    ({"BUCKETML_PUBSUB_SUBSCRIPTION": "projects/p/subscriptions/s"}, "no sink: pass --sink or set K_SINK"),
])
def test_a_missing_setting_is_a_usage_error_naming_its_flag_and_variable(env, missing):
    clean = {k: v for k, v in os.environ.items() if k not in ("K_SINK", "GOOGLE_CLOUD_PROJECT", "BUCKETML_PUBSUB_SUBSCRIPTION")}
    done = subprocess.run([sys.executable, "-m", "bucketml.cloud.gcs_source"], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and missing in done.stderr, done.stderr


@long_reliability_test
def test_every_upload_reaches_the_broker_even_when_the_adapter_is_killed(
        pubsub_emulator, notifying_gcs, broker, recorder, tmp_path):
    storage = _storage(notifying_gcs)
    with adapter_to(pubsub_emulator, _subscription(pubsub_emulator, "to-broker"), broker, tmp_path, tail=5000) as adapter:
        # 1. Each upload arrives, through the broker, as the finalized event of that object.
        first = [f"datasets/m{n % 2}/first-{n}.csv" for n in range(5)]
        for n, name in enumerate(first):
            _upload(storage, name, n)
        storage.delete(first[0])  # an OBJECT_DELETE notification: acknowledged, never forwarded
        _upload(storage, first[0], 99)  # a new generation: a new event
        wait_until(lambda: len(recorder.received) >= 6, "the first uploads' events", timeout=20)
        time.sleep(0.5)  # anything else (a delete event) would have arrived by now
        assert {e["type"] for e in recorder.received} == {events.OBJECT_FINALIZED}
        assert recorder.names() == set(first)
        for event in recorder.received:
            if event.data["name"] == first[0] and event.data["metadata"]["n"] == "0":
                assert event.data["generation"] != str(storage.stat(first[0]).generation)  # the overwritten one
                continue
            _assert_matches_object(event, storage)
        assert "ignored OBJECT_DELETE" in adapter.logs()

        # 2. SIGKILL mid-stream while uploads continue; a restarted adapter delivers what was lost.
        second = [f"datasets/m/second-{n:03d}.csv" for n in range(60)]
        uploaded: list[str] = []

        def upload_all() -> None:
            for n, name in enumerate(second):
                _upload(storage, name, n)
                uploaded.append(name)
                time.sleep(0.02)

        uploader = threading.Thread(target=upload_all)
        uploader.start()
        wait_until(lambda: len(recorder.names() & set(second)) >= 10, "some of the stream to arrive", timeout=20)
        adapter.process.kill()  # SIGKILL: no chance to ack or nack anything
        adapter.process.wait()
        uploaded_at_kill = len(uploaded)
        time.sleep(0.5)  # uploads go on while nothing is pulling
        adapter.start()
        uploader.join(30)
        assert uploaded_at_kill < len(second), "the adapter was killed after the stream had ended"
        assert len(uploaded) == len(second)
        wait_until(lambda: set(second) <= recorder.names(), "every upload of the stream after the restart", timeout=30)
        for event in recorder.received:
            if event.data["name"] in second:
                _assert_matches_object(event, storage)


def test_an_event_the_sink_refuses_is_redelivered(pubsub_emulator, notifying_gcs, tmp_path):
    """Acknowledged only after a 2xx: a sink answering 503 (or gone) gets the event again."""
    storage = _storage(notifying_gcs)
    with Sink(statuses=[503, 500, 429]) as sink, \
            adapter_to(pubsub_emulator, _subscription(pubsub_emulator, "to-refusing-sink"), sink.url, tmp_path) as adapter:
        _upload(storage, "datasets/r/refused.csv", 1)
        wait_until(lambda: sink.names() == {"datasets/r/refused.csv"}, "the refused event to be redelivered", timeout=30)
        assert adapter.logs().count("will be redelivered") >= 3
        _assert_matches_object(sink.received[0], storage)


@long_reliability_test
def test_an_event_in_flight_when_the_adapter_is_killed_is_redelivered(pubsub_emulator, notifying_gcs, tmp_path):
    """SIGKILL while the sink has not answered: the message was never acknowledged, so once its
    lease (LEASE_SECONDS) runs out Pub/Sub hands it to the restarted adapter."""
    storage = _storage(notifying_gcs)
    with Sink(hold=True) as sink, \
            adapter_to(pubsub_emulator, _subscription(pubsub_emulator, "to-slow-sink"), sink.url, tmp_path) as adapter:
        _upload(storage, "datasets/k/in-flight.csv", 1)
        wait_until(lambda: sink.held >= 1, "the adapter to post the event", timeout=20)
        adapter.process.kill()
        adapter.process.wait()
        sink.release()  # the held request is answered 503 to nobody
        killed_at = time.monotonic()
        adapter.start()
        wait_until(lambda: sink.names() == {"datasets/k/in-flight.csv"}, "the in-flight event after the restart", timeout=25)
        assert time.monotonic() - killed_at < 20  # the lease is 10 s, not the client library's 60
        _assert_matches_object(sink.received[0], storage)


def test_an_upload_on_the_production_event_path_ends_in_a_served_model(pubsub_emulator, notifying_gcs, tmp_path):
    """The path a cluster without Eventarc runs, without the cluster: the bucket notifies
    Pub/Sub, the adapter posts to the broker (routing by infra/knative), and the three
    functions work on the GCS backend until predict serves the model."""
    storage = _storage(notifying_gcs)
    bucket, env = f"gs://{BUCKET}", {"STORAGE_EMULATOR_HOST": notifying_gcs}
    broker_port = free_port()
    broker_url = f"http://127.0.0.1:{broker_port}"
    subscription = _subscription(pubsub_emulator, "production-path")
    with function_server("preprocess", bucket, tmp_path, env) as preprocess, \
            function_server("train", bucket, tmp_path, {**env, "BUCKETML_BROKER_URL": broker_url}) as train, \
            predict_server(bucket, tmp_path, env=env) as predict, \
            function_server("deadletter", bucket, tmp_path, env) as deadletter, \
            function_server("batch", bucket, tmp_path, env) as batch:
        subscribers = {"preprocess": preprocess.url, "train": train.url, "predict": predict.url, "deadletter": deadletter.url,
                       "batch": batch.url}
        manifests = ROOT / "infra" / "knative"
        with running_broker(manifests, subscribers, tmp_path, broker_port), \
                adapter_to(pubsub_emulator, subscription, broker_url, tmp_path):
            upload = storage.write("datasets/churn/customers.csv", churn_frame(seed=6).to_csv(index=False).encode(),
                                   content_type="text/csv", metadata={"algorithms": "logistic_regression"})
            wait_until(lambda: predict.version_of("churn") == 1, "predict to serve the uploaded model", timeout=120)
            record = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}
            answer = predict.predict({"model": "churn", "records": [record]})
            assert answer.status_code == 200 and answer.json()["version"] == 1, answer.text
            card = json.loads(storage.read("models/churn/versions/1/card.json"))
            assert card["lineage"]["upload"]["name"] == upload.name
            assert str(card["lineage"]["upload"]["generation"]) == str(upload.generation)
