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
DEFAULT_DEADLETTER_PORT = 8084


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


# --- access and request limits (docs/http-api.md#authentication) ---------------------------
AUTH_MODES = ("auto", "token", "none")
DEFAULT_MAX_REQUEST_BYTES = 20 * 1024 * 1024  # predict: one request body
DEFAULT_MAX_EVENT_BYTES = 10 * 1024 * 1024  # broker ingress: one CloudEvent


class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable and what to set instead."""


def auth_mode() -> str:
    """BUCKETML_AUTH: `auto` (a token is required off loopback, or whenever one is set),
    `token` (always required) or `none` (never: something in front authenticates)."""
    mode = os.environ.get("BUCKETML_AUTH", "").strip().lower() or "auto"
    if mode not in AUTH_MODES:
        raise ConfigError(f"BUCKETML_AUTH={mode!r} is not one of {', '.join(AUTH_MODES)}")
    return mode


def token() -> str | None:
    """The bearer token: BUCKETML_TOKEN, or the content of the file BUCKETML_TOKEN_FILE names
    (a mounted Kubernetes Secret; surrounding whitespace, such as a final newline, is ignored)."""
    value = os.environ.get("BUCKETML_TOKEN", "").strip()
    path = os.environ.get("BUCKETML_TOKEN_FILE", "").strip()
    if value and path:
        raise ConfigError("both BUCKETML_TOKEN and BUCKETML_TOKEN_FILE are set; set only one")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"BUCKETML_TOKEN_FILE={path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if not value:
            raise ConfigError(f"BUCKETML_TOKEN_FILE={path} is empty")
        where = f"the token in BUCKETML_TOKEN_FILE={path}"
    else:
        where = "BUCKETML_TOKEN"
    if value and not (value.isascii() and value.isprintable() and " " not in value):
        raise ConfigError(f"{where} must be printable ASCII without spaces (for example the output of `openssl rand -hex 32`)")
    return value or None


def _byte_limit(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"{name}={text!r} is not a positive number of bytes")
    return int(text)


def max_request_bytes() -> int:
    """predict: the largest request body it reads (BUCKETML_MAX_REQUEST_BYTES); larger is a 413."""
    return _byte_limit("BUCKETML_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)


def max_event_bytes() -> int:
    """The broker ingress: the largest request (one CloudEvent) it takes (BUCKETML_MAX_EVENT_BYTES)."""
    return _byte_limit("BUCKETML_MAX_EVENT_BYTES", DEFAULT_MAX_EVENT_BYTES)
