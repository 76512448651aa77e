"""The monitor under at-least-once pings and kill -9: a canary is decided once, and its
announcement is never lost.

The monitor runs as a real functions-framework process over a local bucket. The figures it
decides on are written by the predict side's own code (ReplicaFigures), as a replica would
write them after serving the canary and the stable version. Pings are real binary-mode
CloudEvents of a PingSource's type, posted over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests
from cloudevents.http import CloudEvent

from bucketml.contracts import events
from bucketml.monitoring.aggregates import ReplicaFigures
from bucketml.monitoring.reference import REFERENCE_FILE, Reference
from bucketml.registry.model_registry import Registry
from bucketml.steps.monitor import CLAIM_SECONDS, state_name
from bucketml.storage import LocalStorage
from helpers import (ROOT, Sink, churn_frame, free_port, function_server, long_reliability_test, publish,
                     wait_for_http, wait_until)


QUICK = {"algorithms": "logistic_regression"}
PROMOTED = events.ROLLOUT_PROMOTED


def ping(url: str) -> requests.Response:
    headers, body = events.to_binary_http(CloudEvent(
        {"type": events.PING, "source": "/apis/v1/namespaces/test/pingsources/monitor", "id": str(uuid.uuid4()),
         "datacontenttype": "application/json"}, b'{"run": "monitor"}'))
    return requests.post(url, headers=headers, data=body, timeout=30)


def canary_ready_to_promote(tmp_path) -> tuple[LocalStorage, Registry]:
    """Version 1 current, version 2 its canary, and a replica's figures showing both served alike
    (the canary answered 300 unpinned requests and gave the stable version's label on every row)."""
    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    publish(storage, "churn", churn_frame(seed=1), "1.csv", QUICK)
    publish(storage, "churn", churn_frame(seed=2), "2.csv", QUICK)
    registry.move_pointer("churn", 1, reason="version 1 is the stable one, for the test")
    pointer = registry.start_canary("churn", 2, 30)
    figures = ReplicaFigures(storage, flush_seconds=60, window_seconds=600, replica="replica-a")
    for version, requests_answered in ((1, 700), (2, 300)):
        reference = Reference.from_dict(json.loads(
            storage.read(Registry.version_prefix("churn", version) + REFERENCE_FILE)))
        for _ in range(requests_answered):
            figures.answered("churn", version, pointer.generation, "classification", reference, 200, 0.003)
            figures.scored("churn", version, pointer.generation, "classification", reference,
                           lambda: {"tenure": [3.0], "monthly": [80.0]}, ["yes"], 1)
        if version == 2:
            figures.compared("churn", 2, pointer.generation, "classification", reference, ["yes"] * 300, ["yes"] * 300)
    figures.flush()
    return storage, registry


def promoted_events(sink: Sink) -> list[CloudEvent]:
    return [event for event in sink.received if event["type"] == PROMOTED]


def test_pings_delivered_four_times_at_once_promote_the_canary_once(tmp_path):
    storage, registry = canary_ready_to_promote(tmp_path)
    with Sink() as sink, function_server("monitor", storage.root, tmp_path, {"BUCKETML_BROKER_URL": sink.url}) as monitor:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: ping(monitor.url), range(4)))
        assert all(answer.status_code < 300 for answer in answers), [a.text for a in answers]
        for _ in range(3):  # later pings find nothing left to do
            assert ping(monitor.url).status_code < 300
    pointer = registry.current("churn")
    assert pointer.version == 2 and "canary" not in pointer.data
    promoted = promoted_events(sink)
    assert len(promoted) == 1, [e["id"] for e in promoted]
    assert promoted[0].data["figures"]["requests"] == {"1": 700, "2": 300}
    assert promoted[0].data["figures"]["agreement"] == 1.0


@long_reliability_test
def test_a_monitor_killed_while_announcing_loses_no_announcement(tmp_path):
    storage, registry = canary_ready_to_promote(tmp_path)
    held = Sink(hold=True)  # takes the announcement's request and keeps it open
    port = free_port()
    log = open(tmp_path / "killed-monitor.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "functions_framework", "--source", "functions/monitor/main.py", "--target", "monitor",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, BUCKETML_BUCKET=str(storage.root), BUCKETML_BROKER_URL=held.url),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, process, "the monitor to listen", tmp_path / "killed-monitor.log", timeout=30,
                      statuses=(405,))
        threading.Thread(target=lambda: _quietly(ping, url), daemon=True).start()
        wait_until(lambda: held.held == 1, "the monitor to be announcing the promotion")
        # The step is taken (the pointer moved) and the announcement waits in the state; now kill -9.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        held.close()
        log.close()
    assert registry.current("churn").version == 2
    assert '"outbox": [{' in storage.read(state_name("churn")).decode()  # claimed by the killed run

    # The killed run's claim on the announcement lapses after CLAIM_SECONDS; a later run sends it.
    with Sink() as sink, function_server("monitor", storage.root, tmp_path, {"BUCKETML_BROKER_URL": sink.url}) as monitor:
        wait_until(lambda: ping(monitor.url).status_code < 300 and promoted_events(sink), "the announcement",
                   timeout=CLAIM_SECONDS + 15)
        for _ in range(3):
            assert ping(monitor.url).status_code < 300
    promoted = promoted_events(sink)
    assert len(promoted) == 1 and promoted[0]["id"].startswith("rollout-promoted-canary-churn-2-")
    assert '"outbox": []' in storage.read(state_name("churn")).decode()


def test_a_step_taken_just_before_a_crash_is_announced_by_the_next_run(tmp_path):
    """A crash between the pointer's compare-and-swap and the state's write: the pointer's own
    record of the step is what the next run announces (the first half of a run, done here)."""
    storage, registry = canary_ready_to_promote(tmp_path)
    pointer = registry.current("churn")
    data = {"model": "churn", "kind": "canary", "version": 2, "current_version": 2, "previous_version": 1,
            "figures": {"percent": 30, "decided_by": "monitor"}}
    entry = {"id": f"rollout-promoted-canary-churn-2-{pointer.generation}", "type": PROMOTED, "data": data}
    assert registry.finish_canary("churn", pointer, promote=True, decided=entry)
    with Sink() as sink, function_server("monitor", storage.root, tmp_path, {"BUCKETML_BROKER_URL": sink.url}) as monitor:
        for _ in range(3):
            assert ping(monitor.url).status_code < 300
    promoted = promoted_events(sink)
    assert [e["id"] for e in promoted] == [entry["id"]]


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except requests.RequestException:
        pass  # the process was killed under it
