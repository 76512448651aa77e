"""Shared test helpers: free ports, generated datasets, waiting on the broker's event log."""

from __future__ import annotations

import socket
import time

import numpy as np
import pandas as pd
import requests


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
