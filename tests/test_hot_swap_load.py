"""Five versions published while clients send requests without pause: no request fails, and
every answer comes from a version that was current while the request was in flight (allowing
the replica's pickup delay: one pointer poll plus loading the new version)."""

from __future__ import annotations

import threading
import time

import requests

from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage
from helpers import churn_frame, predict_server, publish, wait_until

POLL_SECONDS = 0.2
PICKUP_SECONDS = 2.0  # poll interval + loading and checking a small model, with room for a busy CI machine
CLIENTS = 3
RECORD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}


def client(url: str, stop: threading.Event, log: list) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = session.post(url + "/predict", json={"model": "churn", "records": [RECORD]}, timeout=10)
                outcome = (response.status_code, response.json().get("version") if response.ok else response.text)
            except requests.RequestException as exc:  # a dropped connection is a failed request too
                outcome = ("no response", repr(exc))
            log.append((started, time.monotonic(), *outcome))


def test_five_versions_published_under_load_fail_no_request(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    fast = {"algorithms": "logistic_regression"}  # quick to train: the swaps are under test, not the models
    published_at = {publish(storage, "churn", churn_frame(seed=0), "v1.csv", fast): time.monotonic()}
    with predict_server(storage.root, tmp_path, POLL_SECONDS) as server:
        wait_until(lambda: server.version_of("churn") == 1, "version 1 to be served")
        stop, logs = threading.Event(), [[] for _ in range(CLIENTS)]
        threads = [threading.Thread(target=client, args=(server.url, stop, log)) for log in logs]
        for thread in threads:
            thread.start()
        try:
            for seed in range(1, 5):
                time.sleep(0.5)
                version = publish(storage, "churn", churn_frame(seed=seed), f"v{seed + 1}.csv", fast)
                published_at[version] = time.monotonic()  # the pointer moved just before this
            wait_until(lambda: server.version_of("churn") == 5, "version 5 to be served")
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    assert sorted(published_at) == [1, 2, 3, 4, 5] and Registry(storage).versions("churn") == [1, 2, 3, 4, 5]
    answers = [entry for log in logs for entry in log]
    failures = [a for a in answers if a[2] != 200]
    assert not failures, f"{len(failures)} of {len(answers)} requests failed, e.g. {failures[:3]}"
    assert len(answers) > 100, "the clients barely ran"
    served = {a[3] for a in answers}
    assert served == {1, 2, 3, 4, 5}, f"versions seen by clients: {sorted(served)}"
    for started, ended, _, version in answers:
        # Current while in flight: published before the answer came back, and replaced (if it
        # was) no earlier than the pickup delay before the request started.
        assert published_at[version] <= ended + 0.05, (version, started, published_at)
        replaced = published_at.get(version + 1)
        assert replaced is None or started <= replaced + PICKUP_SECONDS, (
            f"version {version} answered a request that started {started - replaced:.2f}s after version {version + 1} was published"
        )
    # Each client sees versions only move forward.
    for log in logs:
        versions = [entry[3] for entry in log]
        assert versions == sorted(versions), versions
