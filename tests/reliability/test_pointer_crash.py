"""A train process killed (kill -9) after it wrote a new version and before it moved the current
pointer: the old version stays current, nothing half-written is ever current, and the next
delivery of the same prepared event finishes the job (moves the pointer, announces
model.published) without making a second version.

The crash is real: the train function runs under functions-framework, and the test kills its
worker process with SIGKILL at that very moment. To reach that moment reliably, strace holds the
worker (a delay injected into its open() of models/<model>/current.json, which moving the
pointer must read; nothing else in training opens it) and the test kills it while it waits.
No product code is changed or hooked for this.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from cloudevents.http import from_http

from bucketml.contracts import events
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage
from helpers import Sink, check_bucket, churn_frame, function_server, wait_until
from platform_support import cheap_spec, children

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to hold the train process at the crash point")


def deliver(url: str, event) -> requests.Response:
    return events.post(url, event, timeout=120)


def prepare(storage: LocalStorage, name: str, seed: int):
    info = storage.write(name, churn_frame(150, seed=seed).to_csv(index=False).encode(), content_type="text/csv")
    event = handle_finalized(storage, info.event_data())
    assert event["type"] == events.DATASET_PREPARED, event.data
    return event


def crash_while(train, tmp_path: Path, event, path: Path, syscall: str, reached, what: str) -> None:
    """Deliver `event` to the train function and kill -9 its worker while it is held (by strace)
    at `syscall` on `path`, once `reached()` says it got there; then wait for gunicorn's new worker."""
    (worker,) = children(train.process.pid)  # gunicorn's one worker serves the requests
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", str(tmp_path / f"strace-{worker}.log"), "-p", str(worker), "-P", str(path),
         "-e", f"trace={syscall}", "-e", f"inject={syscall}:delay_enter=60s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    outcome: dict = {}
    try:
        wait_until(lambda: f"TracerPid:\t{tracer.pid}" in Path(f"/proc/{worker}/status").read_text()
                   or tracer.poll() is not None, "strace to attach")
        if tracer.poll() is not None:
            pytest.skip(f"strace cannot trace here: {tracer.stderr.read().decode()}")
        request = threading.Thread(target=lambda: outcome.update(response=_try(deliver, train.url, event)))
        request.start()
        wait_until(reached, what, timeout=60)
        time.sleep(1.0)  # held there now
        assert request.is_alive(), f"the delivery ended before {what}: {outcome}"
        os.kill(worker, signal.SIGKILL)
    finally:
        # A task held by its tracer dies once the tracer lets go of it; with SIGKILL pending,
        # the held system call is never carried out.
        tracer.kill()
        tracer.wait()
    request.join(30)
    assert isinstance(outcome["response"], requests.ConnectionError), outcome  # the broker would retry it
    wait_until(lambda: children(train.process.pid) not in ([], [worker]), "a new train worker", timeout=30)


@pytest.fixture(scope="module")
def bucket_and_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    storage = LocalStorage(root / "bucket")
    with Sink() as sink, function_server("train", storage.root, root, {"K_SINK": sink.url}) as train:
        yield storage, train, sink


def test_crash_between_version_and_pointer_is_finished_by_the_redelivery(bucket_and_train, tmp_path):
    storage, train, sink = bucket_and_train
    storage.write("datasets/crash/bucketml.yaml", cheap_spec().encode())
    first, second = prepare(storage, "datasets/crash/one.csv", 1), prepare(storage, "datasets/crash/two.csv", 2)
    pointer = storage.root / "models/crash/current.json"
    versions = storage.root / "models/crash/versions"

    assert deliver(train.url, first).status_code == 200
    assert json.loads(pointer.read_text())["version"] == 1

    # Killed after version 2 is complete, before the pointer moved (held opening current.json).
    crash_while(train, tmp_path, second, pointer, "openat",
                lambda: (versions / "2/card.json").exists(), "version 2 to be written")
    # After the crash: version 2 is complete but not current; version 1 still serves.
    assert check_bucket(storage.root) == {"crash": 1}
    assert Registry(storage).versions("crash") == [1, 2]
    assert not [e for e in sink.received if e["type"] == events.MODEL_PUBLISHED]

    # The redelivery finishes the job instead of training again.
    retried = deliver(train.url, second)
    assert retried.status_code == 200, retried.text
    reply = from_http(dict(retried.headers), retried.content)
    assert reply["type"] == events.MODEL_PUBLISHED and reply.data["version"] == 2 and reply.data["previous_version"] == 1
    assert check_bucket(storage.root) == {"crash": 2}
    assert Registry(storage).versions("crash") == [1, 2]
    assert "its pointer step had not been done" in train.log.read_text()

    # A later duplicate changes nothing, and a rollback is not undone by one.
    Registry(storage).move_pointer("crash", 1, reason="rolled back by a test")
    duplicate = deliver(train.url, second)
    again = from_http(dict(duplicate.headers), duplicate.content)
    assert again["type"] == events.MODEL_TRAINED and again.data["current_version"] == 1
    assert check_bucket(storage.root) == {"crash": 1}
    assert Registry(storage).versions("crash") == [1, 2]


def test_crash_between_upload_record_and_card_is_finished_by_the_redelivery(bucket_and_train, tmp_path):
    """One step earlier: killed after the upload's record (which claims the upload for version 2
    and holds its card) and before card.json (held creating card.json). Version 2 stays invisible
    until the redelivery writes its card from the record, moves the pointer, announces it."""
    storage, train, sink = bucket_and_train
    storage.write("datasets/early/bucketml.yaml", cheap_spec().encode())
    first, second = prepare(storage, "datasets/early/one.csv", 3), prepare(storage, "datasets/early/two.csv", 4)
    record = storage.root / Registry.upload_record_name("early", second.data["upload"])
    card = storage.root / "models/early/versions/2/card.json"

    assert deliver(train.url, first).status_code == 200
    crash_while(train, tmp_path, second, card, "link,linkat", record.exists, "the upload record to be written")
    assert not card.exists()
    assert check_bucket(storage.root)["early"] == 1
    assert Registry(storage).versions("early") == [1]

    retried = deliver(train.url, second)
    assert retried.status_code == 200, retried.text
    reply = from_http(dict(retried.headers), retried.content)
    assert reply["type"] == events.MODEL_PUBLISHED and reply.data["version"] == 2
    assert check_bucket(storage.root)["early"] == 2
    assert Registry(storage).versions("early") == [1, 2]
    trained = [e.data["version"] for e in sink.received if e["type"] == events.MODEL_TRAINED and e.data["model"] == "early"]
    assert trained == [1, 2]


def _try(function, *args):
    try:
        return function(*args)
    except requests.RequestException as exc:  # the delivery's connection is cut by the crash
        return exc
