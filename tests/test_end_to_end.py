"""The whole platform as a user runs it: `bucketml dev` as a subprocess, files copied into the
bucket folder, events through the real broker, predictions over real HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from helpers import (
    BUCKETML,
    churn_frame,
    for_upload,
    free_port,
    free_ports,
    running_platform,
    wait_for_event,
)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("platform"), free_ports()) as info:
        yield info


def drop(platform, model: str, filename: str, content: bytes) -> str:
    """Copy a file into the bucket folder the way a user would (not through the API)."""
    staging = platform["root"] / "staging" / filename
    staging.parent.mkdir(exist_ok=True)
    staging.write_bytes(content)
    target = platform["bucket"] / "datasets" / model
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(staging, target / filename)
    return f"datasets/{model}/{filename}"


def predict(platform, body: dict) -> requests.Response:
    return requests.post(platform["predict"] + "/predict", json=body, timeout=10)


RECORDS = [
    {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"},
    {"tenure": None, "monthly": None, "plan": None, "region": "north"},  # missing values
    {"tenure": 60, "monthly": 20.0, "plan": "enterprise", "region": "mars"},  # unseen categories
]


def test_upload_trains_serves_and_hot_swaps(platform):
    name = drop(platform, "churn", "customers.csv", churn_frame(seed=1).to_csv(index=False).encode())
    published = wait_for_event(platform["broker"], for_upload("bucketml.model.published.v1", name))
    assert published["data"]["version"] == 1
    assert published["source"] == "/bucketml/train" and published["subject"] == "churn"
    # model.trained is announced for every version, before the model.published of its promotion.
    trained = wait_for_event(platform["broker"], for_upload("bucketml.model.trained.v1", name), timeout=5)
    assert trained["data"]["version"] == 1 and trained["seq"] < published["seq"]

    ready = requests.get(platform["predict"] + "/v2/health/ready", timeout=5)
    deadline = time.monotonic() + 10
    while ready.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        ready = requests.get(platform["predict"] + "/v2/health/ready", timeout=5)
    assert ready.status_code == 200

    response = predict(platform, {"model": "churn", "records": RECORDS})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "churn" and answer["version"] == 1
    assert answer["classes"] == ["no", "yes"]
    assert len(answer["predictions"]) == 3 and set(answer["predictions"]) <= {"no", "yes"}
    assert all(abs(sum(p) - 1) < 1e-4 for p in answer["probabilities"])
    # The obvious churner (new, expensive, basic plan) is predicted to churn.
    assert answer["predictions"][0] == "yes"

    # The seed-style payload: columns in schema order.
    features = predict(platform, {"model": "churn", "features": [[3, 99.5, "basic", "north"]]})
    assert features.status_code == 200 and features.json()["predictions"] == ["yes"]

    # A second dataset under the same name: a new version is served without a restart.
    pids_before = platform["process"].pid
    second = drop(platform, "churn", "customers-2024.csv", churn_frame(seed=2).to_csv(index=False).encode())
    published2 = wait_for_event(platform["broker"], for_upload("bucketml.model.published.v1", second))
    assert published2["data"]["version"] == 2
    deadline = time.monotonic() + 10
    while predict(platform, {"model": "churn", "records": RECORDS}).json()["version"] != 2:
        assert time.monotonic() < deadline, "predict kept serving version 1"
        time.sleep(0.2)
    assert platform["process"].pid == pids_before and platform["process"].poll() is None

    listing = subprocess.run([BUCKETML, "models", "churn", "--bucket", str(platform["bucket"])],
                             capture_output=True, text=True, check=True)
    rows = listing.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["1", "*"] and rows[1].split()[1] == "2", listing.stdout

    # A rollback is announced through the broker like a training, and served at once.
    env = dict(os.environ, BUCKETML_BROKER_URL=platform["broker"])
    rolled = subprocess.run([BUCKETML, "rollback", "churn", "--bucket", str(platform["bucket"])],
                            capture_output=True, text=True, env=env, check=True)
    assert "current version 2 -> 1" in rolled.stdout and "next poll" not in rolled.stdout
    announced = wait_for_event(platform["broker"], lambda e: e["type"] == "bucketml.model.published.v1"
                               and e["source"] == "/bucketml/registry" and e["data"]["version"] == 1)
    assert announced["data"]["previous_version"] == 2
    deadline = time.monotonic() + 5
    while predict(platform, {"model": "churn", "records": RECORDS}).json()["version"] != 1:
        assert time.monotonic() < deadline, "predict kept serving version 2 after the rollback"
        time.sleep(0.1)


def upload(platform, model: str, filename: str, content: bytes, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`bucketml upload` as a user types it, against the running platform."""
    staging = platform["root"] / "staging" / filename
    staging.parent.mkdir(exist_ok=True)
    staging.write_bytes(content)
    env = dict(os.environ, BUCKETML_BROKER_URL=platform["broker"], BUCKETML_PREDICT_URL=platform["predict"],
               BUCKETML_BUCKET=str(platform["bucket"]))
    return subprocess.run([BUCKETML, "upload", str(staging), "--model", model, "--timeout", str(timeout), *args],
                          capture_output=True, text=True, env=env, timeout=180)


def test_upload_command_returns_once_predict_serves_the_version(platform):
    first = upload(platform, "served", "first.csv", churn_frame(seed=5).to_csv(index=False).encode())
    assert first.returncode == 0 and "Traceback" not in first.stderr, first
    lines = first.stdout.splitlines()
    assert lines[-2].startswith("  published  served version 1: "), first.stdout
    assert lines[-1] == "  served     served version 1", first.stdout
    # Right after the command, with no sleep and no retry: served, pinned and unpinned.
    pinned = predict(platform, {"model": "served", "version": 1, "records": RECORDS})
    unpinned = predict(platform, {"model": "served", "records": RECORDS})
    assert pinned.status_code == 200 and pinned.json()["version"] == 1, pinned.text
    assert unpinned.status_code == 200 and unpinned.json()["version"] == 1, unpinned.text

    second = upload(platform, "served", "second.csv", churn_frame(seed=6).to_csv(index=False).encode())
    assert second.returncode == 0 and second.stdout.splitlines()[-1] == "  served     served version 2", second
    unpinned = predict(platform, {"model": "served", "records": RECORDS})
    assert unpinned.status_code == 200 and unpinned.json()["version"] == 2, unpinned.text

    # Trained but not promoted (labels shuffled, under if_better): the line that says so is the
    # last; nothing is waited for.
    shuffled = churn_frame(seed=6)
    shuffled["label"] = shuffled["label"].sample(frac=1.0, random_state=0).to_numpy()
    kept = upload(platform, "served", "third.csv", shuffled.to_csv(index=False).encode(),
                  "--set", "promotion=if_better")
    assert kept.returncode == 0, kept
    assert kept.stdout.splitlines()[-1].endswith("(current stays 2)"), kept.stdout
    assert predict(platform, {"model": "served", "records": RECORDS}).json()["version"] == 2


def test_upload_command_fails_in_one_line_when_predict_does_not_serve(platform):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # One timeout covers training and serving: what is left of it after training is waited.
    result = upload(platform, "unserved", "data.csv", churn_frame(seed=7).to_csv(index=False).encode(),
                    "--predict-url", nobody, timeout=15)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert "  published  unserved version 1: " in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unserved version 1 was published"), result.stderr
    assert f"predict at {nobody} does not serve it yet" in lines[0]


def test_duplicate_delivery_makes_one_version(platform):
    name = drop(platform, "dupes", "data.csv", churn_frame(seed=3).to_csv(index=False).encode())
    finalized = wait_for_event(platform["broker"], for_upload("google.cloud.storage.object.v1.finalized", name))
    first = wait_for_event(platform["broker"], for_upload("bucketml.model.published.v1", name))

    # Deliver the very same storage event again, as at-least-once delivery may.
    attributes = {k: finalized[k] for k in ("type", "source", "subject")}
    event = CloudEvent(dict(attributes, id="redelivery-1"), finalized["data"])
    headers, body = to_binary(event)
    assert requests.post(platform["broker"], data=body, headers=headers, timeout=5).status_code == 202
    again = wait_for_event(
        platform["broker"], lambda e: for_upload("bucketml.model.published.v1", name)(e) and e["seq"] > first["seq"]
    )
    assert again["data"]["version"] == first["data"]["version"] == 1
    versions = sorted(p.name for p in (platform["bucket"] / "models" / "dupes" / "versions").iterdir())
    assert versions == ["1"]


def test_garbage_upload_is_rejected_and_platform_keeps_working(platform):
    name = drop(platform, "junk", "photo.csv", bytes(range(256)) * 40)
    rejected = wait_for_event(platform["broker"], for_upload("bucketml.dataset.rejected.v1", name))
    assert rejected["data"]["reason"] == "not_csv"
    report = platform["bucket"] / rejected["data"]["report"]
    assert json.loads(report.read_text())["reason"] == "not_csv"

    no_target = drop(platform, "junk", "no-target.csv", b"a,b\n1,2\n3,4\n")
    rejected = wait_for_event(platform["broker"], for_upload("bucketml.dataset.rejected.v1", no_target))
    assert rejected["data"]["reason"] == "no_target" and "--target" in rejected["data"]["message"]

    # Nothing was served for the junk model, and the platform still answers.
    assert requests.get(platform["predict"] + "/v2/health/live", timeout=5).status_code == 200
    unknown = predict(platform, {"model": "junk", "records": [{"a": 1}]})
    assert unknown.status_code == 404 and "junk" in unknown.json()["error"]
    dead = requests.get(platform["broker"] + "/deadletters", timeout=5).json()
    assert dead["deadletters"] == []


def test_upload_made_while_the_platform_is_down_is_trained_after_restart(tmp_path):
    ports = free_ports()
    with running_platform(tmp_path, ports) as first:
        assert requests.get(first["predict"] + "/v2/health/ready", timeout=5).status_code == 503
    # Nothing is running now; the user copies a file in anyway.
    name = drop(first, "late", "data.csv", churn_frame(seed=4).to_csv(index=False).encode())
    with running_platform(tmp_path, ports) as second:
        published = wait_for_event(second["broker"], for_upload("bucketml.model.published.v1", name))
        assert published["data"]["version"] == 1
        answer = predict(second, {"model": "late", "records": RECORDS[:1]})
        deadline = time.monotonic() + 10
        while answer.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = predict(second, {"model": "late", "records": RECORDS[:1]})
        assert answer.status_code == 200 and answer.json()["version"] == 1
    # A third start finds nothing new to announce: the upload is not trained twice.
    with running_platform(tmp_path, ports) as third:
        time.sleep(3)  # longer than the watcher's rescan period
        finalized = requests.get(third["broker"] + "/events",
                                 params={"type": "google.cloud.storage.object.v1.finalized"}, timeout=5).json()
        assert [e["data"]["name"] for e in finalized["events"]] == [name]
