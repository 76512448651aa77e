"""`bucketml dev --demo`: upload a dataset built from scikit-learn's bundled iris data, wait
for its model to be published and served, and print a prediction from the predict function."""

from __future__ import annotations

import json
import time
from typing import Callable

import requests

from bucketml.auth import client_headers
from bucketml.local.client import Failure, wait_for_outcome, wait_until_served
from bucketml.local.supervisor import Settings
from bucketml.storage import open_storage

DEMO_MODEL = "iris"
DEMO_TIMEOUT = 600.0  # seconds for the model to be published and served
DEMO_RECORD = {"sepal length (cm)": 6.1, "sepal width (cm)": 2.8, "petal length (cm)": 4.7, "petal width (cm)": None}


def demo_csv() -> bytes:
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True)
    frame = data.frame.rename(columns={"target": "species"})
    frame["species"] = frame["species"].map(dict(enumerate(data.target_names)))
    return frame.to_csv(index=False).encode()


def run_demo(settings: Settings, say: Callable[[str, str], None]) -> None:
    try:
        name = f"datasets/{DEMO_MODEL}/iris.csv"
        storage = open_storage(str(settings.bucket))
        info = storage.write(name, demo_csv(), content_type="text/csv", metadata={"target": "species"})
        say("demo", f"uploaded {name} (generation {info.generation}); waiting for the model")

        def echo(line: str) -> None:
            say("demo", line.strip())

        deadline = time.monotonic() + DEMO_TIMEOUT
        outcome = wait_for_outcome(settings.broker_url, name, info.generation, DEMO_TIMEOUT, echo=echo)
        if outcome["type"] != "bucketml.model.published.v1":
            say("demo", f"no model was published: {outcome['type']}")
            return
        # As `bucketml upload` does: until predict serves the version to unpinned requests.
        wait_until_served(settings.predict_url, DEMO_MODEL, outcome["data"]["version"], deadline - time.monotonic(), echo=echo)
        body = {"model": DEMO_MODEL, "records": [DEMO_RECORD]}
        say("demo", f"POST {settings.predict_url}/predict {json.dumps(body)}")
        response = requests.post(settings.predict_url + "/predict", json=body, headers=client_headers(), timeout=10)
        say("demo", f"HTTP {response.status_code} {response.text}")
        say("demo", f"the platform keeps serving at {settings.predict_url}; try `bucketml predict {DEMO_MODEL} '{json.dumps(DEMO_RECORD)}'`")
    except (Failure, requests.RequestException, OSError) as exc:
        say("demo", f"demo failed: {exc}")
