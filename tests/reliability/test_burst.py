"""`bucketml dev` as a user runs it, under load and under duplicate events at its ingress.

A burst: 50 files copied at once into the bucket folders of 10 models (5 of them junk that
must be rejected); each ends exactly once, in one version or one rejection, and every model's
current pointer names a complete, verified version. Then the same storage event posted three
times to the broker's ingress, as a retrying sender does.
"""

from __future__ import annotations

import time

import pytest
from cloudevents.http import CloudEvent
from bucketml.contracts import events
from platform_support import Ledger, broker_events, cheap_spec, dead_letters, junk, numbers_frame, platform

from helpers import check_bucket, churn_frame, free_ports, long_reliability_test, versions_by_upload, wait_until


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    root = tmp_path_factory.mktemp("burst")
    with platform(root, free_ports()) as info:
        info["ledger"] = Ledger(info["bucket"], root / "staging")
        yield info


@long_reliability_test
def test_burst_of_50_uploads_to_10_models_each_ends_once(dev):
    ledger = dev["ledger"]
    models = [f"burst{m}" for m in range(10)]
    for model in models:
        ledger.spec(model, cheap_spec("regression"))
    started = time.monotonic()
    for n in range(5):
        for m, model in enumerate(models):
            if n == 4 and m % 2 == 0:  # one junk file in every other model
                ledger.drop(model, f"junk-{n}.csv", junk(m // 2), "rejected")
            else:
                frame = numbers_frame(100 + 10 * n, seed=100 * m + n)
                ledger.drop(model, f"data-{n}.csv", frame.to_csv(index=False).encode(), "version")
    assert len(ledger.uploads) == 50
    figures = ledger.settle(dev["broker"], timeout=150)
    print(f"burst: {figures} in {time.monotonic() - started:.1f}s")
    assert figures == {"version": 45, "rejected": 5}
    current = check_bucket(dev["bucket"])
    assert all(current[model] is not None for model in models), current
    assert dead_letters(dev["broker"]) == []


def test_the_same_storage_event_three_times_at_the_ingress(dev):
    """The broker, like Knative's, does not drop a repeated event id: it stores and delivers each
    copy (at-least-once). The functions make one version of it."""
    ledger = dev["ledger"]
    ledger.spec("ingress", cheap_spec())
    upload = ledger.drop("ingress", "data.csv", churn_frame(120, seed=7).to_csv(index=False).encode(), "version")
    ledger.settle(dev["broker"], timeout=60)
    before = broker_events(dev["broker"])
    (finalized,) = [e for e in before if e["type"] == "google.cloud.storage.object.v1.finalized"
                    and (e["data"] or {}).get("name") == upload.name]
    event = CloudEvent({k: finalized[k] for k in ("id", "type", "source", "subject")}, finalized["data"])
    seqs = []
    for _ in range(3):
        answer = events.post(dev["broker"], event, timeout=10)
        assert answer.status_code == 202, answer.text
        seqs.append(answer.json()["seq"])
    assert len(set(seqs)) == 3  # three copies accepted: no deduplication by id at the ingress

    def copies(type_: str) -> list[dict]:
        return [e for e in broker_events(dev["broker"]) if e["seq"] > before[-1]["seq"] and e["type"] == type_
                and ((e["data"] or {}).get("upload") or {}).get("name") == upload.name]

    # Each copy is delivered: preprocess answers each with the same prepared event (same id),
    # and train answers each of those with the same version.
    wait_until(lambda: len(copies("bucketml.model.trained.v1")) >= 3, "three answers from train", timeout=60)
    prepared = copies("bucketml.dataset.prepared.v1")
    assert len(prepared) == 3 and len({e["id"] for e in prepared}) == 1
    assert {e["data"]["version"] for e in copies("bucketml.model.trained.v1")} == {1}
    assert versions_by_upload(dev["bucket"])[upload.key] == [("ingress", 1)]
    assert check_bucket(dev["bucket"])["ingress"] == 1
    ledger.settle(dev["broker"], timeout=10)
