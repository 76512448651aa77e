"""Canary rollouts: `bucketml canary` names a second version in the pointer, every predict replica
sends that share of unpinned requests to it (the answer says which version computed it), pinned
requests are unaffected, and `bucketml promote` / `bucketml rollback` end it; each step is a
bucketml.rollout.* event posted to the broker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import types
from collections import Counter

import prometheus_client

from helpers import BUCKETML, Sink, churn_frame, predict_server, publish, wait_until

from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage

RECORD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}
QUICK = {"algorithms": "logistic_regression"}


def cli(bucket, broker: str, *args: str, predict_url: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, BUCKETML_BUCKET=str(bucket), BUCKETML_BROKER_URL=broker)
    if predict_url:
        env["BUCKETML_PREDICT_URL"] = predict_url
    return subprocess.run([BUCKETML, *args], capture_output=True, text=True, env=env, timeout=60)


def canary_of(server, model: str) -> dict | None:
    return server.get("/v2/health/ready").json().get("canaries", {}).get(model)


def test_a_canary_at_30_percent_answers_about_30_percent_of_unpinned_requests(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    publish(storage, "churn", churn_frame(seed=1), "first.csv", QUICK)
    publish(storage, "churn", churn_frame(seed=2), "second.csv", QUICK)
    registry.move_pointer("churn", 1, reason="version 1 is the stable one, for the test")
    registry.start_canary("churn", 2, 30)
    with predict_server(storage.root, tmp_path, 0.2) as server:
        wait_until(lambda: canary_of(server, "churn") == {"version": 2, "percent": 30}, "the canary to be followed")
        assert server.version_of("churn") == 1  # metadata and readiness name the current version

        answered = Counter()
        for _ in range(400):
            response = server.predict({"model": "churn", "records": [RECORD]})
            assert response.status_code == 200, response.text
            version = response.json()["version"]
            assert response.headers["Bucketml-Model-Version"] == str(version)
            answered[version] += 1
        assert set(answered) == {1, 2}
        assert 80 <= answered[2] <= 160, answered  # 20% to 40% of 400

        # V1 and V2 inference are routed too; a pinned request never is.
        v1 = Counter(server.post("/v1/models/churn:predict", {"instances": [RECORD]}).json()["version"] for _ in range(60))
        assert set(v1) == {1, 2}, v1
        for pinned in (1, 2):
            for _ in range(30):
                assert server.predict({"model": "churn", "version": pinned, "records": [RECORD]}).json()["version"] == pinned

        registry.end_canary("churn")
        wait_until(lambda: canary_of(server, "churn") is None, "the canary to be dropped")
        assert {server.predict({"model": "churn", "records": [RECORD]}).json()["version"] for _ in range(50)} == {1}


def test_canary_promote_and_rollback_from_the_cli_are_events(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    for seed in (1, 2, 3):
        publish(storage, "churn", churn_frame(seed=seed), f"{seed}.csv", QUICK)
    registry.move_pointer("churn", 1, reason="version 1 is the stable one, for the test")
    with Sink() as broker, predict_server(storage.root, tmp_path, 0.2) as server:
        started = cli(storage.root, broker.url, "canary", "churn", "2", "--percent", "30")
        assert started.returncode == 0, started.stderr
        assert "churn: canary version 2 answers 30% of unpinned requests; version 1 the rest" in started.stdout
        wait_until(lambda: canary_of(server, "churn") == {"version": 2, "percent": 30}, "the canary to be followed")
        for _ in range(40):
            server.predict({"model": "churn", "records": [RECORD]})

        rolled = cli(storage.root, broker.url, "rollback", "churn", predict_url=server.url)
        assert rolled.returncode == 0, rolled.stderr
        assert "canary version 2 rolled back; version 1 answers every unpinned request" in rolled.stdout
        pointer = registry.current("churn")
        assert pointer.version == 1 and Registry.canary_of(pointer) is None

        cli(storage.root, broker.url, "canary", "churn", "3", "--percent", "50")
        wait_until(lambda: canary_of(server, "churn") == {"version": 3, "percent": 50}, "the second canary")
        promoted = cli(storage.root, broker.url, "promote", "churn", "3", predict_url=server.url)
        assert promoted.returncode == 0, promoted.stderr
        assert "churn: current version 1 -> 3" in promoted.stdout and "canary version 3 promoted" in promoted.stdout
        pointer = registry.current("churn")
        assert pointer.version == 3 and Registry.canary_of(pointer) is None
        wait_until(lambda: server.version_of("churn") == 3 and canary_of(server, "churn") is None, "version 3 alone")

        for args, expected in ((("rollback", "churn", "--to", "1"), None),
                               (("canary", "churn", "3", "--percent", "10"), "already the current version"),
                               (("canary", "churn", "9", "--percent", "10"), "no version 9")):
            if expected is None:  # with a canary, --to is refused until the canary is ended
                cli(storage.root, broker.url, "canary", "churn", "2", "--percent", "10")
                expected = "removes it first"
            refused = cli(storage.root, broker.url, *args)
            assert refused.returncode == 1 and refused.stderr.startswith("error: ") and expected in refused.stderr, refused

    received = [(event["type"], event.data) for event in broker.received]
    rollouts = [(t, d) for t, d in received if t.startswith("bucketml.rollout.")]
    assert [t for t, _ in rollouts] == ["bucketml.rollout.started.v1", "bucketml.rollout.rolled_back.v1",
                                        "bucketml.rollout.started.v1", "bucketml.rollout.promoted.v1",
                                        "bucketml.rollout.started.v1"]
    first, rolled_back, _, promotion, _ = (d for _, d in rollouts)
    assert first == {"model": "churn", "kind": "canary", "version": 2, "current_version": 1,
                     "figures": {"percent": 30, "started": first["figures"]["started"]}}
    assert rolled_back["version"] == 2 and rolled_back["current_version"] == 1
    counted = rolled_back["figures"]["requests"]  # what the predict replica answered, by version
    assert counted.get("1", 0) + counted.get("2", 0) == 40 and rolled_back["figures"]["requests_from"] == server.url
    assert promotion["version"] == 3 and promotion["current_version"] == 3 and promotion["previous_version"] == 1
    assert promotion["figures"]["percent"] == 50 and "requests" in promotion["figures"]
    assert ("bucketml.model.published.v1", 3) in [(t, d.get("version")) for t, d in received]


def metric(server, name: str, **labels: str) -> float:
    """One sample of the predict function's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_shadow_never_changes_an_answer_and_its_agreement_is_counted(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    publish(storage, "churn", churn_frame(seed=1), "first.csv", QUICK)
    publish(storage, "churn", churn_frame(seed=2, rows=60), "second.csv", QUICK)  # fewer rows: it disagrees now and then
    registry.move_pointer("churn", 1, reason="version 1 is the stable one, for the test")
    records = json.loads(churn_frame(rows=100, seed=7).drop(columns="label").to_json(orient="records"))
    batches = [{"model": "churn", "records": records[i:i + 5]} for i in range(0, len(records), 5)]
    with Sink() as broker, predict_server(storage.root, tmp_path, 0.2) as server:
        without = [server.predict(batch) for batch in batches]
        assert all(r.status_code == 200 and r.headers["Bucketml-Model-Version"] == "1" for r in without)

        started = cli(storage.root, broker.url, "shadow", "churn", "2")
        assert started.returncode == 0, started.stderr
        assert "churn: shadow version 2 scores a copy of unpinned requests; version 1 answers them" in started.stdout
        wait_until(lambda: server.get("/v2/health/ready").json().get("shadows") == {"churn": 2}, "the shadow to be followed")

        with_shadow = [server.predict(batch) for batch in batches]
        assert [r.content for r in with_shadow] == [r.content for r in without]  # byte for byte
        assert all(r.headers["Bucketml-Model-Version"] == "1" for r in with_shadow)

        # What version 2 would have answered (pinned requests are never shadowed), row by row.
        shadow_labels = [label for batch in batches
                         for label in server.predict(dict(batch, version=2)).json()["predictions"]]
        stable_labels = [label for r in without for label in r.json()["predictions"]]
        agreeing = sum(a == b for a, b in zip(shadow_labels, stable_labels))
        assert 0 < agreeing < len(records)  # the figures below can tell agreement from disagreement
        wait_until(lambda: metric(server, "bucketml_shadow_rows_total", model="churn", version="2") == len(records),
                   "every unpinned row to be compared", timeout=10)
        assert metric(server, "bucketml_shadow_agreeing_rows_total", model="churn", version="2") == agreeing
        assert metric(server, "bucketml_shadow_failed_requests_total", model="churn", version="2") == 0

        stopped = cli(storage.root, broker.url, "shadow", "churn", "--stop", predict_url=server.url)
        assert stopped.returncode == 0, stopped.stderr
        assert f"churn: shadow version 2 stopped: agreed on {agreeing} of {len(records)} rows" in stopped.stdout
        assert Registry.shadow_of(registry.current("churn")) is None
        wait_until(lambda: "shadows" not in server.get("/v2/health/ready").json(), "the shadow to be dropped")
        refused = cli(storage.root, broker.url, "shadow", "churn", "--stop")
        assert refused.returncode == 1 and "no shadow to stop" in refused.stderr

    rollouts = [(e["type"], e.data) for e in broker.received if e["type"].startswith("bucketml.rollout.")]
    assert [(t, d["kind"], d["version"], d["current_version"]) for t, d in rollouts] == [
        ("bucketml.rollout.started.v1", "shadow", 2, 1), ("bucketml.rollout.rolled_back.v1", "shadow", 2, 1)]
    figures = rollouts[1][1]["figures"]
    assert figures["compared_rows"] == len(records) and figures["agreeing_rows"] == agreeing


class FakeModel:
    """Stands in for a loaded version with one number column; `seconds` makes its scoring slow."""

    def __init__(self, version: int, label: str, seconds: float = 0.0):
        self.model, self.version, self.label, self.seconds = "m", version, label, seconds
        self.columns, self.ignored, self.numbers_only = [{"name": "x", "type": "number"}], frozenset(), True
        self.scored = 0
        self.started = 0.0  # perf_counter() when its last scoring began

    def predict_matrix(self, matrix) -> dict:
        self.started = time.perf_counter()
        time.sleep(self.seconds)
        self.scored += len(matrix)
        return {"model": "m", "version": self.version, "predictions": [self.label] * len(matrix)}


def test_a_slow_shadow_scores_after_the_answer_is_sent_and_outside_its_latency():
    """In-process: the answer's last byte goes out before the shadow starts (its scoring is queued
    by a background task after the answer, and done on the comparisons thread), and the latency
    histogram stops there, though the shadow takes half a second."""
    from bucketml.serving.app import PredictApp
    from bucketml.serving.service import PredictService

    stable, shadow = FakeModel(1, "yes"), FakeModel(2, "no", seconds=0.5)
    manager = types.SimpleNamespace(ensure_watching=lambda: None, routed=lambda model, version: stable,
                                    shadow_for=lambda loaded: shadow)
    app = PredictApp(PredictService(manager))
    body = b'{"model": "m", "records": [{"x": 1}, {"x": 2}]}'
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "", "headers": []}
    sent: list[tuple[float, dict]] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append((time.perf_counter(), message))

    def latency() -> tuple[float, float]:
        labels = {"endpoint": "predict"}
        return (prometheus_client.REGISTRY.get_sample_value("bucketml_predict_request_seconds_count", labels) or 0,
                prometheus_client.REGISTRY.get_sample_value("bucketml_predict_request_seconds_sum", labels) or 0)

    count, total = latency()
    began = time.perf_counter()
    asyncio.run(app(scope, receive, send))
    ended = time.perf_counter()

    answered_at, last = sent[-1]
    assert last["type"] == "http.response.body" and not last.get("more_body", False)
    assert json.loads(b"".join(m.get("body", b"") for _, m in sent[1:])) == {
        "model": "m", "version": 1, "predictions": ["yes", "yes"]}  # the stable answer, untouched
    assert answered_at - began < 0.25 and ended - began < 0.25  # neither the answer nor the request waited for it
    assert shadow.scored == 0 or shadow.started >= answered_at  # not started before the answer went out
    wait_until(lambda: prometheus_client.REGISTRY.get_sample_value("bucketml_shadow_rows_total",
                                                                    {"model": "m", "version": "2"}) == 2,
               "the shadow to score and count the request's two rows", timeout=5)
    assert shadow.scored == 2
    assert shadow.started >= answered_at
    now_count, now_total = latency()
    assert now_count == count + 1 and now_total - total < 0.25
    agreeing = prometheus_client.REGISTRY.get_sample_value("bucketml_shadow_agreeing_rows_total",
                                                           {"model": "m", "version": "2"})
    assert prometheus_client.REGISTRY.get_sample_value("bucketml_shadow_rows_total", {"model": "m", "version": "2"}) == 2
    assert agreeing == 0  # "no" against "yes"


def test_a_canary_or_shadow_that_cannot_load_leaves_the_current_version_answering_alone(tmp_path):
    from bucketml.serving.manager import ModelManager

    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    publish(storage, "churn", churn_frame(seed=1), "first.csv", QUICK)
    broken = registry.register("churn", lambda version: b"this is not an ONNX model", registry.card("churn", 1))
    manager = ModelManager(registry)
    for start, role in ((lambda: registry.start_canary("churn", broken, 50), "canary"),
                        (lambda: registry.start_shadow("churn", broken), "shadow")):
        start()
        manager.refresh()
        assert f"{role} version {broken} could not be loaded" in manager.errors()["churn"]
        assert manager.canaries() == {} and manager.shadows() == {}
        current = manager.get("churn")
        assert current.version == 1 and manager.shadow_for(current) is None
        assert {manager.routed("churn").version for _ in range(50)} == {1}
        registry.end_canary("churn") if role == "canary" else registry.end_shadow("churn")
        manager.refresh()
        assert manager.errors() == {}
