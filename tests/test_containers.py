"""The images, built by `make images` and run as the Knative manifests run them.

The images are built with podman (infra/images/build.sh: an image whose inputs did not change
is kept). Each container starts the way infra/knative/services.yaml (and gcs-source.yaml)
starts it: as the image's non-root user 10001, read-only root filesystem, the manifest's
emptyDir volumes as tmpfs, its Secret volumes as read-only files, all capabilities dropped, no
privilege escalation, the manifest's environment, no HOME given. Every container's start-up log
must be free of errors and warnings, and every container must stop cleanly on SIGTERM.

Containers use the host's network on free ports. Every container a test starts is removed, on
failure too; the images stay (they are `make images`' output).

Where podman's default OCI runtime cannot start a container because the machine forbids
setrlimit (a sandboxed build machine), infra/images/runc-without-rlimits is used instead;
BUCKETML_PODMAN_RUNTIME names a runtime explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from bucketml.contracts import events
from bucketml.storage import LocalStorage
from helpers import (PUBSUB_PROJECT, ROOT, Sink, churn_frame, free_port, packaging_test, publish, pubsub_subscription,
                     stop_process, wait_for_http)

pytestmark = packaging_test

FUNCTIONS = ("predict", "deadletter", "monitor", "batch", "preprocess", "train", "console")
WRAPPER = ROOT / "infra" / "images" / "runc-without-rlimits"
MANIFESTS = ROOT / "infra" / "knative"
# A start-up log line with any of these fails the test.
START_UP_FAULT = re.compile(r"error|warning|traceback", re.IGNORECASE)
TOKEN = "container-test-token"
CHURN_RECORD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}


# --- the engine and the images -----------------------------------------------------------------

@dataclass
class Engine:
    podman: list[str]  # podman with the runtime to use
    built: str  # what `make images` said

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.podman, *args], capture_output=True, text=True, check=check, timeout=timeout)


def _runtime_args(podman: str, image: str) -> list[str]:
    """[] for podman's default runtime, or ['--runtime', X] where that one cannot start a container."""
    explicit = os.environ.get("BUCKETML_PODMAN_RUNTIME")
    if explicit:
        return ["--runtime", explicit]
    probe = [podman, "run", "--rm", "--network", "none", "--entrypoint", "true", image]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return []
    if "rlimit" not in done.stderr:
        pytest.fail(f"podman cannot start a container: {done.stderr.strip()}")
    # This machine forbids setrlimit: runc without the rlimits podman writes (see the wrapper).
    wrapped = [podman, "--runtime", str(WRAPPER), *probe[1:]]
    done = subprocess.run(wrapped, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"podman cannot start a container, even without rlimits: {done.stderr.strip()}"
    return ["--runtime", str(WRAPPER)]


@pytest.fixture(scope="session")
def engine() -> Engine:
    """podman with the images built (`make images`, i.e. infra/images/build.sh)."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (`make test-deps` installs podman, runc and debootstrap "
                    "when run as root on Debian)")
    info = subprocess.run([podman, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    started = time.monotonic()
    done = subprocess.run(["sh", str(ROOT / "infra" / "images" / "build.sh")], capture_output=True, text=True,
                          timeout=1200, cwd=ROOT)
    if done.returncode != 0:
        if os.geteuid() != 0:  # rootless podman may lack what the build needs (debootstrap needs root)
            pytest.skip(f"make images failed as a non-root user; run the tests as root: {done.stderr.strip()[-500:]}")
        pytest.fail(f"make images failed:\n{done.stdout}\n{done.stderr}")
    print(f"make images ({time.monotonic() - started:.0f} s):\n{done.stdout}")
    return Engine([podman, *_runtime_args(podman, "localhost/bucketml-deadletter:latest")], done.stdout)


# --- containers as the manifests start them -----------------------------------------------------

def _manifest_container(file: str, kind: str, name: str) -> tuple[dict, dict]:
    """(container, pod spec) of the object `kind`/`name` in infra/knative/`file`."""
    for document in yaml.safe_load_all((MANIFESTS / file).read_text()):
        if document and document["kind"] == kind and document["metadata"]["name"] == name:
            pod = document["spec"]["template"]["spec"]
            return pod["containers"][0], pod
    raise AssertionError(f"no {kind} {name} in infra/knative/{file}")


def manifest_run_args(file: str, kind: str, name: str, secrets: Path) -> list[str]:
    """`podman run` options for the container of `kind`/`name`: its securityContext, its volumes
    (emptyDir as tmpfs, a Secret as files written under `secrets` holding TOKEN) and every env
    entry with a literal value (resourceFieldRef, as WORKERS, is the one core it is limited to)."""
    container, pod = _manifest_container(file, kind, name)
    security = container.get("securityContext") or {}
    args = ["--network", "host"]
    assert security.get("runAsNonRoot") is True, f"{name} may run as root"
    args += ["--user", str(security.get("runAsUser", 10001))]  # the image's user, as runAsNonRoot checks
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for capability in (security.get("capabilities") or {}).get("drop", []):
        args += ["--cap-drop", capability]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            size = (volume["emptyDir"] or {}).get("sizeLimit", "")
            limit = f",size={size[:-2]}m" if size.endswith("Mi") else ""
            args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777{limit}"]
        elif "secret" in volume:
            folder = secrets / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for item in volume["secret"].get("items") or [{"path": "token"}]:
                (folder / item["path"]).write_text(TOKEN + "\n")
                (folder / item["path"]).chmod(0o644)
            args += ["--volume", f"{folder}:{mount['mountPath']}:ro"]
        else:
            raise AssertionError(f"{name}: no stand-in for volume {volume}")
    for variable in container.get("env", []):
        if "value" in variable:
            args += ["--env", f"{variable['name']}={variable['value']}"]
        elif (variable.get("valueFrom") or {}).get("resourceFieldRef"):
            args += ["--env", f"{variable['name']}=1"]
    if container.get("command"):
        args += ["--entrypoint", json.dumps(container["command"])]
    return args


@dataclass
class Container:
    engine: Engine
    name: str
    url: str
    start_up_log: str = ""

    def log(self) -> str:
        done = self.engine.run("logs", self.name, check=False)
        return done.stdout + done.stderr

    def running(self) -> bool:
        done = self.engine.run("container", "inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return done.stdout.strip() == "true"


def _wait_until_answering(container: Container, path: str, statuses: tuple[int, ...], headers: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(container.url + path, headers=headers, timeout=2).status_code in statuses:
                return
        except requests.ConnectionError:
            pass
        assert container.running(), f"{container.name} exited:\n{container.log()}"
        assert time.monotonic() < deadline, f"{container.name} did not answer {path} within {timeout}s:\n{container.log()}"
        time.sleep(0.2)


@contextlib.contextmanager
def started(engine: Engine, function: str, tmp_path: Path, env: dict[str, str], volumes: dict[Path, str] | None = None,
            manifest: tuple[str, str, str] | None = None, ready: tuple[str, tuple[int, ...]] | None = ("/", (405,)),
            image: str | None = None) -> Iterator[Container]:
    """The container of `function` started from its manifest (default: its Knative Service in
    services.yaml) with `env` on top and the host folders `volumes` mounted read-write; yields
    once `ready` (path, statuses) answers, after checking its start-up log. Stopped with SIGTERM
    and removed on the way out; it must exit 0 with no traceback in its log."""
    file, kind, name = manifest or ("services.yaml", "Service", function)
    port = free_port()
    container = Container(engine, f"bucketml-test-{function}-{uuid.uuid4().hex[:8]}", f"http://127.0.0.1:{port}")
    args = ["run", "--detach", "--name", container.name, *manifest_run_args(file, kind, name, tmp_path / "secrets" / function)]
    for source, target in (volumes or {}).items():
        args += ["--volume", f"{source}:{target}"]
    for key, value in {"PORT": str(port), **env}.items():
        args += ["--env", f"{key}={value}"]
    args.append(image or f"localhost/bucketml-{function}:latest")
    try:
        engine.run(*args)
        if ready:
            _wait_until_answering(container, ready[0], ready[1], {"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        else:
            time.sleep(2)
            assert container.running(), f"{container.name} exited:\n{container.log()}"
        container.start_up_log = container.log()
        faults = [line for line in container.start_up_log.splitlines() if START_UP_FAULT.search(line)]
        assert not faults, f"{function}'s start-up log has errors or warnings:\n" + "\n".join(faults)
        yield container
        stopped = engine.run("stop", "--time", "15", container.name, check=False)
        assert stopped.returncode == 0, stopped.stderr
        code = engine.run("container", "inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
        log = container.log()
        assert code == "0", f"{function} exited {code} on SIGTERM:\n{log[-3000:]}"
        assert "Traceback" not in log, f"{function} logged an unhandled error:\n{log}"
    finally:
        print(f"--- {container.name}\n{container.log()[-3000:]}")
        engine.run("rm", "--force", "--time", "2", container.name, check=False)


def _writable_bucket(path: Path) -> Path:
    """A bucket folder the containers' user (10001) may write into."""
    path.mkdir(parents=True, exist_ok=True)
    for folder, dirs, files in os.walk(path):
        os.chmod(folder, 0o777)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666)
    return path


# --- the tests ---------------------------------------------------------------------------------

def test_make_images_builds_every_image_under_the_overlays_names(engine):
    for overlay in (ROOT / "infra" / "overlays").glob("*/kustomization.yaml"):
        names = {entry["name"] for entry in yaml.safe_load(overlay.read_text())["images"]}
        assert names == {f"bucketml-{function}" for function in FUNCTIONS}, overlay
    for function in FUNCTIONS:
        image = json.loads(engine.run("image", "inspect", f"localhost/bucketml-{function}:latest").stdout)[0]
        config = image["Config"]
        assert config["User"] == "10001"
        assert f"FUNCTION_TARGET={function}" in config["Env"] and "HOME=/tmp" in config["Env"]
        print(f"localhost/bucketml-{function}: {image['Size'] / 1e6:.0f} MB")
    # The predict set has no training libraries (the image serves ONNX with onnxruntime alone).
    done = engine.run("run", "--rm", "--network", "none", "--entrypoint", "python", "localhost/bucketml-predict:latest",
                      "-c", "import sklearn", check=False)
    assert done.returncode != 0 and "No module named 'sklearn'" in done.stderr, done.stderr
    done = engine.run("run", "--rm", "--network", "none", "--entrypoint", "python", "localhost/bucketml-monitor:latest",
                      "-c", "import pandas", check=False)
    assert done.returncode != 0 and "No module named 'pandas'" in done.stderr, done.stderr


def test_the_predict_container_serves_a_mounted_bucket_and_requires_its_token(engine, tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    version = publish(storage, "churn", churn_frame(seed=0), "data.csv", {"algorithms": "logistic_regression"})
    bucket = _writable_bucket(storage.root)
    # Reached over the network in Knative (K_SERVICE): the token from the mounted Secret is required.
    with started(engine, "predict", tmp_path, {"BUCKETML_BUCKET": "/bucket", "K_SERVICE": "predict"}, {bucket: "/bucket"},
                 ready=("/v2/health/ready", (200,))) as predict:
        body = {"model": "churn", "records": [CHURN_RECORD]}
        refused = requests.post(predict.url + "/predict", json=body, timeout=10)
        assert refused.status_code == 401, refused.text
        wrong = requests.post(predict.url + "/predict", json=body, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401, wrong.text
        answer = requests.post(predict.url + "/predict", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == version and answer.json()["predictions"][0] in ("yes", "no")
        # The probes and /reload need no token (the kubelet and the Trigger cannot send one).
        assert requests.get(predict.url + "/v2/health/live", timeout=10).status_code == 200
    assert '"severity": "INFO"' in predict.start_up_log  # the image logs JSON


def test_preprocess_train_monitor_and_deadletter_containers_answer_cloudevents(engine, tmp_path):
    from cloudevents.conversion import to_binary
    from cloudevents.http import CloudEvent, from_http

    storage = LocalStorage(tmp_path / "bucket")
    upload = storage.write("datasets/churn/customers.csv", churn_frame(seed=3).to_csv(index=False).encode(),
                           content_type="text/csv", metadata={"algorithms": "logistic_regression"})
    bucket = _writable_bucket(storage.root)
    env = {"BUCKETML_BUCKET": "/bucket"}

    def post(url: str, event) -> requests.Response:
        headers, body = to_binary(event)
        return requests.post(url, headers=dict(headers), data=body, timeout=120)

    with Sink() as broker, \
            started(engine, "preprocess", tmp_path, env, {bucket: "/bucket"}) as preprocess, \
            started(engine, "train", tmp_path, {**env, "BUCKETML_BROKER_URL": broker.url}, {bucket: "/bucket"}) as train, \
            started(engine, "deadletter", tmp_path, env, {bucket: "/bucket"}) as deadletter, \
            started(engine, "monitor", tmp_path, {**env, "BUCKETML_BROKER_URL": broker.url}, {bucket: "/bucket"}) as monitor:
        finalized = events.finalized_event("local", upload.event_data(), id_=events.finalized_event_id(upload.name, upload.generation))
        answer = post(preprocess.url, finalized)
        assert answer.status_code == 200, answer.text
        prepared = from_http(dict(answer.headers), answer.content)
        assert prepared["type"] == events.DATASET_PREPARED, prepared.data

        answer = post(train.url, prepared)
        assert answer.status_code == 200, answer.text
        published = from_http(dict(answer.headers), answer.content)
        assert published["type"] == events.MODEL_PUBLISHED and published.data["version"] == 1, published.data
        assert [event["type"] for event in broker.received] == [events.MODEL_TRAINED]  # sent to the broker by train

        dead = events.platform_event(events.MODEL_PUBLISHED, "train", "churn", {"model": "churn", "version": 1})
        dead["knativeerrordest"] = "http://notifier.example/"
        answer = post(deadletter.url, dead)
        assert answer.status_code == 202, answer.text

        # A PingSource's ping runs the monitor over the bucket (nothing to decide yet); another type is refused.
        ping = CloudEvent({"type": events.PING, "source": "/apis/v1/namespaces/bucketml/pingsources/monitor-every-minute",
                           "datacontenttype": "application/json"}, {"run": "monitor"})
        assert post(monitor.url, ping).status_code == 202
        refused = post(monitor.url, finalized)
        assert refused.status_code == 400 and events.PING in refused.text, refused.text
    assert len(list((bucket / "deadletters").glob("*.json"))) == 1
    card = json.loads((bucket / "models" / "churn" / "versions" / "1" / "card.json").read_text())
    assert card["lineage"]["upload"]["name"] == upload.name and card["parity"]["passed"] is True


# --- the production event path, every part in its container -----------------------------------

GCS_BUCKET = "uploads"


@contextlib.contextmanager
def broker_on_host(subscribers: dict[str, str], port: int, tmp_path: Path) -> Iterator[str]:
    """`python -m bucketml.local.broker`, the stand-in for Knative's Broker, routing by the
    Triggers of infra/knative to `subscribers` (Service name -> URL)."""
    url = f"http://127.0.0.1:{port}"
    routes = [arg for name, target in subscribers.items() for arg in ("--subscriber", f"{name}={target}")]
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bucketml.local.broker", "--manifests", str(MANIFESTS),
                                    "--db", str(tmp_path / "broker.db"), "--port", str(port), *routes],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"{url}/healthz", process, "the broker to listen", log_path)
        yield url
    finally:
        stop_process(process)
        print(f"--- broker\n{log_path.read_text()[-3000:]}")


def test_an_object_written_to_gcs_ends_in_a_prediction_served_by_the_containers(engine, pubsub_emulator, notifying_gcs, tmp_path):
    """The cluster's event path without a cluster, on the GCS backend: an object written with
    google-cloud-storage is notified through Pub/Sub, the GCS source (the pipeline image, started
    as the ContainerSource in infra/knative/gcs-source.yaml) posts it to the broker (the local
    stand-in for Knative's, routing by infra/knative), and the preprocess, train and predict
    containers, as their Knative Services, prepare, train and serve it."""
    from bucketml.storage.gcs import GCSStorage

    storage = GCSStorage(GCS_BUCKET, endpoint=notifying_gcs)
    if storage.client.lookup_bucket(GCS_BUCKET) is None:
        storage.client.create_bucket(GCS_BUCKET)
    gcs = {"BUCKETML_BUCKET": f"gs://{GCS_BUCKET}", "STORAGE_EMULATOR_HOST": notifying_gcs}
    broker_port = free_port()
    broker_url = f"http://127.0.0.1:{broker_port}"
    subscription = pubsub_subscription(pubsub_emulator, "containers")
    with started(engine, "preprocess", tmp_path, gcs) as preprocess, \
            started(engine, "train", tmp_path, {**gcs, "BUCKETML_BROKER_URL": broker_url}) as train, \
            started(engine, "deadletter", tmp_path, gcs) as deadletter, \
            started(engine, "batch", tmp_path, gcs) as batch, \
            started(engine, "predict", tmp_path, {**gcs, "K_SERVICE": "predict", "BUCKETML_POLL_SECONDS": "5"},
                    ready=("/v2/health/live", (200,))) as predict:
        subscribers = {"preprocess": preprocess.url, "train": train.url, "predict": predict.url, "deadletter": deadletter.url,
                       "batch": batch.url}
        with broker_on_host(subscribers, broker_port, tmp_path), \
                started(engine, "gcs-source", tmp_path,
                        {"PUBSUB_EMULATOR_HOST": pubsub_emulator, "GOOGLE_CLOUD_PROJECT": PUBSUB_PROJECT,
                         "BUCKETML_PUBSUB_SUBSCRIPTION": subscription, "K_SINK": broker_url},
                        manifest=("gcs-source.yaml", "ContainerSource", "gcs-uploads"), ready=None,
                        image="localhost/bucketml-preprocess:latest"):
            blob = storage.client.bucket(GCS_BUCKET).blob("datasets/churn/customers.csv")
            blob.metadata = {"algorithms": "logistic_regression"}
            blob.upload_from_string(churn_frame(seed=6).to_csv(index=False), content_type="text/csv")
            auth = {"Authorization": f"Bearer {TOKEN}"}

            def served() -> bool:
                answer = requests.get(predict.url + "/v2/models/churn/ready", headers=auth, timeout=5)
                return answer.status_code == 200 and int(answer.json()["version"]) == 1

            deadline = time.monotonic() + 120
            while not served():
                assert time.monotonic() < deadline, "predict did not serve the uploaded model within 120 s"
                time.sleep(0.3)
            answer = requests.post(predict.url + "/predict", json={"model": "churn", "records": [CHURN_RECORD]},
                                   headers=auth, timeout=10)
            assert answer.status_code == 200 and answer.json()["version"] == 1, answer.text
            assert requests.post(predict.url + "/predict", json={"model": "churn", "records": [CHURN_RECORD]},
                                 timeout=10).status_code == 401
            card = json.loads(storage.read("models/churn/versions/1/card.json"))
            blob.reload()
            assert card["lineage"]["upload"]["name"] == blob.name
            assert str(card["lineage"]["upload"]["generation"]) == str(blob.generation)
