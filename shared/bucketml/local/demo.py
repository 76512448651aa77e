"""`bucketml dev --demo`: upload a dataset built from scikit-learn's bundled iris data, wait
for its model to be published, and print a prediction from the predict function."""

from __future__ import annotations

import json
import time
from typing import Callable

import requests

from bucketml.auth import client_headers
from bucketml.local.client import Failure, wait_for_outcome
from bucketml.local.supervisor import Settings
from bucketml.storage import open_storage

DEMO_MODEL = "iris"
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
        outcome = wait_for_outcome(settings.broker_url, name, info.generation, 600, echo=lambda line: say("demo", line.strip()))
        if outcome["type"] != "bucketml.model.published.v1":
            say("demo", f"no model was published: {outcome['type']}")
            return
        body = {"model": DEMO_MODEL, "records": [DEMO_RECORD]}
        say("demo", f"POST {settings.predict_url}/predict {json.dumps(body)}")
        # The published event may reach predict a moment after the broker records it.
        for _ in range(50):
            response = requests.post(settings.predict_url + "/predict", json=body, headers=client_headers(), timeout=10)
            if response.status_code == 200:
                break
            time.sleep(0.2)
        say("demo", f"HTTP {response.status_code} {response.text}")
        say("demo", f"the platform keeps serving at {settings.predict_url}; try `bucketml predict {DEMO_MODEL} '{json.dumps(DEMO_RECORD)}'`")
    except (Failure, requests.RequestException, OSError) as exc:
        say("demo", f"demo failed: {exc}")
