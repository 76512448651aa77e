"""Batch prediction as a user runs it: `bucketml dev` as a subprocess, files written under
batch/<model>/ in the bucket folder, events through the real broker, the predictions compared
with what the predict function answers over HTTP for the same rows; the same step on the GCS
backend (fake-gcs-server); and how a stream is cut into records. No mocks."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest
import requests
from sklearn.datasets import make_classification

from bucketml.contracts import events
from bucketml.storage import LocalStorage
from helpers import BUCKETML, churn_frame, for_upload, free_ports, running_platform, wait_for_event

COMPLETED, FAILED = "bucketml.batch.completed.v1", "bucketml.batch.failed.v1"
FEATURES = ["f0", "f1", "f2", "f3", "f4"]


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 7, 4 << 20])
def test_records_are_lines_or_quoted_cells_across_line_breaks_whatever_the_reads(read_bytes):
    """How the input is cut into records, at any boundary of the stream's reads."""
    from bucketml.serving.batch import _records

    def records(data: bytes) -> list[bytes]:
        return [record for read in _records(io.BytesIO(data), read_bytes) for record in read]

    assert records(b"a,b\r\n1,2\r\n\r\n3,4") == [b"a,b", b"1,2", b"3,4"]  # CRLF, a blank line, no final newline
    quoted = b'a,b\n"x\ny",2\n"p"",q""\nr", 3\n5,6\n'  # line breaks and doubled quotes inside quoted cells
    assert records(quoted) == [b"a,b", b'"x\ny",2', b'"p"",q""\nr", 3', b"5,6"]
    assert records(b'a\n"never closed\nrest\n') == [b"a", b'"never closed\nrest']


def test_a_line_longer_than_any_row_is_refused_not_held_in_memory():
    from bucketml.serving.batch import MAX_RECORD_BYTES, BatchRefused, _records

    for data in (b"x" * (MAX_RECORD_BYTES + 2), b'a\n"' + b"x\n" * (MAX_RECORD_BYTES // 2 + 2)):
        with pytest.raises(BatchRefused, match="runs over 16 MiB") as refused:
            for _ in _records(io.BytesIO(data)):
                pass
        assert refused.value.reason == "not_csv"


def numbers_frame(rows: int, seed: int) -> pd.DataFrame:
    """Five number columns, a few cells missing; three classes named by words."""
    x, y = make_classification(n_samples=rows, n_features=5, n_informative=4, n_redundant=0, n_classes=3,
                               random_state=seed)
    frame = pd.DataFrame(x.round(4), columns=FEATURES)
    frame = frame.mask(np.random.default_rng(seed).random(frame.shape) < 0.02)
    frame["label"] = np.array(["low", "mid", "high"])[y]
    return frame


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    ports = free_ports()
    with running_platform(tmp_path_factory.mktemp("batch"), ports) as info:
        info["batch"] = f"http://127.0.0.1:{ports['batch']}"
        info["preprocess"] = f"http://127.0.0.1:{ports['preprocess']}"
        info["storage"] = storage = LocalStorage(info["bucket"])
        # Two models, trained by the platform: one of numbers only (the numpy fast path) and one
        # with string columns (the csv module and the per-value encoding).
        uploads = [
            storage.write("datasets/numbers/train.csv", numbers_frame(600, 0).to_csv(index=False).encode(),
                          content_type="text/csv", metadata={"algorithms": "random_forest"}),
            storage.write("datasets/churn/train.csv", churn_frame(400, seed=0).to_csv(index=False).encode(),
                          content_type="text/csv", metadata={"algorithms": "logistic_regression"}),
        ]
        for upload in uploads:
            wait_for_event(info["broker"], for_upload("bucketml.model.published.v1", upload.name), timeout=120)
        yield info


def outcome(platform, name: str, type_: str | None = None, timeout: float = 60.0) -> dict:
    """The batch.completed or batch.failed event of the live generation of `name`."""
    generation = platform["storage"].stat(name).generation

    def matches(event: dict) -> bool:
        data = event.get("data") or {}
        return (event["type"] in (COMPLETED, FAILED) and data.get("input") == name
                and data.get("generation") == generation)

    event = wait_for_event(platform["broker"], matches, timeout=timeout)
    if type_ is not None:
        assert event["type"] == type_, event["data"]
    return event


def predict_rows(platform, model: str, rows: list[dict]) -> dict:
    response = requests.post(platform["predict"] + "/predict", json={"model": model, "records": rows}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def as_value(cell: str):
    """A CSV cell as a JSON request carries it: empty is null, a number is a number."""
    if cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


@pytest.mark.parametrize("model, frame", [
    ("numbers", lambda: numbers_frame(10_000, 1).assign(id=lambda f: [f"r{i}" for i in range(len(f))])),
    ("churn", lambda: churn_frame(3_000, seed=2).assign(note=lambda f: ["a, \"quoted\" note"] * len(f))),
])
def test_a_file_under_batch_gets_the_predictions_predict_answers_for_its_rows(platform, model, frame):
    storage = platform["storage"]
    content = frame().to_csv(index=False).encode()
    name = f"batch/{model}/rows.csv"
    storage.write(name, content, content_type="text/csv")
    done = outcome(platform, name, COMPLETED)["data"]
    rows = content.decode().count("\n") - 1
    assert done["model"] == model and done["rows"] == rows and done["output"] == f"predictions/{model}/rows.csv"
    card = json.loads(storage.read(f"models/{model}/versions/{done['version']}/card.json"))
    output = storage.read(done["output"])
    assert storage.stat(done["output"]).metadata["input_generation"] == str(storage.stat(name).generation)

    sent = list(csv.reader(io.StringIO(content.decode())))
    got = list(csv.reader(io.StringIO(output.decode())))
    classes = card["schema"]["classes"]
    extra = ["prediction"] + [f"probability_{c}" for c in classes]
    assert got[0] == sent[0] + extra
    assert len(got) == len(sent) == rows + 1
    # The input's lines are kept byte for byte: each output line starts with the line as sent.
    sent_lines, got_lines = content.decode().splitlines(), output.decode().splitlines()
    assert all(g.startswith(s + ",") for s, g in zip(sent_lines, got_lines))
    assert all(g[:len(s)] == s for s, g in zip(sent, got))

    columns = [c["name"] for c in card["schema"]["columns"]]
    where = [sent[0].index(c) for c in columns]
    records = [{c: as_value(row[j]) for c, j in zip(columns, where)} for row in sent[1:]]
    answer = predict_rows(platform, model, records)
    assert [row[len(sent[0])] for row in got[1:]] == answer["predictions"]
    for row, probabilities in zip(got[1:], answer["probabilities"]):
        assert all(math.isclose(float(a), b, abs_tol=1e-6) for a, b in zip(row[len(sent[0]) + 1:], probabilities))


def test_bucketml_predict_batch_uploads_waits_and_downloads(platform):
    file = platform["root"] / "scoring" / "customers.csv"
    file.parent.mkdir(exist_ok=True)
    churn_frame(50, seed=3).drop(columns=["label"]).to_csv(file, index=False)
    argv = [BUCKETML, "predict-batch", str(file), "--model", "churn", "--bucket", str(platform["bucket"]),
            "--broker", platform["broker"]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    written = file.with_name("customers.predictions.csv")
    lines = done.stdout.splitlines()
    assert lines[0].startswith("uploaded   batch/churn/customers.csv (generation ")
    assert lines[-1].startswith("scored     50 rows with churn version 1 in ") and lines[-1].endswith(f" s -> {written}")
    scored = list(csv.reader(written.open()))
    assert scored[0] == ["tenure", "monthly", "plan", "region", "prediction", "probability_no", "probability_yes"]
    assert len(scored) == 51 and {row[4] for row in scored[1:]} <= {"no", "yes"}

    again = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "customers.predictions.csv exists; nothing was uploaded" in again.stderr
    written.unlink()  # the bucket still has the predictions of this name: refused before uploading
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "predictions/churn/customers.csv already exists" in again.stderr, again.stderr
    assert platform["storage"].stat("batch/churn/customers.csv").generation == int(lines[0].split()[3].rstrip(","))


def test_files_the_model_cannot_score_are_answered_with_batch_failed_and_no_predictions(platform):
    storage = platform["storage"]
    header = ",".join(FEATURES)
    cases = {
        "batch/numbers/short.csv": (b"f0,f1,f2\n1,2,3\n", "missing_columns", "lacks column(s) f3, f4"),
        "batch/numbers/text.csv": (f"{header}\n1,2,3,4,5\n1,2,three,4,5\n".encode(), "invalid_value",
                                   "row 2: column 'f2' expects a number"),
        "batch/numbers/empty.csv": (b"", "empty", "the file is empty"),
        "batch/numbers/header.csv": (f"{header}\n".encode(), "empty", "has a header and no row"),
        "batch/numbers/binary.csv": (bytes(range(256)) * 4, "not_csv", "binary data"),
        "batch/numbers/latin1.csv": (f"{header},città\n1,2,3,4,5,x\n".encode("latin-1"), "not_csv", "not UTF-8"),
        "batch/numbers/latin1-row.csv": (f"{header},note\n1,2,3,4,5,ok\n1,2,3,4,5,café\n".encode("latin-1"), "not_csv",
                                         "row 2 is not UTF-8"),
        "batch/numbers/ragged.csv": (f"{header}\n1,2,3,4,5\n1,2,3\n".encode(), "invalid_row", "row 2 has 3 cell(s)"),
        "batch/nothing/rows.csv": (f"{header}\n1,2,3,4,5\n".encode(), "no_model", "model 'nothing' has no current version"),
        "batch/no model/rows.csv": (f"{header}\n1,2,3,4,5\n".encode(), "invalid_name", "'no model' is no model name"),
    }
    for name, (content, _, _) in cases.items():
        storage.write(name, content, content_type="text/csv")
    for name, (_, reason, words) in cases.items():
        failed = outcome(platform, name, FAILED)
        assert failed["data"]["reason"] == reason, failed["data"]
        assert words in failed["data"]["message"], failed["data"]["message"]
        assert not storage.exists(name.replace("batch/", "predictions/", 1)), name
    # The 200 reply carried the event: nothing was retried or dead-lettered.
    assert not list(storage.list("deadletters/"))


def test_a_new_generation_of_a_scored_name_does_not_overwrite_its_predictions(platform):
    storage = platform["storage"]
    name = "batch/numbers/again.csv"
    storage.write(name, numbers_frame(20, 5)[FEATURES].to_csv(index=False).encode())
    first = outcome(platform, name, COMPLETED)["data"]
    before = storage.stat(first["output"])
    storage.write(name, numbers_frame(30, 6)[FEATURES].to_csv(index=False).encode())
    failed = outcome(platform, name, FAILED)["data"]
    assert failed["reason"] == "output_exists" and f"delete {first['output']}" in failed["message"]
    assert storage.stat(first["output"]) == before


def test_a_duplicate_delivery_answers_the_same_completed_event(platform):
    storage = platform["storage"]
    name = "batch/numbers/twice.csv"
    # (Saved with a byte order mark, as some spreadsheets do: it is no part of the header.)
    storage.write(name, b"\xef\xbb\xbf" + numbers_frame(40, 7)[FEATURES].to_csv(index=False).encode())
    first = outcome(platform, name, COMPLETED)
    output = storage.stat(first["data"]["output"])
    assert storage.read(output.name).startswith(b"f0,f1,f2,f3,f4,prediction,")
    event = events.finalized_event(storage.bucket_name, storage.stat(name).event_data(),
                                   id_=events.finalized_event_id(name, storage.stat(name).generation))
    for _ in range(2):  # what a broker's redelivery sends
        headers, body = events.to_binary_http(event)
        reply = requests.post(platform["batch"], data=body, headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.headers["ce-type"] == COMPLETED and reply.headers["ce-id"] == first["id"]
    assert storage.stat(first["data"]["output"]) == output  # not scored again, not rewritten


def test_each_function_leaves_the_others_folder_alone(platform):
    storage = platform["storage"]
    # batch ignores a dataset upload, and preprocess a file to score: 202, nothing done.
    dataset = events.finalized_event(storage.bucket_name, storage.stat("datasets/numbers/train.csv").event_data())
    scored = storage.write("batch/numbers/alone.csv", numbers_frame(10, 8)[FEATURES].to_csv(index=False).encode())
    outcome(platform, scored.name, COMPLETED)
    to_score = events.finalized_event(storage.bucket_name, scored.event_data())
    for url, event in ((platform["batch"], dataset), (platform["preprocess"], to_score)):
        headers, body = events.to_binary_http(event)
        reply = requests.post(url, data=body, headers=headers, timeout=30)
        assert (reply.status_code, reply.content) == (202, b""), url
    # And through the broker: no batch outcome for the datasets, no dataset outcome for batch/.
    log = requests.get(platform["broker"] + "/events", params={"limit": 1000}, timeout=10).json()["events"]
    inputs = {(e.get("data") or {}).get("input") for e in log if e["type"] in (COMPLETED, FAILED)}
    uploads = {((e.get("data") or {}).get("upload") or {}).get("name") for e in log if e["type"].startswith("bucketml.dataset.")}
    assert not {name for name in inputs if name and not name.startswith("batch/")}
    assert not {name for name in uploads if name and not name.startswith("datasets/")}
    assert not storage.exists("predictions/numbers/train.csv")
    assert not [info.name for info in storage.list("prepared/") if "alone" in info.name]


def test_the_batch_step_streams_from_and_to_google_cloud_storage(fake_gcs, tmp_path):
    """The same step on the GCS backend (fake-gcs-server): read through `open` at the event's
    generation, the predictions stored by `write_file` create-only with their metadata, and a
    duplicate answered from that metadata."""
    import uuid

    from bucketml.steps import batch
    from bucketml.storage.gcs import GCSStorage
    from helpers import publish

    storage = GCSStorage(f"batch-{uuid.uuid4().hex[:12]}", endpoint=fake_gcs)
    storage.client.create_bucket(storage.bucket_name)
    version = publish(storage, "numbers", numbers_frame(300, 0), "train.csv", {"algorithms": "logistic_regression"})
    rows = numbers_frame(120_000, 9)[FEATURES]  # more than two chunks, and more than one read of the stream
    info = storage.write("batch/numbers/big.csv", rows.to_csv(index=False).encode(), content_type="text/csv")
    reply = batch.handle_finalized(storage, info.event_data())
    assert reply["type"] == COMPLETED, reply.data
    assert (reply.data["rows"], reply.data["version"]) == (120_000, version)
    made = storage.stat("predictions/numbers/big.csv")
    assert made.metadata["input_generation"] == str(info.generation) and made.content_type == "text/csv"
    lines = storage.read("predictions/numbers/big.csv").decode().splitlines()
    assert len(lines) == 120_001 and lines[0] == ",".join(FEATURES) + ",prediction,probability_high,probability_low,probability_mid"
    again = batch.handle_finalized(storage, info.event_data())
    assert (again["type"], again["id"], again.data) == (COMPLETED, reply["id"], reply.data)
    assert storage.stat("predictions/numbers/big.csv").generation == made.generation


def test_predict_batch_without_a_running_platform_uploads_and_says_so(tmp_path):
    import os

    from helpers import free_port

    (tmp_path / "rows.csv").write_text("f0,f1,f2,f3,f4\n1,2,3,4,5\n")
    (tmp_path / "rows.txt").write_text("f0\n1\n")
    env = dict(os.environ, BUCKETML_BROKER_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([BUCKETML, "predict-batch", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)

    done = run("rows.csv", "--model", "numbers")
    assert done.returncode == 0, done.stderr
    assert "uploaded   batch/numbers/rows.csv" in done.stdout and "not running" in done.stdout
    assert "predictions/numbers/rows.csv" in done.stdout
    assert LocalStorage(tmp_path / "bucket").stat("batch/numbers/rows.csv").content_type == "text/csv"
    refused = run("rows.txt", "--model", "numbers")
    assert refused.returncode == 1 and refused.stderr.startswith("error: rows.txt: the batch function scores files named")
    refused = run("rows.csv", "--model", "../etc")
    assert refused.returncode == 1 and "invalid model name" in refused.stderr and "Traceback" not in refused.stderr
