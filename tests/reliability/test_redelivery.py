"""At-least-once delivery, straight to the functions: every event delivered three times at once
(as a broker that retries a delivery still in progress does) and events out of order must still
end each upload, exactly once per generation, in one model version or one rejection.

The preprocess and train functions run as real functions-framework processes over one local
bucket; the events are real binary-mode CloudEvents (cloudevents SDK) posted over HTTP, as the
broker posts them. model.trained goes to a recording sink (K_SINK), as on Knative.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cloudevents.http import CloudEvent, from_http

from bucketml.contracts import events
from bucketml.storage import LocalStorage
from helpers import Sink, check_bucket, churn_frame, function_server, versions_by_upload
from platform_support import cheap_spec

CHEAP = cheap_spec().encode()  # datasets/<model>/bucketml.yaml: one candidate, fast


@pytest.fixture(scope="module")
def functions(tmp_path_factory):
    root = tmp_path_factory.mktemp("redelivery")
    storage = LocalStorage(root / "bucket")
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(Sink())
        preprocess = stack.enter_context(function_server("preprocess", storage.root, root))
        train = stack.enter_context(function_server("train", storage.root, root, {"K_SINK": sink.url}))
        yield storage, preprocess, train, sink


def upload(storage: LocalStorage, name: str, content: bytes):
    model = name.split("/")[1]
    if not storage.exists(f"datasets/{model}/bucketml.yaml"):
        storage.write(f"datasets/{model}/bucketml.yaml", CHEAP, content_type="application/yaml")
    return storage.write(name, content, content_type="text/csv")


def finalized(storage: LocalStorage, info) -> CloudEvent:
    """The storage event GCS sends for this object generation (same id for every delivery)."""
    return events.finalized_event(storage.bucket_name, info.event_data(), id_=events.finalized_event_id(info.name, info.generation))


def post(url: str, event: CloudEvent) -> requests.Response:
    return events.post(url, event, timeout=300)


def reply_of(response: requests.Response) -> CloudEvent | None:
    assert response.status_code in (200, 202), f"HTTP {response.status_code}: {response.text}"
    return from_http(dict(response.headers), response.content) if response.status_code == 200 else None


def deliver_together(url: str, deliveries: list[CloudEvent]) -> list[CloudEvent | None]:
    """POST every delivery at the same time; the reply events, in order."""
    with ThreadPoolExecutor(len(deliveries)) as pool:
        return [reply_of(r) for r in pool.map(lambda e: post(url, e), deliveries)]


def test_every_event_delivered_three_times_at_once_ends_in_one_outcome(functions):
    storage, preprocess, train, sink = functions
    uploads = [
        upload(storage, "datasets/dup-a/one.csv", churn_frame(160, seed=11).to_csv(index=False).encode()),
        upload(storage, "datasets/dup-a/two.csv", churn_frame(160, seed=12).to_csv(index=False).encode()),
        upload(storage, "datasets/dup-a/no-target.csv", b"a,b\n1,2\n3,4\n5,6\n"),
    ]
    accepted, rejected = uploads[:2], uploads[2]

    replies = deliver_together(preprocess.url, [finalized(storage, info) for info in uploads for _ in range(3)])
    by_upload = [replies[i:i + 3] for i in range(0, len(replies), 3)]
    for info, answers in zip(uploads, by_upload):
        # Each duplicate is answered with the very same event (type and id), none with an error.
        assert len({(e["type"], e["id"]) for e in answers}) == 1, (info.name, [(e["type"], e["id"]) for e in answers])
    assert [answers[0]["type"] for answers in by_upload] == [events.DATASET_PREPARED] * 2 + [events.DATASET_REJECTED]
    report = by_upload[2][0].data["report"]
    assert sorted(p.name for p in (storage.root / "rejected" / "dup-a").iterdir()) == [report.rsplit("/", 1)[1]]

    prepared = [answers[0] for answers in by_upload[:2]]
    replies = deliver_together(train.url, [event for event in prepared for _ in range(3)])
    by_upload = [replies[i:i + 3] for i in range(0, len(replies), 3)]
    made = versions_by_upload(storage.root)
    for info, answers in zip(accepted, by_upload):
        # One version per upload, and every duplicate delivery is answered with that version (as
        # model.published while it is current, as model.trained once a newer one is).
        assert len(made.get((info.name, str(info.generation)), [])) == 1, (info.name, made)
        (model, version), = made[(info.name, str(info.generation))]
        assert {(e.data["model"], e.data["version"]) for e in answers} == {(model, version)}, info.name
        assert {e["type"] for e in answers} <= {events.MODEL_PUBLISHED, events.MODEL_TRAINED}
    assert (rejected.name, str(rejected.generation)) not in made
    assert sorted(model for found in made.values() for model, _ in found) == ["dup-a", "dup-a"]
    newest = max(version for found in made.values() for model, version in found)
    assert check_bucket(storage.root) == {"dup-a": newest}
    # The losers of the race removed their unfinished files: no model without a card is left.
    assert [p for p in storage.root.glob("models/*/versions/*/model.onnx") if not (p.parent / "card.json").exists()] == []
    # Every delivery announced model.trained (to the sink, or as its reply), always with the version's one id.
    trained = [e for e in sink.received + replies if e["type"] == events.MODEL_TRAINED]
    assert len(trained) == 6 and {e["id"] for e in trained} == {f"trained-{m}-{v}" for found in made.values() for m, v in found}
    # The deliveries really overlapped: at least one trainer lost the race to register its upload.
    assert "was made meanwhile" in train.log.read_text()


def test_prepared_events_of_two_generations_in_reverse_order(functions):
    """x.csv is uploaded, prepared, then replaced; the newer generation's prepared event reaches
    train first. Each generation still makes exactly one version, and the late one does not
    replace the model of the data that replaced it."""
    storage, preprocess, train, _sink = functions
    first = upload(storage, "datasets/order/x.csv", churn_frame(150, seed=21).to_csv(index=False).encode())
    prepared_first = reply_of(post(preprocess.url, finalized(storage, first)))
    second = upload(storage, "datasets/order/x.csv", churn_frame(170, seed=22).to_csv(index=False).encode())
    assert second.generation > first.generation
    prepared_second = reply_of(post(preprocess.url, finalized(storage, second)))
    assert prepared_first["type"] == prepared_second["type"] == events.DATASET_PREPARED

    newer = reply_of(post(train.url, prepared_second))
    assert newer["type"] == events.MODEL_PUBLISHED and newer.data["version"] == 1
    late = reply_of(post(train.url, prepared_first))
    assert late["type"] == events.MODEL_TRAINED and late.data["version"] == 2 and late.data["current_version"] == 1
    card = json.loads((storage.root / "models/order/versions/2/card.json").read_text())
    assert card["promotion"]["promoted"] is False and "replaced by generation" in card["promotion"]["reason"]

    # Both again, now in order: nothing new.
    assert reply_of(post(train.url, prepared_first))["id"] == late["id"]
    assert reply_of(post(train.url, prepared_second))["id"] == newer["id"]
    made = versions_by_upload(storage.root)
    assert made[("datasets/order/x.csv", str(first.generation))] == [("order", 2)]
    assert made[("datasets/order/x.csv", str(second.generation))] == [("order", 1)]
    assert check_bucket(storage.root)["order"] == 1


def test_finalized_event_of_an_overwritten_generation_arriving_last(functions):
    """Generation 2 of y.csv is announced before generation 1 (which it overwrote before anyone
    read it). A folder bucket, like GCS without object versioning, no longer has generation 1's
    bytes: it is acknowledged with no outcome of its own, and generation 2 makes one version."""
    storage, preprocess, train, _sink = functions
    first = upload(storage, "datasets/late/y.csv", churn_frame(150, seed=31).to_csv(index=False).encode())
    second = upload(storage, "datasets/late/y.csv", churn_frame(150, seed=32).to_csv(index=False).encode())
    prepared = reply_of(post(preprocess.url, finalized(storage, second)))
    assert prepared["type"] == events.DATASET_PREPARED and prepared.data["upload"]["generation"] == str(second.generation)
    stale = post(preprocess.url, finalized(storage, first))
    assert stale.status_code == 202 and stale.content == b""
    published = reply_of(post(train.url, prepared))
    assert published["type"] == events.MODEL_PUBLISHED and published.data["version"] == 1
    # Generation 1's late event after the version: still nothing, and still one version.
    assert post(preprocess.url, finalized(storage, first)).status_code == 202
    made = versions_by_upload(storage.root)
    assert [key for key in made if key[0] == "datasets/late/y.csv"] == [("datasets/late/y.csv", str(second.generation))]
    assert not (storage.root / "rejected" / "late").exists()
    assert check_bucket(storage.root)["late"] == 1
