"""The local broker over real HTTP: a broker on a free port, real subscriber servers, real CloudEvents."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import requests
from bucketml.contracts import events
from bucketml.local.broker import Broker, ManifestError, load_topology, parse_duration
from bucketml.local.broker.triggers import Delivery
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

REPO = Path(__file__).resolve().parents[1]

BROKER = """
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata:
  name: default
spec:
  delivery:
    retry: {retry}
    backoffPolicy: {policy}
    backoffDelay: PT0.05S
"""


def trigger(name: str, service: str, filter_: dict[str, str] | None = None, uri: str | None = None, delivery: str = "") -> str:
    lines = ["---", "apiVersion: eventing.knative.dev/v1", "kind: Trigger", f"metadata:\n  name: {name}", "spec:", "  broker: default"]
    if filter_:
        lines.append("  filter:\n    attributes:")
        lines += [f"      {key}: {value}" for key, value in filter_.items()]
    lines.append(f"  subscriber:\n    ref:\n      apiVersion: serving.knative.dev/v1\n      kind: Service\n      name: {service}")
    if uri:
        lines.append(f"    uri: {uri}")
    if delivery:
        lines.append(f"  delivery:\n{delivery}")
    return "\n".join(lines) + "\n"


def write_manifests(folder: Path, *triggers: str, retry: int = 0, policy: str = "exponential") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "broker.yaml").write_text(BROKER.format(retry=retry, policy=policy))
    (folder / "triggers.yml").write_text("".join(triggers))
    return folder


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Subscriber:
    """A real HTTP function stand-in; `handler(request, n)` answers the n-th request (1-based)."""

    def __init__(self, handler: Callable[[Request, int], Response] | None = None):
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._handler = handler or (lambda request, n: Response(status=202))
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def _app(self, environ, start_response):
        request = Request(environ)
        with self._lock:
            self.received.append(Received(request.path, {k.lower(): v for k, v in request.headers.items()}, request.get_data(), time.monotonic()))
            n = len(self.received)
        return self._handler(request, n)(environ, start_response)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def subscriber():
    started: list[Subscriber] = []

    def start(handler=None) -> Subscriber:
        started.append(Subscriber(handler))
        return started[-1]

    yield start
    for sub in started:
        sub.stop()


@pytest.fixture
def broker(tmp_path):
    started: list[Broker] = []

    def start(manifests: Path, subscribers: dict[str, str], db: Path | None = None, **kwargs) -> Broker:
        instance = Broker(manifests, subscribers, db or tmp_path / "broker.db", port=0, shutdown_grace=kwargs.pop("shutdown_grace", 1.0), **kwargs)
        started.append(instance.start())
        return instance

    yield start
    for instance in started:
        instance.shutdown()


def event(type_: str, model: str | None = "iris", data: dict | None = None) -> CloudEvent:
    attributes = {"type": type_, "source": "/tests", "subject": model or "none", "datacontenttype": "application/json"}
    if model:
        attributes[events.MODEL_ATTRIBUTE] = model
    return CloudEvent(attributes, data if data is not None else {"model": model})


def send(target: Broker, ce: CloudEvent, *, structured: bool = False, path: str = "/") -> int:
    headers, body = (to_structured if structured else to_binary)(ce)
    response = requests.post(target.url + path, headers=headers, data=body, timeout=5)
    assert response.status_code == 202, response.text
    return response.json()["seq"]


def get(target: Broker, path: str, **params) -> dict:
    response = requests.get(target.url + path, params=params, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(predicate: Callable[[], object], timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def settled(target: Broker, seq: int) -> dict | None:
    """The event once none of its deliveries is pending any more."""
    found = get(target, f"/events/{seq}")
    return found if all(d["status"] != "pending" for d in found["deliveries"]) else None


def test_routes_by_filter_attributes_in_binary_mode(tmp_path, subscriber, broker):
    a, b, everything = subscriber(), subscriber(), subscriber()
    folder = write_manifests(
        tmp_path / "m",
        trigger("to-a", "a", {"type": "test.a.v1"}),
        trigger("to-b", "b", {"type": "test.b.v1", events.MODEL_ATTRIBUTE: "iris"}),
        trigger("to-all", "everything"),
        # Other kinds in the folder are not the broker's business.
        "---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: a\n",
    )
    target = broker(folder, {"a": a.url, "b": b.url, "everything": everything.url})

    first = event("test.a.v1", data={"rows": 150})
    seqs = [send(target, first, structured=True), send(target, event("test.b.v1")), send(target, event("test.b.v1", model="wine"))]
    for seq in seqs:
        wait_until(lambda: settled(target, seq))

    assert [r.headers["ce-type"] for r in a.received] == ["test.a.v1"]
    assert [r.headers["ce-bucketmlmodel"] for r in b.received] == ["iris"]
    assert len(everything.received) == 3
    delivered = a.received[0]
    assert delivered.headers["ce-specversion"] == "1.0"
    assert delivered.headers["ce-id"] == first["id"]
    assert delivered.headers["ce-source"] == "/tests"
    assert delivered.headers["ce-subject"] == "iris"
    assert delivered.headers["ce-bucketmlmodel"] == "iris"
    assert delivered.headers["content-type"] == "application/json"
    assert json.loads(delivered.body) == {"rows": 150}
    assert [d["trigger"] for d in get(target, f"/events/{seqs[0]}")["deliveries"]] == ["to-a", "to-all"]


def test_reply_event_is_routed_to_the_next_trigger(tmp_path, subscriber, broker, caplog):
    caplog.set_level(logging.INFO, logger="bucketml.broker")

    def prepare(request: Request, n: int) -> Response:
        received = events.parse_request(request.headers, request.get_data())
        reply = events.platform_event(events.DATASET_PREPARED, "preprocess", "iris", {"upload": received["id"]})
        body, status, headers = events.binary_response(reply)
        return Response(body, status, headers)

    preprocess, train = subscriber(prepare), subscriber()
    folder = write_manifests(
        tmp_path / "m",
        trigger("prep", "preprocess", {"type": events.OBJECT_FINALIZED}),
        trigger("train", "train", {"type": events.DATASET_PREPARED}),
    )
    target = broker(folder, {"preprocess": preprocess.url, "train": train.url})

    upload = events.finalized_event("uploads", {"name": "iris/data.csv", "bucket": "uploads"})
    seq = send(target, upload)

    wait_until(lambda: train.received)
    assert train.received[0].headers["ce-type"] == events.DATASET_PREPARED
    assert json.loads(train.received[0].body) == {"upload": upload["id"]}
    listed = get(target, "/events")["events"]
    assert [e["type"] for e in listed] == [events.OBJECT_FINALIZED, events.DATASET_PREPARED]
    assert listed[1]["source"] == "/bucketml/preprocess" and listed[1]["model"] == "iris"
    assert get(target, f"/events/{seq}")["deliveries"][0]["status"] == "delivered"
    wait_until(lambda: settled(target, listed[1]["seq"]))
    messages = [r.getMessage() for r in caplog.records if r.name == "bucketml.broker"]
    assert any(m.startswith(f"accepted seq={seq} type={events.OBJECT_FINALIZED}") for m in messages)
    assert any(m.startswith(f"delivered seq={seq} -> prep (200, reply {events.DATASET_PREPARED}") for m in messages)


def test_retries_with_backoff_then_delivers(tmp_path, subscriber, broker):
    flaky = subscriber(lambda request, n: Response("busy", status=503) if n <= 2 else Response(status=200))
    folder = write_manifests(tmp_path / "m", trigger("flaky", "flaky"), retry=3)
    target = broker(folder, {"flaky": flaky.url})

    seq = send(target, event("test.a.v1"))

    found = wait_until(lambda: settled(target, seq))
    assert found["deliveries"][0]["status"] == "delivered"
    assert found["deliveries"][0]["attempts"] == 3
    times = [r.at for r in flaky.received]
    # Exponential backoff with PT0.05S: 0.1s before the first retry, 0.2s before the second.
    assert times[1] - times[0] >= 0.09
    assert times[2] - times[1] >= 0.19


def test_dead_letter_after_retries_are_exhausted(tmp_path, subscriber, broker):
    down = subscriber(lambda request, n: Response("overloaded", status=503))
    folder = write_manifests(tmp_path / "m", trigger("down", "down"), retry=2, policy="linear")
    target = broker(folder, {"down": down.url})

    seq = send(target, event("test.a.v1"))

    dead = wait_until(lambda: get(target, "/deadletters")["deadletters"])
    assert len(dead) == 1
    assert dead[0]["trigger"] == "down"
    assert dead[0]["attempts"] == 3
    assert dead[0]["last_error"] == "HTTP 503: overloaded"
    assert dead[0]["event"]["seq"] == seq and dead[0]["event"]["type"] == "test.a.v1"
    assert len(down.received) == 3


@pytest.mark.parametrize(
    "reply, error",
    [
        (lambda: Response("missing column 'species'", status=400), "HTTP 400: missing column 'species'"),
        (lambda: Response("ok", status=200, mimetype="text/plain"), "HTTP 200 with a 2-byte text/plain; charset=utf-8 body that is not a CloudEvent"),
    ],
    ids=["http-400", "non-event-2xx-body"],
)
def test_permanent_failure_goes_dead_at_once(tmp_path, subscriber, broker, reply, error):
    picky = subscriber(lambda request, n: reply())
    folder = write_manifests(tmp_path / "m", trigger("picky", "picky"), retry=5)
    target = broker(folder, {"picky": picky.url})

    seq = send(target, event("test.a.v1"))

    delivery = wait_until(lambda: settled(target, seq))["deliveries"][0]
    assert (delivery["status"], delivery["attempts"]) == ("dead", 1)
    assert delivery["last_error"].startswith(error)
    assert len(picky.received) == 1


DEAD_LETTER_SINK = """\
    deadLetterSink:
      ref:
        apiVersion: serving.knative.dev/v1
        kind: Service
        name: sink
"""


def test_the_dead_letter_sink_gets_where_and_why_the_delivery_failed(tmp_path, subscriber, broker):
    down = subscriber(lambda request, n: Response("overloaded", status=503))
    sink = subscriber()
    folder = write_manifests(tmp_path / "m", trigger("down", "down", delivery=DEAD_LETTER_SINK))
    target = broker(folder, {"down": down.url, "sink": sink.url})

    seq = send(target, event("test.a.v1"))

    deliveries = wait_until(lambda: settled(target, seq))["deliveries"]
    assert [(d["trigger"], d["status"]) for d in deliveries] == [("down", "dead"), ("down/dead-letter-sink", "delivered")]
    [received] = sink.received
    assert received.headers["ce-knativeerrordest"] == down.url
    assert received.headers["ce-knativeerrorcode"] == "503"
    assert base64.b64decode(received.headers["ce-knativeerrordata"]) == b"HTTP 503: overloaded"


def test_the_error_code_is_left_out_when_no_status_came_back(tmp_path, subscriber, broker):
    sink = subscriber()
    folder = write_manifests(tmp_path / "m", trigger("gone", "gone", delivery=DEAD_LETTER_SINK))
    target = broker(folder, {"gone": "http://127.0.0.1:9", "sink": sink.url})  # nothing listens on port 9

    send(target, event("test.a.v1"))

    wait_until(lambda: sink.received, timeout=10)
    [received] = sink.received
    assert received.headers["ce-knativeerrordest"] == "http://127.0.0.1:9"
    assert "ce-knativeerrorcode" not in received.headers and "ce-knativeerrordata" in received.headers


# The deliveries table as the previous release created it: a fixed piece of history, so written
# out here rather than derived from the store's current schema.
PREVIOUS_RELEASE_DELIVERIES = (
    "CREATE TABLE deliveries (id INTEGER PRIMARY KEY, event_seq INTEGER NOT NULL REFERENCES events (seq),"
    " trigger_name TEXT NOT NULL, subscriber TEXT NOT NULL,"
    " status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')), attempts INTEGER NOT NULL DEFAULT 0,"
    " next_attempt_at REAL, last_error TEXT, updated_at TEXT NOT NULL)"
)


def test_a_database_from_the_previous_release_keeps_its_pending_dead_letters(tmp_path, subscriber, broker):
    """Before the kind and last_status columns, a delivery to a dead-letter sink was named
    `<trigger>/dead-letter-sink` and the status lived only in the error text."""
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as old:
        old.execute(PREVIOUS_RELEASE_DELIVERIES)
        old.execute(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, source TEXT NOT NULL,"
            " type TEXT NOT NULL, subject TEXT, attributes TEXT NOT NULL, data BLOB NOT NULL, received_at TEXT NOT NULL)"
        )
        attributes = {"specversion": "1.0", "id": "e1", "source": "/tests", "type": "test.a.v1"}
        old.execute("INSERT INTO events VALUES (1, 'e1', '/tests', 'test.a.v1', NULL, ?, x'', '2024-05-01T10:00:00.000Z')",
                    (json.dumps(attributes),))
        old.execute("INSERT INTO deliveries VALUES (1, 1, 'down', 'http://down.test/', 'dead', 3, NULL,"
                    " 'HTTP 502: bad gateway', '2024-05-01T10:00:01.000Z')")
        old.execute("INSERT INTO deliveries VALUES (2, 1, 'down/dead-letter-sink', 'http://old-sink.test/', 'pending', 0, 0,"
                    " NULL, '2024-05-01T10:00:01.000Z')")
    sink = subscriber()
    folder = write_manifests(tmp_path / "m", trigger("down", "down", delivery=DEAD_LETTER_SINK))
    target = broker(folder, {"down": "http://down.test/", "sink": sink.url}, db)

    deliveries = wait_until(lambda: settled(target, 1))["deliveries"]
    assert [(d["trigger"], d["status"]) for d in deliveries] == [("down", "dead"), ("down/dead-letter-sink", "delivered")]
    [received] = sink.received
    assert received.headers["ce-knativeerrordest"] == "http://down.test/"
    assert received.headers["ce-knativeerrorcode"] == "502"


def test_rejects_bad_requests(tmp_path, broker):
    target = broker(write_manifests(tmp_path / "m"), {})

    def post(body: bytes, headers: dict[str, str], path: str = "/") -> requests.Response:
        return requests.post(target.url + path, data=body, headers=headers, timeout=5)

    not_json = post(b"{not json", {"content-type": "application/cloudevents+json"})
    assert not_json.status_code == 400 and "not a valid CloudEvent" in not_json.json()["error"]
    no_type = post(b"{}", {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x", "content-type": "application/json"})
    assert no_type.status_code == 400 and "error" in no_type.json()
    too_big = post(b"x" * (10 * 1024 * 1024 + 1), {"content-type": "application/json"})
    assert too_big.status_code == 413 and "error" in too_big.json()
    headers, body = to_binary(event("test.a.v1"))
    assert post(body, headers, "/bucketml/default").status_code == 202
    assert post(body, headers, "/bucketml/elsewhere").status_code == 404
    assert requests.get(target.url + "/events", params={"limit": "many"}, timeout=5).status_code == 400
    assert requests.get(target.url + "/events/99", timeout=5).status_code == 404
    assert [e["seq"] for e in get(target, "/events")["events"]] == [1]


def test_restart_resumes_pending_deliveries(tmp_path, subscriber, broker):
    folder = write_manifests(tmp_path / "m", trigger("later", "later"), retry=50, policy="linear")
    with socket.socket() as probe:  # a port nobody listens on: the subscriber is down
        probe.bind(("127.0.0.1", 0))
        down_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    first = broker(folder, {"later": down_url})
    sent = [event("test.a.v1"), event("test.a.v1", model="wine")]
    seqs = [send(first, ce) for ce in sent]
    wait_until(lambda: all(get(first, f"/events/{s}")["deliveries"][0]["attempts"] >= 1 for s in seqs))
    first.shutdown()

    later = subscriber()
    second = broker(folder, {"later": later.url})
    for seq in seqs:
        assert wait_until(lambda: settled(second, seq))["deliveries"][0]["status"] == "delivered"
    assert sorted(r.headers["ce-id"] for r in later.received) == sorted(ce["id"] for ce in sent)


def test_delivery_in_flight_at_shutdown_stays_pending(tmp_path, subscriber, broker):
    gate = threading.Event()
    try:
        stuck = subscriber(lambda request, n: gate.wait(10) and Response(status=200))
        folder = write_manifests(tmp_path / "m", trigger("slow", "slow"))
        first = broker(folder, {"slow": stuck.url}, shutdown_grace=0.1)
        seq = send(first, event("test.a.v1"))
        wait_until(lambda: stuck.received)
        first.shutdown()

        fresh = subscriber()
        second = broker(folder, {"slow": fresh.url})
        delivery = wait_until(lambda: settled(second, seq))["deliveries"][0]
        assert delivery["status"] == "delivered"
        assert fresh.received[0].headers["ce-id"] == stuck.received[0].headers["ce-id"]
    finally:
        gate.set()


def test_events_filtering(tmp_path, broker):
    target = broker(write_manifests(tmp_path / "m"), {})
    send(target, event("test.a.v1", data={"n": 1}))
    send(target, event("test.b.v1"))
    send(target, event("test.a.v1", model="wine"))
    send(target, event("test.a.v1", model=None))

    def seqs(**params) -> list[int]:
        return [e["seq"] for e in get(target, "/events", **params)["events"]]

    assert seqs() == [1, 2, 3, 4]
    assert seqs(type="test.a.v1") == [1, 3, 4]
    assert seqs(model="iris") == [1, 2]
    assert seqs(type="test.a.v1", model="iris") == [1]
    assert seqs(after=2) == [3, 4]
    assert seqs(after=1, limit=2) == [2, 3]
    assert seqs(order="desc") == [4, 3, 2, 1]  # newest first: the console's events page
    assert seqs(order="desc", limit=2, type="test.a.v1") == [4, 3]
    assert seqs(order="desc", before=3) == [2, 1]
    assert seqs(after=1, before=4) == [2, 3]
    assert requests.get(target.url + "/events", params={"order": "up"}, timeout=5).status_code == 400
    listed = get(target, "/events", limit=1)["events"][0]
    assert set(listed) == {"seq", "id", "type", "source", "subject", "time", "model", "data", "received_at"}
    assert (listed["model"], listed["data"]) == ("iris", {"n": 1})
    one = get(target, "/events/4")
    assert one["model"] is None and one["deliveries"] == [] and one["attributes"]["type"] == "test.a.v1"
    assert get(target, "/healthz") == {"status": "ok"}


def test_real_manifests_route_each_platform_event_type(tmp_path, subscriber, broker):
    services = {name: subscriber() for name in ("preprocess", "train", "predict", "deadletter", "batch")}
    target = broker(REPO / "infra" / "knative", {name: sub.url for name, sub in services.items()})
    expected = {
        events.OBJECT_FINALIZED: [("preprocess", "/"), ("batch", "/")],  # each acts on its own folder
        events.DATASET_PREPARED: [("train", "/")],
        events.MODEL_PUBLISHED: [("predict", "/reload")],
    }

    sent = {events.OBJECT_FINALIZED: send(target, events.finalized_event("uploads", {"name": "iris/data.csv"}))}
    for type_ in events.PLATFORM_TYPES:
        sent[type_] = send(target, events.platform_event(type_, "tests", "iris", {"model": "iris"}))
    for seq in sent.values():
        wait_until(lambda: settled(target, seq))

    for type_, seq in sent.items():
        deliveries = get(target, f"/events/{seq}")["deliveries"]
        if type_ in expected:
            assert [d["status"] for d in deliveries] == ["delivered"] * len(expected[type_]), type_
        else:
            assert deliveries == [], f"{type_} has no trigger in infra/knative"
    for type_, routes in expected.items():
        for name, path in routes:
            assert [(r.headers["ce-type"], r.path) for r in services[name].received] == [(type_, path)]
    assert services["deadletter"].received == []  # every delivery succeeded


def test_a_trigger_with_its_own_delivery_does_not_use_the_brokers_dead_letter_sink(tmp_path, subscriber, broker):
    """Knative's rule: the Broker's delivery (sink, retries, backoff) applies only to Triggers
    without a delivery of their own; it is never merged into one that has it."""
    down = subscriber(lambda request, n: Response("overloaded", status=503))
    sink = subscriber()
    folder = write_manifests(tmp_path / "m", trigger("own", "down", {"type": "test.own.v1"}, delivery="    timeout: PT5S\n"),
                             trigger("inherits", "down", {"type": "test.inherits.v1"}), retry=2)
    (folder / "broker.yaml").write_text((folder / "broker.yaml").read_text() + DEAD_LETTER_SINK)
    target = broker(folder, {"down": down.url, "sink": sink.url})

    seq = send(target, event("test.own.v1"))
    own = wait_until(lambda: settled(target, seq))["deliveries"]
    # No retries and no dead-letter sink: both came only from the Broker.
    assert [(d["trigger"], d["status"], d["attempts"]) for d in own] == [("own", "dead", 1)]
    assert sink.received == []

    seq = send(target, event("test.inherits.v1"))
    inherits = wait_until(lambda: settled(target, seq))["deliveries"]
    assert [(d["trigger"], d["status"]) for d in inherits] == [("inherits", "dead"), ("inherits/dead-letter-sink", "delivered")]
    assert inherits[0]["attempts"] == 3  # the first try and the Broker's two retries
    assert [r.headers["ce-type"] for r in sink.received] == ["test.inherits.v1"]


def test_real_manifests_triggers_with_their_own_delivery_keep_the_sink_and_backoff():
    topology = load_topology(REPO / "infra" / "knative", {"preprocess": "http://p", "train": "http://t", "predict": "http://s:8080",
                                                          "deadletter": "http://d", "batch": "http://b"})
    train = topology.trigger("train-on-prepared")
    assert train.delivery == Delivery(retry=5, backoff_policy="exponential", backoff_delay=0.5, timeout=1800.0,
                                      dead_letter_sink="http://d")
    preprocess = topology.trigger("preprocess-on-upload")
    assert preprocess.delivery == Delivery(retry=5, backoff_policy="exponential", backoff_delay=0.5, timeout=300.0,
                                           dead_letter_sink="http://d")
    batch = topology.trigger("batch-on-upload")
    assert batch.delivery == Delivery(retry=5, backoff_policy="exponential", backoff_delay=0.5, timeout=1800.0,
                                      dead_letter_sink="http://d")
    # predict-on-published has no delivery of its own: the Broker's applies.
    assert topology.trigger("predict-on-published").delivery == topology.brokers["default"]
    assert topology.trigger("predict-on-published").subscriber == "http://s:8080/reload"
    assert [train.delivery.backoff(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert Delivery(backoff_policy="linear", backoff_delay=0.5).backoff(3) == 1.5


def test_manifest_errors_name_file_and_trigger(tmp_path):
    folder = write_manifests(tmp_path / "m", trigger("orphan", "ghost"))
    with pytest.raises(ManifestError, match=r"triggers\.yml: Trigger 'orphan': no URL for subscriber Service 'ghost'"):
        load_topology(folder, {"a": "http://a"})
    write_manifests(folder, trigger("bad", "a", delivery="    backoffDelay: 5s"))
    with pytest.raises(ManifestError, match=r"Trigger 'bad': delivery: '5s' is not an ISO 8601 duration"):
        load_topology(folder, {"a": "http://a"})


def test_parse_duration():
    assert parse_duration("PT0.5S") == 0.5
    assert parse_duration("PT2M") == 120
    assert parse_duration("P1DT1H30M") == 91800
    for bad in ("P", "PT", "P1M", "PT1S1M", "0.5"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_cli_runs_and_stops_cleanly_on_sigterm(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = write_manifests(tmp_path / "m", trigger("a", "a"))
    process = subprocess.Popen(
        [sys.executable, "-m", "bucketml.local.broker", "--manifests", str(folder), "--db", str(tmp_path / "cli.db"),
         "--port", str(port), "--subscriber", "a=http://127.0.0.1:9"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        def healthy() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(healthy, timeout=10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "listening on http://127.0.0.1:" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
