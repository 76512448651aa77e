"""A corpus of malformed and hostile uploads, all dropped into a running platform that serves
a model: each gets exactly one rejection with its reason code and a report, none is retried,
and the served model answers every request throughout."""

from __future__ import annotations

import gzip
import json
import re
import threading
import time

import numpy as np
import pandas as pd
import pytest
import requests
from helpers import (
    ROOT,
    churn_frame,
    for_upload,
    free_ports,
    running_platform,
    wait_for_event,
)

LIMITS = {"BUCKETML_MAX_COLUMNS": "50", "BUCKETML_MAX_UPLOAD_BYTES": "2000000", "BUCKETML_MAX_TEXT_BYTES": "5000000"}


def rows(n: int, header: str = "a,b,target", label=lambda i: "xy"[i % 2]) -> bytes:
    lines = [header] + [f"{i},{i * 2},{label(i)}" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def wide(columns: int) -> bytes:
    frame = pd.DataFrame(np.arange(columns * 20).reshape(20, columns), columns=[f"c{i}" for i in range(columns)])
    frame["target"] = ["x", "y"] * 10
    return frame.to_csv(index=False).encode()


# (model, file name, content, object metadata, expected reason)
CORPUS = [
    ("bad", "empty.csv", b"", {}, "empty_file"),
    ("bad", "blank.csv", b"  \n\r\n\t\n", {}, "empty_file"),
    ("bad", "header-only.csv", b"a,b,target\n", {}, "header_only"),
    ("bad", "header-and-blank-lines.csv", b"a,b,target\n\n\n\n", {}, "header_only"),
    ("bad", "random.csv", random_bytes(5000), {}, "not_csv"),
    ("bad", "png.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + random_bytes(2000, 1), {}, "not_csv"),
    ("bad", "controls.csv", bytes([1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15]) * 200, {}, "not_csv"),
    ("bad", "gzipped-binary.csv.gz", gz(random_bytes(5000, 2)), {}, "not_csv"),
    ("bad", "truncated.csv.gz", gz(rows(500))[:200], {}, "not_csv"),
    ("bad", "gzipped-empty.csv.gz", gz(b""), {}, "empty_file"),
    ("bad", "one-column.csv", b"target\nx\ny\nx\ny\n", {}, "not_csv"),
    ("bad", "ragged.csv", rows(30) + b"1,2,x,4,5,6\n" + rows(5)[11:], {}, "not_csv"),
    ("bad", "no-target.csv", rows(40, header="a,b,c"), {}, "no_target"),
    ("bad", "headerless-no-target.csv", b"".join(f"{i},{i * 3},x{i % 2}\n".encode() for i in range(40)), {}, "no_target"),
    ("bad", "wrong-target.csv", rows(40), {"target": "price"}, "no_target"),
    ("bad", "target-empty.csv", rows(40, label=lambda i: ""), {}, "target_missing"),
    ("bad", "target-na.csv", rows(40, label=lambda i: "NA"), {}, "target_missing"),
    ("bad", "one-class.csv", rows(40, label=lambda i: "same"), {}, "one_class"),
    ("bad", "five-rows.csv", rows(5), {}, "too_few_rows"),
    ("bad", "no-features.csv", b"a,b,target\n" + b"".join(f",,{'xy'[i % 2]}\n".encode() for i in range(40)), {}, "no_features"),
    ("bad", "wide.csv", wide(60), {}, "too_many_columns"),
    ("bad", "big.csv", rows(200_000), {}, "file_too_large"),
    ("bad", "bomb.csv.gz", gz(b"a,b,target\n" + b"1,2,x\n" * 2_000_000), {}, "file_too_large"),
    ("bad", "ebcdic.csv", "a,b,target\n1,2,x\n3,4,y\n".encode("cp500") * 50, {}, "undecodable_text"),
    ("bad", "bad-task.csv", rows(40), {"task": "clustering"}, "spec_invalid"),
    ("bad", "bad-test-size.csv", rows(40), {"test_size": "2"}, "spec_invalid"),
    ("bad name!", "data.csv", rows(40), {}, "invalid_model_name"),
]


@pytest.fixture(scope="module")
def serving_platform(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("corpus"), free_ports(), env=LIMITS) as platform:
        name = "datasets/good/data.csv"
        target = platform["bucket"] / name
        target.parent.mkdir(parents=True)
        target.write_bytes(churn_frame(seed=5).to_csv(index=False).encode())
        wait_for_event(platform["broker"], for_upload("bucketml.model.published.v1", name))
        deadline = time.monotonic() + 15
        while requests.get(platform["predict"] + "/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "predict never loaded the model"
            time.sleep(0.1)
        yield platform


def upload(bucket, model: str, filename: str, content: bytes, metadata: dict) -> str:
    """Through the storage API when there is metadata (as `bucketml upload --set` does), else a copy."""
    name = f"datasets/{model}/{filename}"
    if metadata:
        from bucketml.storage import LocalStorage

        LocalStorage(bucket).write(name, content, content_type="text/csv", metadata=metadata)
    else:
        path = bucket / name
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = bucket.parent / "staging.tmp"
        staging.write_bytes(content)
        staging.replace(path)  # atomic, as a finished copy looks to the watcher
    return name


def test_every_hostile_upload_is_rejected_once_while_the_model_keeps_serving(serving_platform):
    platform = serving_platform
    assert len(CORPUS) >= 25
    failures, versions, stop = [], set(), threading.Event()
    record = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}

    def keep_predicting():
        while not stop.is_set():
            try:
                answer = requests.post(platform["predict"] + "/predict", json={"model": "good", "records": [record]}, timeout=5)
                if answer.status_code != 200:
                    failures.append(answer.text)
                else:
                    versions.add(answer.json()["version"])
            except requests.RequestException as exc:
                failures.append(str(exc))
            time.sleep(0.02)

    client = threading.Thread(target=keep_predicting)
    client.start()
    try:
        names = {}
        for model, filename, content, metadata, reason in CORPUS:
            names[upload(platform["bucket"], model, filename, content, metadata)] = reason
        outcomes = {}
        for name, reason in names.items():
            event = wait_for_event(platform["broker"], for_upload("bucketml.dataset.rejected.v1", name), timeout=60)
            outcomes[name] = event["data"]["reason"]
    finally:
        stop.set()
        client.join()

    assert outcomes == names
    events = requests.get(platform["broker"] + "/events", params={"limit": 1000}, timeout=5).json()["events"]
    for name in names:
        mine = [e for e in events if (e["data"].get("upload") or e["data"]).get("name") == name]
        types = sorted(e["type"] for e in mine)
        assert types == ["bucketml.dataset.rejected.v1", "google.cloud.storage.object.v1.finalized"], (name, types)
        report = json.loads((platform["bucket"] / next(e for e in mine if e["data"].get("report"))["data"]["report"]).read_text())
        assert report["reason"] == names[name] and report["message"]
    # No retry storm: every delivery of a corpus upload succeeded at its first attempt.
    for event in events:
        detail = requests.get(f"{platform['broker']}/events/{event['seq']}", timeout=5).json()
        assert all(d["attempts"] == 1 and d["status"] == "delivered" for d in detail["deliveries"]), detail
    assert failures == [] and versions == {1}
    print(f"\nFIGURES rejection corpus: {len(CORPUS)} hostile uploads, each rejected once with its reason")


def test_rejection_messages_say_what_to_do(serving_platform):
    platform = serving_platform
    name = upload(platform["bucket"], "hints", "headerless.csv",
                  b"".join(f"{i},{i * 3},x{i % 2}\n".encode() for i in range(40)), {})
    event = wait_for_event(platform["broker"], for_upload("bucketml.dataset.rejected.v1", name))
    message = event["data"]["message"]
    assert "--target" in message and "column_3" in message, message
    # Nothing was written for a rejected upload except its report.
    assert not (platform["bucket"] / "prepared" / "hints").exists()
    assert not (platform["bucket"] / "models" / "hints").exists()


def test_the_docs_list_every_rejection_reason_and_no_other():
    """docs/datasets.md shows an example of each reason and docs/architecture.md lists them:
    a reason added to the code (or dropped from it) must reach both."""
    from bucketml.contracts.rejections import REASONS

    datasets = (ROOT / "docs" / "datasets.md").read_text()
    table = datasets[datasets.index("| reason | example upload |"):]
    table = table[:table.index("\n\n")]
    assert re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE) == list(REASONS)
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    paragraph = architecture[architecture.index("Rejection reasons ("):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    assert f"the {len(REASONS)} codes" in paragraph
    assert set(re.findall(r"`([a-z_]+)`", paragraph)) == set(REASONS)
