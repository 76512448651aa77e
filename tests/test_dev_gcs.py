"""`bucketml dev --bucket gs://NAME`: the local functions on a Google Cloud Storage bucket, told
of its uploads by the bucket's Pub/Sub notifications through the GCS source (not the folder
watcher). Google is played by fake-gcs-server, which publishes real notifications to the
Pub/Sub emulator (fixtures `notifying_gcs` and `pubsub_emulator` in conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
from helpers import BUCKETML, PUBSUB_PROJECT, churn_frame, free_ports, pubsub_subscription, wait_until

BUCKET = "dev-uploads"
RECORD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}


def _emulated(gcs: str, pubsub: str, **extra: str) -> dict[str, str]:
    """The environment of a user pointed at the emulators (no subscription or project set)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BUCKETML_PUBSUB_SUBSCRIPTION", "GOOGLE_CLOUD_PROJECT", "BUCKETML_BUCKET", "K_SINK")}
    return {**env, "STORAGE_EMULATOR_HOST": gcs, "PUBSUB_EMULATOR_HOST": pubsub, **extra}


def _dev_argv(ports: dict[str, int], *args: str) -> list[str]:
    return [BUCKETML, "dev", "--state-dir", "state", *args,
            "--predict-port", str(ports["predict"]), "--broker-port", str(ports["broker"]),
            "--preprocess-port", str(ports["preprocess"]), "--train-port", str(ports["train"]),
            "--deadletter-port", str(ports["deadletter"]), "--monitor-port", str(ports["monitor"]),
            "--batch-port", str(ports["batch"]), "--console-port", str(ports["console"])]


def _interrupt(process: subprocess.Popen) -> int | str:
    """Ctrl-C, as a user stops `bucketml dev`; it stops its parts. SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return "killed"


@contextlib.contextmanager
def dev_on_gcs(root: Path, env: dict[str, str], *args: str) -> Iterator[dict]:
    """`bucketml dev` started in `root` with `args`, until it says it is ready; stopped with
    Ctrl-C on the way out, which must end it cleanly."""
    ports = free_ports()
    log_path = root / "dev.log"
    log = open(log_path, "w")
    process = subprocess.Popen(_dev_argv(ports, *args), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                               env={**env, "BUCKETML_POLL_SECONDS": "0.5"})
    info = {"process": process, "log": log_path, "broker": f"http://127.0.0.1:{ports['broker']}",
            "predict": f"http://127.0.0.1:{ports['predict']}"}
    code: int | str = "not stopped"
    try:
        def ready() -> bool:
            assert process.poll() is None, "bucketml dev exited:\n" + log_path.read_text()
            return "ready; press Ctrl-C" in log_path.read_text()

        wait_until(ready, "bucketml dev to be ready", timeout=90)
        yield info
    finally:
        code = _interrupt(process)
        log.close()
        text = log_path.read_text()
        print(text if len(text) < 9000 else text[:3000] + "\n...\n" + text[-6000:])
    assert code == 0, f"bucketml dev did not stop cleanly ({code})"
    assert not (root / "state" / "dev.pids.json").exists(), "bucketml dev left its pids file: parts may be running"


def _served_version(predict: str, model: str) -> int | None:
    try:
        response = requests.get(f"{predict}/v2/models/{model}/ready", timeout=5)
    except requests.RequestException:
        return None
    return int(response.json()["version"]) if response.status_code == 200 else None


@pytest.fixture(scope="module")
def gcs_bucket(notifying_gcs):
    """The bucket BUCKET on the notifying fake-gcs-server, through google-cloud-storage."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project=PUBSUB_PROJECT, credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": notifying_gcs})
    return client.create_bucket(BUCKET)


def test_dev_on_a_gcs_bucket_serves_a_model_from_an_upload_made_with_google_cloud_storage(
        pubsub_emulator, notifying_gcs, gcs_bucket, tmp_path):
    subscription = pubsub_subscription(pubsub_emulator, "dev-laptop")
    env = _emulated(notifying_gcs, pubsub_emulator)
    with dev_on_gcs(tmp_path, env, "--bucket", f"gs://{BUCKET}", "--subscription", subscription,
                    "--project", PUBSUB_PROJECT) as dev:
        log = dev["log"].read_text()
        assert f"gs://{BUCKET}" in log and f"projects/{PUBSUB_PROJECT}/subscriptions/{subscription}" in log
        # Nothing on the local disk is named after the URL, and no bucket folder appears.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.log", "state"]
        assert (tmp_path / "state" / f"broker-gs-{BUCKET}.sqlite").exists()

        # 1. An upload made with google-cloud-storage, as any program or `gcloud storage cp` makes it.
        blob = gcs_bucket.blob("datasets/churn/customers.csv")
        blob.metadata = {"algorithms": "logistic_regression"}
        blob.upload_from_string(churn_frame(seed=3).to_csv(index=False), content_type="text/csv")
        wait_until(lambda: _served_version(dev["predict"], "churn") == 1, "predict to serve churn version 1", timeout=180)
        answer = requests.post(dev["predict"] + "/predict", json={"model": "churn", "records": [RECORD]}, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "churn" and body["version"] == 1 and body["predictions"] == ["yes"], body
        card = json.loads(gcs_bucket.blob("models/churn/versions/1/card.json").download_as_bytes())
        assert card["lineage"]["upload"]["name"] == "datasets/churn/customers.csv"
        assert card["lineage"]["upload"]["bucket"] == BUCKET
        log = dev["log"].read_text()
        assert "gcs-source|" in log and "finalized dev-uploads/datasets/churn/customers.csv" in log
        assert "watcher" not in log

        # 2. `bucketml upload` and `bucketml models` work on the same gs:// bucket.
        csv = tmp_path / "customers-2.csv"
        csv.write_text(churn_frame(seed=4).to_csv(index=False))
        cli_env = {**env, "BUCKETML_BROKER_URL": dev["broker"], "BUCKETML_PREDICT_URL": dev["predict"]}
        uploaded = subprocess.run([BUCKETML, "upload", str(csv), "--model", "churn", "--bucket", f"gs://{BUCKET}",
                                   "--set", "algorithms=logistic_regression", "--timeout", "180"],
                                  capture_output=True, text=True, env=cli_env, timeout=240)
        assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
        assert "served     churn version 2" in uploaded.stdout, uploaded.stdout
        listing = subprocess.run([BUCKETML, "models", "churn", "--bucket", f"gs://{BUCKET}"],
                                 capture_output=True, text=True, env=cli_env, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert [row.split()[0] for row in listing.stdout.splitlines()[1:]] == ["1", "*"], listing.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["customers-2.csv", "dev.log", "state"]


@pytest.fixture(scope="module")
def refusals(pubsub_emulator) -> str:
    """A subscription that exists, for the cases where something else is missing."""
    return pubsub_subscription(pubsub_emulator, "refusals")


def _refused(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`bucketml dev ARGS`, which must end by itself (refusing to start); stopped if it does not."""
    process = subprocess.Popen(_dev_argv(free_ports(), *args), cwd=root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _interrupt(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"bucketml dev {' '.join(args)} started instead of refusing:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("args, env_extra, expected", [
    # No subscription: what to pass, and the commands creating one.
    ((), {}, ["needs --subscription (or BUCKETML_PUBSUB_SUBSCRIPTION)",
              "gcloud pubsub subscriptions create bucketml-uploads --topic bucketml-uploads",
              f"gcloud storage buckets notifications create gs://{BUCKET} --topic bucketml-uploads"]),
    # A subscription that does not exist (named by the environment, as a ContainerSource does).
    ((), {"BUCKETML_PUBSUB_SUBSCRIPTION": "no-such-subscription", "GOOGLE_CLOUD_PROJECT": PUBSUB_PROJECT},
     [f"subscription projects/{PUBSUB_PROJECT}/subscriptions/no-such-subscription does not exist",
      f"gcloud pubsub subscriptions create no-such-subscription --topic bucketml-uploads --ack-deadline 10 --project {PUBSUB_PROJECT}"]),
    # A subscription id without its project.
    (("--subscription", "refusals"), {}, ["is an id without a project: pass --project or set GOOGLE_CLOUD_PROJECT"]),
    # A bucket that does not exist.
    (("--bucket", "gs://no-such-bucket", "--subscription", f"projects/{PUBSUB_PROJECT}/subscriptions/refusals"), {},
     ["bucket gs://no-such-bucket does not exist", "gcloud storage buckets create gs://no-such-bucket"]),
    # Not a bucket URL.
    (("--bucket", f"gs://{BUCKET}/datasets", "--subscription", "refusals"), {}, ["expected gs://NAME"]),
])
def test_a_missing_subscription_or_bucket_is_refused_before_anything_starts(
        pubsub_emulator, notifying_gcs, gcs_bucket, refusals, tmp_path, args, env_extra, expected):
    if "--bucket" not in args:
        args = ("--bucket", f"gs://{BUCKET}", *args)
    started = time.monotonic()
    done = _refused(tmp_path, _emulated(notifying_gcs, pubsub_emulator, **env_extra), *args)
    assert done.returncode == 1, done
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "nothing was started" in done.stderr, done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr
    assert done.stdout == "", done.stdout  # no banner: no part was started
    assert list(tmp_path.iterdir()) == [], "a refused start left files (a state folder, a `gs:` folder)"
    assert time.monotonic() - started < 30


def test_the_notification_check_wants_finalized_objects_as_json_on_the_subscriptions_topic():
    """What real Cloud Storage lists (fake-gcs-server has no notification configurations)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from google.cloud.storage.notification import BucketNotification

    from bucketml.cloud.gcs_source import SetupError, batch_note, notifies, subscription_path

    bucket = storage.Client(project="p", credentials=AnonymousCredentials()).bucket("b")

    def notification(topic: str, payload: str = "JSON_API_V1", events: list[str] | None = None,
                     prefix: str | None = None) -> BucketNotification:
        resource = {"topic": f"//pubsub.googleapis.com/{topic}", "payload_format": payload, "id": "1"}
        if events:
            resource["event_types"] = events
        if prefix is not None:
            resource["object_name_prefix"] = prefix
        return BucketNotification.from_api_repr(resource, bucket=bucket)

    topic = "projects/proj-a/topics/uploads"
    assert notifies([notification(topic)], topic) is True
    assert notifies([notification("projects/proj-a/topics/other"), notification(topic, events=["OBJECT_FINALIZE"])], topic) is True
    assert notifies([], topic) == []
    # Uploads are under datasets/: a notification for exactly those (what docs/deploy.md creates)
    # or for a wider prefix serves; one for other objects does not.
    assert notifies([notification(topic, prefix="datasets/")], topic) is True
    assert notifies([notification(topic, prefix="data")], topic) is True
    assert notifies([notification(topic, prefix="models/")], topic) == [
        "projects/proj-a/topics/uploads (all events, JSON_API_V1, objects under models/)"]
    found = notifies([notification(topic, payload="NONE"), notification(topic, events=["OBJECT_DELETE"]),
                      notification("projects/proj-b/topics/uploads")], topic)
    assert found == ["projects/proj-a/topics/uploads (all events, NONE)", "projects/proj-a/topics/uploads (OBJECT_DELETE, JSON_API_V1)",
                     "projects/proj-b/topics/uploads (all events, JSON_API_V1)"]

    # Files to score are under batch/: a second notification, whose absence is a warning only.
    assert notifies([notification(topic, prefix="datasets/")], topic, "batch/") == [
        "projects/proj-a/topics/uploads (all events, JSON_API_V1, objects under datasets/)"]
    both = [notification(topic, prefix="datasets/"), notification(topic, prefix="batch/")]
    assert notifies(both, topic) is True and notifies(both, topic, "batch/") is True
    assert batch_note("b", "projects/p/subscriptions/s", topic, both) is None
    note = batch_note("b", "projects/p/subscriptions/s", topic, both[:1])
    assert "no OBJECT_FINALIZE notification for the objects under batch/" in note
    assert f"gcloud storage buckets notifications create gs://b --topic {topic} --event-types OBJECT_FINALIZE " \
           "--object-prefix batch/ --payload-format json" in note
    assert notifies([notification(topic)], topic, "batch/") is True  # no prefix: every object

    assert subscription_path("p", "s") == "projects/p/subscriptions/s"
    assert subscription_path(None, "projects/q/subscriptions/s") == "projects/q/subscriptions/s"
    for bad in ("projects/proj-b/topics/s", "a/b"):
        with pytest.raises(SetupError, match="neither an id nor"):
            subscription_path("p", bad)
