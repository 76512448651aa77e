"""The monitor, as a user meets it under `bucketml dev`: with `promotion: canary` a retrain starts
as a canary, predict replicas write their figures to the bucket, and the monitor (pinged as the
manifests' PingSource says) promotes an honest retrain and rolls back one trained on shuffled
labels; served inputs shifted far from the training rows yield one drift event, unshifted
traffic none. All real processes: the platform, its CLI, HTTP requests."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import requests

from helpers import BUCKETML, churn_frame, free_ports, running_platform, wait_for_event, wait_until

FAST = {"BUCKETML_MONITOR_SECONDS": "1", "BUCKETML_MONITOR_FLUSH_SECONDS": "0.5"}
CANARY = ["--set", "promotion=canary", "--set", "canary_percent=40", "--set", "canary_min_requests=120",
          "--set", "algorithms=logistic_regression"]


def upload(platform, frame, model: str, name: str, *options: str) -> subprocess.CompletedProcess:
    path = platform["root"] / name
    frame.to_csv(path, index=False)
    done = subprocess.run([BUCKETML, "upload", str(path), "--model", model, *options], cwd=platform["root"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, BUCKETML_BUCKET=str(platform["bucket"]),
                                   BUCKETML_BROKER_URL=platform["broker"], BUCKETML_PREDICT_URL=platform["predict"]))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def records(frame, count: int, start: int = 0) -> list[dict]:
    rows = frame.drop(columns=["label"]).iloc[start:start + count]
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()} for row in rows.to_dict("records")]


class Traffic:
    """Unpinned /predict requests in a background thread until stopped; counts answers per version."""

    def __init__(self, url: str, model: str, rows: list[dict], per_request: int = 1):
        self.url, self.model, self.rows, self.per_request = url, model, rows, per_request
        self.answered: dict[int, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        i = 0
        while not self._stop.is_set():
            batch = [self.rows[(i + k) % len(self.rows)] for k in range(self.per_request)]
            i += self.per_request
            response = session.post(self.url + "/predict", json={"model": self.model, "records": batch}, timeout=10)
            if response.status_code != 200:
                self.failures.append(response.text)
                continue
            version = response.json()["version"]
            self.answered[version] = self.answered.get(version, 0) + 1

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def pointer(platform, model: str) -> dict:
    return json.loads((platform["bucket"] / "models" / model / "current.json").read_text())


def events_of(platform, type_: str, model: str) -> list[dict]:
    found = requests.get(platform["broker"] + "/events", params={"limit": 1000}, timeout=5).json()["events"]
    return [e for e in found if e["type"] == type_ and (e.get("data") or {}).get("model") == model]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    with running_platform(root, free_ports(), FAST) as running:
        yield running


def test_an_honest_retrain_is_promoted_and_a_shuffled_one_rolled_back_by_the_monitor(platform):
    first = churn_frame(rows=400, seed=1)
    upload(platform, first, "churn", "first.csv", *CANARY)
    assert pointer(platform, "churn")["version"] == 1  # the first version is served at once

    # An honest retrain: same population, new sample. It starts as the canary...
    started = upload(platform, churn_frame(rows=400, seed=2), "churn", "second.csv", *CANARY)
    assert "trained" in started.stdout, started.stdout
    assert pointer(platform, "churn")["canary"]["version"] == 2
    rollout = wait_for_event(platform["broker"], lambda e: e["type"] == "bucketml.rollout.started.v1"
                             and e["data"]["version"] == 2, timeout=30)
    assert rollout["data"]["figures"]["percent"] == 40 and rollout["data"]["current_version"] == 1

    # ...and steady traffic makes the monitor promote it.
    with Traffic(platform["predict"], "churn", records(first, 400)) as traffic:
        promoted = wait_for_event(platform["broker"], lambda e: e["type"] == "bucketml.rollout.promoted.v1"
                                  and e["data"]["version"] == 2, timeout=90)
    assert not traffic.failures, traffic.failures[:3]
    assert {1, 2} <= set(traffic.answered), traffic.answered
    figures = promoted["data"]["figures"]
    assert figures["decided_by"] == "monitor" and figures["requests"]["2"] >= 120, figures
    assert figures["agreement"] >= 0.8 and figures["compared_rows"] >= 50, figures
    assert promoted["data"]["previous_version"] == 1
    now = pointer(platform, "churn")
    assert now["version"] == 2 and "canary" not in now, now

    # A retrain on shuffled labels passes training (nothing offline can tell), starts as the
    # canary, and is rolled back: it disagrees with the stable version on the same rows.
    shuffled = churn_frame(rows=400, seed=3)
    shuffled["label"] = np.random.default_rng(0).permutation(shuffled["label"].to_numpy())
    upload(platform, shuffled, "churn", "third.csv", *CANARY)
    assert pointer(platform, "churn")["canary"]["version"] == 3
    with Traffic(platform["predict"], "churn", records(first, 400)) as traffic:
        rolled_back = wait_for_event(platform["broker"], lambda e: e["type"] == "bucketml.rollout.rolled_back.v1"
                                     and e["data"]["version"] == 3, timeout=90)
    assert not traffic.failures, traffic.failures[:3]
    honest_agreement = figures["agreement"]
    figures = rolled_back["data"]["figures"]
    assert figures["decided_by"] == "monitor" and figures["agreement"] < honest_agreement, figures
    # A label-shuffled model predicts mostly the majority class: its labels disagree with the
    # stable version's, or are spread differently, or both (which crosses its line first varies).
    assert figures["reasons"] and all("stable version" in reason for reason in figures["reasons"]), figures["reasons"]
    now = pointer(platform, "churn")
    assert now["version"] == 2 and "canary" not in now, now
    wait_until(lambda: requests.post(platform["predict"] + "/predict", json={"model": "churn", "records": records(first, 1)},
                                     timeout=5).json()["version"] == 2, "every answer to come from version 2 again")
    # Each decision was announced once, whatever the number of monitor runs since.
    assert len(events_of(platform, "bucketml.rollout.promoted.v1", "churn")) == 1
    assert len(events_of(platform, "bucketml.rollout.rolled_back.v1", "churn")) == 1


def test_shifted_inputs_yield_one_drift_event_naming_the_column_and_unshifted_traffic_none(platform):
    quick = ["--set", "algorithms=logistic_regression"]
    shifted_model, steady_model = churn_frame(rows=400, seed=5), churn_frame(rows=400, seed=6)
    upload(platform, shifted_model, "drifting", "data.csv", *quick)
    upload(platform, steady_model, "steady", "data.csv", *quick)
    shifted = records(churn_frame(rows=400, seed=7), 400)
    for row in shifted:
        row["monthly"] = 500.0 + (row["monthly"] or 0.0)  # far beyond the training range (about 70 +- 20)
    with Traffic(platform["predict"], "drifting", shifted, per_request=20) as drifting, \
            Traffic(platform["predict"], "steady", records(churn_frame(rows=400, seed=8), 400), per_request=20) as steady:
        drift = wait_for_event(platform["broker"], lambda e: e["type"] == "bucketml.model.drift.v1"
                               and e["data"]["model"] == "drifting", timeout=60)
        time.sleep(4)  # several more monitor runs over the same shifted traffic
    assert not drifting.failures and not steady.failures
    data = drift["data"]
    assert [column["column"] for column in data["drifted"]] == ["monthly"], data
    assert data["drifted"][0]["psi"] > data["threshold"] == 0.2
    assert data["rows"] >= 100 and data["version"] == 1
    assert len(events_of(platform, "bucketml.model.drift.v1", "drifting")) == 1  # once per episode
    assert events_of(platform, "bucketml.model.drift.v1", "steady") == []

    table = subprocess.run([BUCKETML, "drift", "drifting"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, BUCKETML_BUCKET=str(platform["bucket"])))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    monthly = next(line for line in lines if line.split()[:1] == ["monthly"])
    assert "drifted" in monthly, table.stdout
    tenure = next(line for line in lines if line.split()[:1] == ["tenure"])
    assert "drifted" not in tenure, table.stdout

    missing = subprocess.run([BUCKETML, "drift", "nope"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, BUCKETML_BUCKET=str(platform["bucket"])))
    assert missing.returncode == 1 and "model 'nope' has no current version; upload a dataset first" in missing.stderr
