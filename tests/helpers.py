"""Shared test helpers: free ports, generated datasets, waiting on the broker's event log."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import requests
from cloudevents.http import from_http
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

BUCKETML = str(Path(sys.executable).parent / "bucketml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def churn_frame(rows: int = 240, seed: int = 0) -> pd.DataFrame:
    """Numeric and string columns with missing values; the label depends on both kinds."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "tenure": rng.integers(1, 72, rows).astype(float),
            "monthly": rng.normal(70, 20, rows).round(2),
            "plan": rng.choice(["basic", "plus", "pro"], rows),
            "region": rng.choice(["north", "south", "east", "west"], rows),
        }
    )
    score = (frame["monthly"] - 70) / 20 - frame["tenure"] / 36 + (frame["plan"] == "basic") * 1.0
    frame["label"] = np.where(score + rng.normal(0, 0.3, rows) > 0, "yes", "no")
    frame.loc[rng.random(rows) < 0.08, "monthly"] = np.nan
    frame.loc[rng.random(rows) < 0.08, "plan"] = np.nan
    frame.loc[rng.random(rows) < 0.05, "tenure"] = np.nan
    return frame


def wait_for_event(broker_url: str, predicate, timeout: float = 120.0, after: int = 0) -> dict:
    """The first event in the broker's log (after seq `after`) for which predicate(event) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(f"{broker_url}/events", params={"after": after, "limit": 1000}, timeout=5)
        response.raise_for_status()
        for event in response.json()["events"]:
            if predicate(event):
                return event
        time.sleep(0.2)
    raise AssertionError(f"no matching event within {timeout}s")


def for_upload(type_: str, name: str):
    def predicate(event: dict) -> bool:
        data = event.get("data") or {}
        upload = data if type_.startswith("google.") else data.get("upload") or {}
        return event["type"] == type_ and upload.get("name") == name

    return predicate


@contextlib.contextmanager
def running_platform(root: Path, ports: dict[str, int], env: dict[str, str] | None = None):
    """`bucketml dev` in `root`, as a user starts it; stopped with Ctrl-C (SIGINT) after."""
    log_path = root / f"dev-{time.monotonic_ns()}.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [BUCKETML, "dev", "--bucket", "bucket", "--state-dir", "state",
         "--predict-port", str(ports["predict"]), "--broker-port", str(ports["broker"]),
         "--preprocess-port", str(ports["preprocess"]), "--train-port", str(ports["train"]),
         "--deadletter-port", str(ports["deadletter"]), "--monitor-port", str(ports.get("monitor") or free_port()),
         "--batch-port", str(ports.get("batch") or free_port()), "--console-port", str(ports.get("console") or free_port())],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, BUCKETML_POLL_SECONDS="0.5", **(env or {})),
    )
    info = {
        "root": root,
        "bucket": root / "bucket",
        "broker": f"http://127.0.0.1:{ports['broker']}",
        "predict": f"http://127.0.0.1:{ports['predict']}",
        "console": f"http://127.0.0.1:{ports['console']}",
        "process": process,
        "log": log_path,
    }
    try:
        deadline = time.monotonic() + 60
        while "ready; press Ctrl-C" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "platform did not become ready:\n" + log_path.read_text()
            time.sleep(0.2)
        yield info
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "killed"
        log.close()
        print(log_path.read_text()[-5000:])
        assert code == 0, f"bucketml dev did not stop cleanly ({code})"


def stop(process: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM `process` and wait up to `timeout` seconds; if it is still running, SIGKILL it
    and wait for it. Returns its exit code (negative: the signal that ended it)."""
    process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def free_ports() -> dict[str, int]:
    return {name: free_port() for name in ("predict", "broker", "preprocess", "train", "deadletter", "monitor", "batch",
                                           "console")}


ROOT = Path(__file__).resolve().parents[1]

# The packaging end-to-end runs (the images built and run as the manifests run them, and an
# install into a fresh venv) take minutes once the code changed: behind a switch, run before
# a change to images, manifests or packaging lands (README, "The two commands").
PACKAGING_TESTS = os.environ.get("BUCKETML_PACKAGING_TESTS") == "1"
# kill -9 and soak runs: behind BUCKETML_RELIABILITY_LONG=1 with the long reliability runs.
RELIABILITY_LONG = os.environ.get("BUCKETML_RELIABILITY_LONG") == "1"
long_reliability_test = pytest.mark.skipif(not RELIABILITY_LONG, reason="kill -9 or soak run: set BUCKETML_RELIABILITY_LONG=1")
packaging_test = pytest.mark.skipif(not PACKAGING_TESTS, reason="packaging end-to-end run (images, install): set "
                                    "BUCKETML_PACKAGING_TESTS=1")


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_for_http(url: str, process: subprocess.Popen, what: str, log: Path | None = None, timeout: float = 15.0,
                  statuses: tuple[int, ...] = (200,)) -> None:
    """Until GET `url` answers one of `statuses`; fails at once (with `log`) if `process` exits."""
    def answers() -> bool:
        assert process.poll() is None, f"{what} exited" + (":\n" + log.read_text() if log else "")
        try:
            return requests.get(url, timeout=1).status_code in statuses
        except requests.ConnectionError:
            return False

    wait_until(answers, what, timeout=timeout)


def publish(storage, model: str, frame: pd.DataFrame, filename: str, metadata: dict[str, str] | None = None) -> int:
    """Upload a CSV (with a dataset spec as object `metadata`) and run preprocess and train on it
    in-process; returns the new current version."""
    from bucketml.steps import preprocess as preprocessing
    from bucketml.steps import train as trainer

    info = storage.write(f"datasets/{model}/{filename}", frame.to_csv(index=False).encode(), content_type="text/csv",
                         metadata=metadata)
    prepared = preprocessing.handle_finalized(storage, info.event_data())
    assert prepared is not None and prepared["type"] == "bucketml.dataset.prepared.v1", prepared and prepared.data
    reply = trainer.handle_prepared(storage, prepared.data)[-1]
    assert reply["type"] == "bucketml.model.published.v1", reply.data
    return reply.data["version"]


class Sink:
    """A CloudEvents sink on 127.0.0.1 (`port`, or a free one) that records what it accepts.
    It answers `statuses` in turn, then 202; with `hold`, it keeps each request open until
    `release()` and then refuses it. Usable as a context manager, which closes it."""

    def __init__(self, port: int = 0, statuses: list[int] | None = None, hold: bool = False):
        self.received: list = []
        self.statuses = list(statuses or [])
        self.held = 0
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", port, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    @Request.application
    def _app(self, request: Request) -> Response:
        if not self._released.is_set():
            with self._lock:
                self.held += 1
            self._released.wait(60)
            return Response(status=503)
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 202
            if status < 300:
                self.received.append(from_http(dict(request.headers), request.get_data()))
        return Response(status=status)

    def names(self) -> set[str]:
        """The object names of the storage events received."""
        with self._lock:
            return {event.data["name"] for event in self.received}

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Server:
    """A predict function process, as functions-framework runs it."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return requests.post(self.url + path, timeout=30, **kwargs)

    def predict(self, body: dict) -> requests.Response:
        return self.post("/predict", body)

    def version_of(self, model: str) -> int | None:
        """The version `model` is served with by default, or None."""
        response = self.get(f"/v2/models/{model}/ready")
        return int(response.json()["version"]) if response.status_code == 200 else None


@contextlib.contextmanager
def predict_server(bucket: Path, log_dir: Path, poll_seconds: float = 0.3, env: dict[str, str] | None = None):
    """The predict function on a free port over `bucket`; stopped with SIGTERM, which must
    end it cleanly and with no unhandled error in its log."""
    env = {"BUCKETML_POLL_SECONDS": str(poll_seconds), "WORKERS": "1", **(env or {})}
    with function_server("predict", bucket, log_dir, env) as server:
        yield server


@contextlib.contextmanager
def function_server(function: str, bucket: Path, log_dir: Path, env: dict[str, str] | None = None):
    """functions/<function> run by functions-framework on a free port over `bucket`."""
    port = free_port()
    log_path = log_dir / f"{function}-{port}.log"
    env = dict(os.environ, BUCKETML_BUCKET=str(bucket), **(env or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "functions_framework", "--source", f"functions/{function}/main.py",
             "--target", function, "--host", "127.0.0.1", "--port", str(port), *(["--asgi"] if function == "predict" else [])],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    try:  # predict has a liveness route; the event functions answer GET with 405
        wait_for_http(url + "/v2/health/live", process, f"{function} to listen", log_path, timeout=30, statuses=(200, 405))
        yield Server(url, process, log_path)
    finally:
        code = stop(process)
        log = log_path.read_text()
        print(log[-5000:])
    assert code == 0, f"{function} did not exit cleanly on SIGTERM ({code})"
    assert "Traceback" not in log, f"the {function} process logged an unhandled error:\n" + log


def check_bucket(bucket: Path) -> dict[str, int | None]:
    """What a user must never see in a local bucket, checked from the files themselves: every
    model's current.json names a complete version (card.json and model.onnx present), whose
    model.onnx has the SHA-256 and size its card records and carries that model and version in
    its ONNX metadata, and whose card says it passed the ONNX parity gate and names its upload.
    Every other complete version is held to the same. Returns {model: current version or None};
    raises AssertionError naming the first thing wrong."""
    import hashlib
    import json

    import onnx

    def check_version(model: str, folder: Path) -> None:
        card_path, onnx_path = folder / "card.json", folder / "model.onnx"
        assert onnx_path.is_file(), f"{model} version {folder.name} has a card but no model.onnx"
        card = json.loads(card_path.read_text())
        data = onnx_path.read_bytes()
        where = f"{model} version {folder.name}"
        assert card.get("model") == model and str(card.get("version")) == folder.name, f"{where}: card names {card.get('model')} {card.get('version')}"
        assert card["artifact"]["sha256"] == hashlib.sha256(data).hexdigest(), f"{where}: model.onnx does not match its card's sha256"
        assert card["artifact"]["bytes"] == len(data), f"{where}: model.onnx is {len(data)} bytes, the card says {card['artifact']['bytes']}"
        assert (card.get("parity") or {}).get("passed") is True and card["parity"]["rows"] > 0, f"{where}: no passed parity check in its card"
        upload = (card.get("lineage") or {}).get("upload") or {}
        assert upload.get("name") and str(upload.get("generation", "")).isdigit(), f"{where}: card lineage names no upload: {upload}"
        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        assert props.get("bucketml.model") == model and props.get("bucketml.version") == folder.name, f"{where}: ONNX metadata {props}"

    current: dict[str, int | None] = {}
    models = bucket / "models"
    for model_dir in sorted(models.iterdir()) if models.is_dir() else []:
        model = model_dir.name
        for folder in sorted((model_dir / "versions").glob("*")):
            if (folder / "card.json").exists():
                check_version(model, folder)
        pointer = model_dir / "current.json"
        if not pointer.exists():
            current[model] = None
            continue
        version = json.loads(pointer.read_text())["version"]
        target = model_dir / "versions" / str(version)
        assert (target / "card.json").is_file(), f"{model}: current.json names version {version}, which is not complete"
        current[model] = version
    return current


def versions_by_upload(bucket: Path) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """{(upload object name, generation): [(model, version), ...]} over every complete version, from
    each card's lineage: exactly one entry per accepted upload is the promise."""
    import json

    found: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for card_path in sorted((bucket / "models").glob("*/versions/*/card.json")):
        card = json.loads(card_path.read_text())
        upload = card["lineage"]["upload"]
        found.setdefault((upload["name"], str(upload["generation"])), []).append((card["model"], card["version"]))
    return found


# --- the Pub/Sub emulator and a notifying fake-gcs-server (fixtures in conftest.py) ----------
PUBSUB_PROJECT = "bucketml-test"
PUBSUB_TOPIC = "gcs-notifications"  # fake-gcs-server's notifications go there


def stop_process(process: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM `process` (with `group`, its whole process group, which it must lead), then
    SIGKILL what is left after 10 s."""
    if group:  # gcloud starts the emulator's JVM as a child, which outlives it: end the group this test made
        _signal_group(process, signal.SIGTERM)
    elif process.poll() is None:
        process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if group:
        time.sleep(0.5)
        _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def pubsub_subscription(emulator: str, name: str, topic: str = PUBSUB_TOPIC, project: str = PUBSUB_PROJECT) -> str:
    """Create subscription `name` of `topic` on the Pub/Sub emulator at `emulator` (host:port); its id."""
    response = requests.put(f"http://{emulator}/v1/projects/{project}/subscriptions/{name}",
                            json={"topic": f"projects/{project}/topics/{topic}", "ackDeadlineSeconds": 10}, timeout=5)
    response.raise_for_status()
    return name
