"""Every rejection and training failure stays visible: recorded in the bucket (rejected/,
failed/), shown by `bucketml models NAME`, and logged by the function with the id of the event
that caused it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import BUCKETML, churn_frame, function_server, publish

from bucketml.contracts import events
from bucketml.steps import preprocess as preprocessing
from bucketml.steps import train as trainer
from bucketml.storage import LocalStorage



def models(bucket: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([BUCKETML, "models", name], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, BUCKETML_BUCKET=str(bucket)))


def test_models_name_shows_versions_rejections_and_failed_trainings(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    publish(storage, "churn", churn_frame(seed=1), "good.csv", {"algorithms": "logistic_regression"})
    # Rejected: a header and no rows.
    info = storage.write("datasets/churn/empty.csv", b"tenure,monthly,plan,region,churned\n", content_type="text/csv")
    rejected = preprocessing.handle_finalized(storage, info.event_data())
    assert rejected["type"] == events.DATASET_REJECTED
    # Failed: accepted and prepared, but the prepared data is gone before training runs.
    info = storage.write("datasets/churn/later.csv", churn_frame(seed=2).to_csv(index=False).encode(), content_type="text/csv")
    prepared = preprocessing.handle_finalized(storage, info.event_data())
    for item in list(storage.list(prepared.data["prepared"])):
        storage.delete(item.name)
    [failure] = trainer.handle_prepared(storage, prepared.data)
    assert failure["type"] == events.TRAINING_FAILED and storage.exists(failure.data["report"])

    shown = models(tmp_path / "bucket", "churn")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout
    assert lines.splitlines()[1].split()[:2] == ["*", "1"]  # the version, current
    assert "rejected uploads (1):" in lines and f"datasets/churn/empty.csv#{rejected.data['upload']['generation']}  header_only" in lines
    assert "failed trainings (1):" in lines and f"datasets/churn/later.csv#{info.generation}  prepared_data_missing" in lines
    assert "the prepared data is gone" in lines

    # A model with only a rejection is still shown, not "no such model".
    info = storage.write("datasets/lonely/x.csv", b"", content_type="text/csv")
    preprocessing.handle_finalized(storage, info.event_data())
    lonely = models(tmp_path / "bucket", "lonely")
    assert lonely.returncode == 0 and "no versions yet" in lonely.stdout and "empty_file" in lonely.stdout


def test_a_rejection_is_logged_with_the_id_of_the_event_that_caused_it(tmp_path):
    bucket = tmp_path / "bucket"
    storage = LocalStorage(bucket)
    info = storage.write("datasets/churn/empty.csv", b"a,b\n", content_type="text/csv")
    event = events.finalized_event(storage.bucket_name, info.event_data(), id_="upload-event-42")
    with function_server("preprocess", bucket, tmp_path) as preprocess:
        answer = events.post(preprocess.url, event, timeout=30)
        assert answer.status_code == 200 and answer.headers["ce-type"] == events.DATASET_REJECTED
    log = preprocess.log.read_text()
    line = next(line for line in log.splitlines() if "upload-event-42" in line)
    assert events.DATASET_REJECTED in line and "header_only" in line
