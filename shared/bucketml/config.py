"""Where things are. Every setting has a local default and an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

# One log line shape for every part, so `bucketml dev`'s merged log reads as one.
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"

DEFAULT_BUCKET = "./bucket"
DEFAULT_STATE_DIR = "./.bucketml"
DEFAULT_PREDICT_PORT = 8080
DEFAULT_BROKER_PORT = 8081
DEFAULT_PREPROCESS_PORT = 8082
DEFAULT_TRAIN_PORT = 8083


def bucket_url() -> str:
    """A folder path (local backend) or gs://bucket (Google Cloud Storage)."""
    return os.environ.get("BUCKETML_BUCKET", DEFAULT_BUCKET)


def broker_url() -> str:
    return os.environ.get("BUCKETML_BROKER_URL", f"http://127.0.0.1:{DEFAULT_BROKER_PORT}")


def event_sink_url() -> str:
    """Where a function sends events beyond its one reply: K_SINK when Knative injects it
    (SinkBinding), else the broker ingress."""
    return os.environ.get("K_SINK") or broker_url()


def predict_url() -> str:
    return os.environ.get("BUCKETML_PREDICT_URL", f"http://127.0.0.1:{DEFAULT_PREDICT_PORT}")


def state_dir() -> Path:
    return Path(os.environ.get("BUCKETML_STATE_DIR", DEFAULT_STATE_DIR))


def manifests_dir() -> Path:
    """The Knative manifests the local broker routes by (infra/knative in the source tree)."""
    env = os.environ.get("BUCKETML_MANIFESTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "infra" / "knative"


def functions_dir() -> Path:
    env = os.environ.get("BUCKETML_FUNCTIONS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "functions"


def pointer_poll_seconds() -> float:
    """How often a predict replica checks whether a model's current pointer moved."""
    return float(os.environ.get("BUCKETML_POLL_SECONDS", "1.0"))
