"""Training as a Job (Knative JobSink): `python -m bucketml.cloud.train_job` on the event file a
JobSink mounts trains once and sends what it announces to the event sink; the prod-jobsink
variant routes prepared data to such Jobs instead of the train Service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cloudevents.conversion import to_structured
from kubernetes import client as k8s

from bucketml.contracts import events
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage
from helpers import ROOT, Sink, churn_frame, free_port
from test_manifests import check_schema

VARIANT = ROOT / "infra" / "variants" / "prod-jobsink"


def train_job(event_file: Path, bucket: Path, sink: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BUCKETML_BUCKET=str(bucket), K_SINK=sink)
    return subprocess.run([sys.executable, "-m", "bucketml.cloud.train_job", str(event_file)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_job_trains_once_and_sends_trained_then_published(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    info = storage.write("datasets/churn/data.csv", churn_frame(seed=5).to_csv(index=False).encode(),
                         metadata={"algorithms": "logistic_regression"})
    prepared = handle_finalized(storage, info.event_data())
    event_file = tmp_path / "event"
    event_file.write_bytes(to_structured(prepared)[1])  # what the JobSink mounts: the event as JSON
    port = free_port()

    down = train_job(event_file, storage.root, f"http://127.0.0.1:{port}")
    assert down.returncode == 1, down.stderr  # the Job's backoffLimit retries
    assert Registry(storage).versions("churn") == [1]

    with Sink(port) as sink:
        done = train_job(event_file, storage.root, f"http://127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    assert [(e["type"], e.data["version"]) for e in sink.received] == [(events.MODEL_TRAINED, 1), (events.MODEL_PUBLISHED, 1)]
    assert Registry(storage).versions("churn") == [1]  # the retry made no second version

    event_file.write_text('{"specversion": "1.0", "type": "something.else", "source": "/x", "id": "1"}')
    wrong = train_job(event_file, storage.root, f"http://127.0.0.1:{port}")
    assert wrong.returncode == 2 and "something.else" in wrong.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_the_jobsink_variant_routes_prepared_data_to_jobs():
    built = subprocess.run(["kubectl", "kustomize", str(VARIANT)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Service", "train") not in kinds and {("Service", "predict"), ("Service", "preprocess")} <= kinds
    trigger = next(d for d in docs if d["kind"] == "Trigger" and d["metadata"]["name"] == "train-on-prepared")
    assert trigger["spec"]["subscriber"]["ref"] == {"apiVersion": "sinks.knative.dev/v1alpha1", "kind": "JobSink", "name": "train"}
    jobsink = next(d for d in docs if d["kind"] == "JobSink")
    assert jobsink["metadata"]["namespace"] == "bucketml"
    check_schema(k8s.V1JobSpec, jobsink["spec"]["job"]["spec"], "JobSink train: job spec")
    container = jobsink["spec"]["job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/bucketml/bucketml-train:0.1.0"
    assert container["command"] == ["python", "-m", "bucketml.cloud.train_job"]
    prod = [d for d in yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(ROOT / "infra/overlays/prod")],
                                                          capture_output=True, text=True, check=True).stdout) if d]
    bucket = next(e["value"] for d in prod if d["kind"] == "Service" and d["metadata"]["name"] == "train"
                  for e in d["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "BUCKETML_BUCKET")
    assert {e["name"]: e["value"] for e in container["env"]}["BUCKETML_BUCKET"] == bucket  # the same bucket as prod
