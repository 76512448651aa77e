"""Bearer tokens and size limits over real HTTP: the predict function and the broker as the
processes users run, the CLI as a user types it, and `bucketml dev` end to end with a token.

What is promised (docs/http-api.md#authentication): with a token set, or when listening beyond
loopback, the broker and predict answer 401 (with `WWW-Authenticate: Bearer`) to a request
without the right `Authorization: Bearer <token>`; health endpoints stay open; a server that
would be reachable beyond loopback with no token refuses to start and says what to set; bodies
over the limits are 413s naming the limit and its variable; an upload over
BUCKETML_MAX_UPLOAD_BYTES is a `file_too_large` rejection, and `bucketml upload` refuses it
before uploading.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cloudevents.conversion import to_binary

from bucketml.contracts import events
from helpers import (
    BUCKETML,
    ROOT,
    Sink,
    churn_frame,
    free_port,
    free_ports,
    predict_server,
    publish,
    running_platform,
    stop,
    wait_for_http,
    wait_until,
)

TOKEN = "s3cret-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
RECORD = {"tenure": 12, "monthly": 70.5, "plan": "pro", "region": "east"}
TOKEN_VARIABLES = ("BUCKETML_TOKEN", "BUCKETML_TOKEN_FILE", "BUCKETML_AUTH", "K_SERVICE", "HOST")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any token setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARIABLES}
    return {**env, **extra}


def assert_unauthorized(response: requests.Response, *mentions: str) -> None:
    assert response.status_code == 401, (response.status_code, response.text[:300])
    assert response.headers["WWW-Authenticate"].startswith("Bearer"), response.headers
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    for mention in mentions:
        assert mention in error, (mention, error)


# --- predict -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """A folder bucket with one published model, churn (logistic regression only: quick)."""
    from bucketml.storage import LocalStorage

    storage = LocalStorage(tmp_path_factory.mktemp("auth") / "bucket")
    publish(storage, "churn", churn_frame(seed=0), "churn.csv", {"algorithms": "logistic_regression"})
    return storage.root


@pytest.fixture(scope="module")
def guarded_predict(bucket, tmp_path_factory):
    """predict on loopback with a token set (so it is required) and a 64 KiB body limit."""
    env = {"BUCKETML_TOKEN": TOKEN, "BUCKETML_MAX_REQUEST_BYTES": "65536"}
    with predict_server(bucket, tmp_path_factory.mktemp("predict-log"), env=env) as server:
        wait_until(lambda: server.get("/v2/health/ready").status_code == 200, "churn to be served")
        yield server


def test_predict_answers_only_requests_with_the_token(guarded_predict):
    server, body = guarded_predict, {"model": "churn", "records": [RECORD]}
    assert_unauthorized(server.predict(body), "bearer token", "Authorization: Bearer")
    wrong = server.post("/predict", body, headers={"Authorization": "Bearer not-the-token"})
    assert_unauthorized(wrong, "wrong")
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert_unauthorized(server.post("/predict", body, headers={"Authorization": f"Basic {TOKEN}"}), "Bearer <token>")
    assert_unauthorized(server.post("/predict", body, headers={"Authorization": TOKEN}))

    answer = server.post("/predict", body, headers=BEARER)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "churn" and answer.json()["predictions"][0] in ("yes", "no")
    # The scheme is case-insensitive (RFC 7235).
    assert server.post("/predict", body, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200

    # Every other protocol, metadata, metrics and unknown routes alike.
    v2 = {"inputs": [{"name": k, "datatype": "FP32" if isinstance(v, (int, float)) else "BYTES", "shape": [1], "data": [v]}
                     for k, v in RECORD.items()]}
    for method, path, kwargs in [
        ("POST", "/v2/models/churn/infer", {"json": v2}),
        ("POST", "/v1/models/churn:predict", {"json": {"instances": [RECORD]}}),
        ("GET", "/v2/models/churn", {}),
        ("GET", "/v2/models/churn/ready", {}),
        ("GET", "/v2", {}),
        ("GET", "/metrics", {}),
        ("GET", "/no/such/route", {}),
    ]:
        assert_unauthorized(requests.request(method, server.url + path, timeout=10, **kwargs))
        allowed = requests.request(method, server.url + path, headers=BEARER, timeout=10, **kwargs)
        assert allowed.status_code == (404 if path == "/no/such/route" else 200), (path, allowed.text[:200])
    metrics = server.get("/metrics", headers=BEARER).text
    assert 'code="401",endpoint="predict"' in metrics or 'endpoint="predict",code="401"' in metrics


def test_probes_and_the_openapi_document_need_no_token(guarded_predict):
    server = guarded_predict
    assert server.get("/v2/health/live").json() == {"live": True}
    # Readiness for probes; which models and versions are served only with the token.
    assert server.get("/v2/health/ready").json() == {"ready": True}
    assert server.get("/v2/health/ready", headers=BEARER).json()["models"] == {"churn": 1}
    document = server.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_predict_bodies_over_the_limit_are_413_naming_the_limit(guarded_predict):
    server = guarded_predict
    big = {"model": "churn", "records": [RECORD] * 2000}  # about 140 KB, over the 64 KiB set
    refused = server.post("/predict", big, headers=BEARER)
    assert refused.status_code == 413, refused.text[:300]
    assert "65536" in refused.json()["error"] and "BUCKETML_MAX_REQUEST_BYTES" in refused.json()["error"]
    # Without the token the body is not even read: a 401, not a 413.
    assert_unauthorized(server.post("/predict", big))
    assert server.post("/predict", {"model": "churn", "records": [RECORD] * 100}, headers=BEARER).status_code == 200


def test_under_knative_a_token_file_is_required_and_used(bucket, tmp_path):
    """K_SERVICE (set by Knative) means reachable beyond loopback; the token comes from a file
    as a mounted Secret provides it (with a final newline)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"K_SERVICE": "predict", "BUCKETML_TOKEN_FILE": str(token_file)}
    with predict_server(bucket, tmp_path, env=env) as server:
        body = {"model": "churn", "records": [RECORD]}
        wait_until(lambda: server.get("/v2/health/ready").status_code == 200, "churn to be served")
        assert_unauthorized(server.predict(body))
        assert server.post("/predict", body, headers=BEARER).status_code == 200


def start_predict(bucket: Path, log: Path, env: dict[str, str], port: int) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "functions_framework", "--source", "functions/predict/main.py", "--target", "predict",
             "--host", "127.0.0.1", "--port", str(port), "--asgi"],
            cwd=ROOT, env=clean_env(BUCKETML_BUCKET=str(bucket), WORKERS="1", **env), stdout=out, stderr=subprocess.STDOUT,
        )


def test_predict_reachable_beyond_loopback_without_a_token_refuses_to_start(bucket, tmp_path):
    port = free_port()
    for name, env, mentions in [
        ("knative", {"K_SERVICE": "predict"}, ["K_SERVICE", "BUCKETML_TOKEN", "BUCKETML_TOKEN_FILE", "BUCKETML_AUTH=none"]),
        ("forced", {"BUCKETML_AUTH": "token"}, ["BUCKETML_AUTH=token", "BUCKETML_TOKEN"]),
        ("unreadable file", {"BUCKETML_TOKEN_FILE": str(tmp_path / "missing")}, ["BUCKETML_TOKEN_FILE", "missing"]),
    ]:
        log = tmp_path / f"{name}.log"
        process = start_predict(bucket, log, {**env, "GUNICORN_LOG_LEVEL": "info"}, port)  # info: it logs "Listening at"
        try:
            code = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        output = log.read_text()
        assert code != 0, output
        assert "cannot start" in output and "Traceback" not in output, output
        for mention in mentions:
            assert mention in output, (name, mention, output)
        assert "Listening at" not in output and "Started server process" not in output, output  # it never listened

    # BUCKETML_AUTH=none: a gateway in front authenticates, so predict starts and checks nothing.
    log = tmp_path / "none.log"
    process = start_predict(bucket, log, {"K_SERVICE": "predict", "BUCKETML_AUTH": "none"}, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/v2/health/ready", process, "predict with BUCKETML_AUTH=none", log, timeout=30)
        assert requests.post(url + "/predict", json={"model": "churn", "records": [RECORD]}, timeout=10).status_code == 200
    finally:
        stop(process)


def test_the_cli_sends_the_token_and_says_which_variable_is_missing(guarded_predict):
    url = guarded_predict.url
    command = [BUCKETML, "predict", "churn", json.dumps(RECORD), "--url", url]
    ok = subprocess.run(command, env=clean_env(BUCKETML_TOKEN=TOKEN), capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["model"] == "churn"

    missing = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: the predict function at") and "requires a token" in missing.stderr
    assert "BUCKETML_TOKEN" in missing.stderr and "Traceback" not in missing.stderr

    wrong = subprocess.run(command, env=clean_env(BUCKETML_TOKEN="guess"), capture_output=True, text=True, timeout=60, check=False)
    assert wrong.returncode == 1 and "refused the token in BUCKETML_TOKEN" in wrong.stderr, wrong.stderr


# --- broker --------------------------------------------------------------------------------------


def write_manifests(folder: Path) -> Path:
    folder.mkdir()
    (folder / "broker.yaml").write_text("apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n")
    (folder / "triggers.yaml").write_text(
        "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: everything\nspec:\n  broker: default\n"
        "  subscriber:\n    ref:\n      apiVersion: serving.knative.dev/v1\n      kind: Service\n      name: recorder\n")
    return folder


def start_broker(tmp_path: Path, subscriber: str, env: dict[str, str], host: str = "127.0.0.1",
                 port: int | None = None) -> tuple[subprocess.Popen, str, Path]:
    manifests = tmp_path / "manifests"
    if not manifests.exists():
        write_manifests(manifests)
    port = port or free_port()
    log = tmp_path / f"broker-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bucketml.local.broker", "--manifests", str(manifests), "--db", str(tmp_path / "broker.db"),
             "--host", host, "--port", str(port), "--subscriber", f"recorder={subscriber}"],
            env=clean_env(**env), stdout=out, stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}", log


@contextlib.contextmanager
def guarded_broker(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, Sink]]:
    with Sink() as recorder:
        process, url, log = start_broker(tmp_path, recorder.url, env)
        try:
            wait_for_http(url + "/healthz", process, "the broker to listen", log)
            yield url, recorder
        finally:
            assert stop(process) == 0, log.read_text()


def event_request(model: str = "wine") -> tuple[dict[str, str], bytes]:
    headers, body = to_binary(events.platform_event(events.MODEL_PUBLISHED, "test", model, {"model": model, "version": 1}))
    return dict(headers), body


def test_the_broker_takes_events_and_answers_reads_only_with_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    with guarded_broker(tmp_path, {"BUCKETML_TOKEN_FILE": str(token_file), "BUCKETML_MAX_EVENT_BYTES": "4096"}) as (url, recorder):
        headers, body = event_request()
        assert_unauthorized(requests.post(url, data=body, headers=headers, timeout=10), "bearer token")
        wrong = requests.post(url, data=body, headers={**headers, "Authorization": "Bearer nope"}, timeout=10)
        assert_unauthorized(wrong, "wrong")
        assert_unauthorized(requests.post(url + "/default/default", data=body, headers=headers, timeout=10))
        accepted = requests.post(url, data=body, headers={**headers, **BEARER}, timeout=10)
        assert accepted.status_code == 202 and accepted.json() == {"seq": 1}
        # The broker delivers it on (its deliveries carry no token; the subscriber takes it).
        wait_until(lambda: len(recorder.received) == 1, "the delivery")
        assert recorder.received[0]["type"] == events.MODEL_PUBLISHED

        for path in ("/events", "/events/1", "/deadletters", "/nowhere"):
            assert_unauthorized(requests.get(url + path, timeout=10))
        listed = requests.get(url + "/events", headers=BEARER, timeout=10)
        assert listed.status_code == 200 and [e["seq"] for e in listed.json()["events"]] == [1]
        assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}

        # 413 names the limit and its variable; unauthenticated, the body is never read.
        big = b'{"blob": "' + b"x" * 5000 + b'"}'
        too_big = requests.post(url, data=big, headers={**headers, **BEARER}, timeout=10)
        assert too_big.status_code == 413, too_big.text
        assert "4096" in too_big.json()["error"] and "BUCKETML_MAX_EVENT_BYTES" in too_big.json()["error"]
        assert_unauthorized(requests.post(url, data=big, headers=headers, timeout=10))

        # The CLI: with the token it lists; without, one line naming the variable.
        command = [BUCKETML, "events", "--broker", url]
        listing = subprocess.run(command, env=clean_env(BUCKETML_TOKEN=TOKEN), capture_output=True, text=True, timeout=60, check=False)
        assert listing.returncode == 0 and events.MODEL_PUBLISHED in listing.stdout, listing.stderr
        refused = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith("error: the broker at") and "set BUCKETML_TOKEN" in refused.stderr, refused.stderr


def test_a_broker_beyond_loopback_without_a_token_refuses_to_start(tmp_path):
    process, _, log = start_broker(tmp_path, "http://127.0.0.1:9", {}, host="0.0.0.0")
    assert process.wait(20) == 1
    output = log.read_text()
    assert "cannot start" in output and "0.0.0.0" in output and "BUCKETML_TOKEN" in output and "BUCKETML_AUTH=none" in output
    assert "Traceback" not in output and "listening on" not in output


def test_bucketml_dev_beyond_loopback_without_a_token_starts_nothing(tmp_path):
    ports = free_ports()
    result = subprocess.run(
        [BUCKETML, "dev", "--host", "0.0.0.0", "--bucket", "bucket", "--state-dir", "state",
         "--predict-port", str(ports["predict"]), "--broker-port", str(ports["broker"])],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "--host 0.0.0.0" in result.stderr and "BUCKETML_TOKEN" in result.stderr and "BUCKETML_AUTH=none" in result.stderr
    assert "ready" not in result.stdout and not (tmp_path / "state").exists()


# --- the platform with a token, end to end ---------------------------------------------------------


def test_a_token_protected_platform_works_end_to_end_and_refuses_too_large_uploads(tmp_path):
    """`bucketml dev` with BUCKETML_TOKEN: the watcher, preprocess and the CLI carry the token;
    a dataset over BUCKETML_MAX_UPLOAD_BYTES is rejected as file_too_large without being read,
    and `bucketml upload` refuses it before uploading."""
    ports = free_ports()
    env = {"BUCKETML_TOKEN": TOKEN, "BUCKETML_MAX_UPLOAD_BYTES": "300"}
    csv = tmp_path / "big.csv"
    churn_frame(rows=40).to_csv(csv, index=False)
    assert csv.stat().st_size > 300
    cli_env = clean_env(BUCKETML_TOKEN=TOKEN, BUCKETML_MAX_UPLOAD_BYTES="300")
    with running_platform(tmp_path, ports, env) as platform:
        broker = platform["broker"]
        # The CLI refuses before uploading: nothing reaches the bucket.
        upload = subprocess.run([BUCKETML, "upload", str(csv), "--model", "small", "--bucket", str(platform["bucket"]),
                                 "--broker", broker], env=cli_env, capture_output=True, text=True, timeout=60, check=False)
        assert upload.returncode == 1, upload.stdout + upload.stderr
        assert "over the upload limit of 300 bytes (BUCKETML_MAX_UPLOAD_BYTES)" in upload.stderr
        assert not (platform["bucket"] / "datasets" / "small").exists()

        # Copied into the bucket, it travels watcher -> broker -> preprocess, all with the token.
        target = platform["bucket"] / "datasets" / "small"
        target.mkdir(parents=True)
        shutil.copy(csv, target / "big.csv")

        def rejected() -> dict | None:
            response = requests.get(broker + "/events", params={"type": events.DATASET_REJECTED}, headers=BEARER, timeout=5)
            assert response.status_code == 200, response.text
            return next(iter(response.json()["events"]), None)

        event = wait_until(rejected, "the rejection", timeout=45)
        assert event["data"]["reason"] == "file_too_large"
        assert "BUCKETML_MAX_UPLOAD_BYTES" in event["data"]["message"]
        shown = subprocess.run([BUCKETML, "events", "--model", "small", "--broker", broker], env=cli_env,
                               capture_output=True, text=True, timeout=60, check=False)
        assert shown.returncode == 0 and "rejected   file_too_large" in shown.stdout, shown.stdout + shown.stderr

        # Reads without the token are refused; predict too (its probes stay open).
        assert_unauthorized(requests.get(broker + "/events", timeout=5))
        assert_unauthorized(requests.post(platform["predict"] + "/predict", json={"records": [RECORD]}, timeout=5))
        assert requests.get(platform["predict"] + "/v2/health/live", timeout=5).status_code == 200
        log = platform["log"].read_text()
        assert "access           broker and predict require" in log
        assert "HTTP 401" not in log and "broker refused" not in log, log[-3000:]
