"""Shared test helpers: free ports, generated datasets, waiting on the broker's event log."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

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
         "--preprocess-port", str(ports["preprocess"]), "--train-port", str(ports["train"])],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, BUCKETML_POLL_SECONDS="0.5", **(env or {})),
    )
    info = {
        "root": root,
        "bucket": root / "bucket",
        "broker": f"http://127.0.0.1:{ports['broker']}",
        "predict": f"http://127.0.0.1:{ports['predict']}",
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


def free_ports() -> dict[str, int]:
    return {name: free_port() for name in ("predict", "broker", "preprocess", "train")}
