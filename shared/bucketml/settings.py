"""Every setting bucketml reads from the environment, typed, in one place (docs/configuration.md).

One frozen dataclass per concern, built by its `from_env()` from the variables of that concern
only, so a broken token setting fails what needs the token and nothing else. The accessor
functions below (`bucket_url()`, `token()`, ...) read the environment at each call: tests and
`bucketml dev` set variables for the processes they start, and a function reads them when it
needs them. Standard library only: the predict function imports this module at start-up, and a
cold start must stay cheap (no pydantic here).

The command-line entry points (`bucketml`, the broker, the watcher, the GCS source) take their
flags' fallbacks from the environment with click's `envvar=`; docs/configuration.md lists those
variables too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

Environment = Mapping[str, str]

# One log line shape for every part, so `bucketml dev`'s merged log reads as one.
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"

DEFAULT_BUCKET = "./bucket"
DEFAULT_STATE_DIR = "./.bucketml"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREDICT_PORT = 8080
DEFAULT_BROKER_PORT = 8081
DEFAULT_PREPROCESS_PORT = 8082
DEFAULT_TRAIN_PORT = 8083
DEFAULT_DEADLETTER_PORT = 8084
DEFAULT_MONITOR_PORT = 8087
DEFAULT_CONSOLE_PORT = 8085
DEFAULT_MONITOR_SECONDS = 10.0
DEFAULT_MONITOR_FLUSH_SECONDS = 10.0
DEFAULT_MONITOR_WINDOW_SECONDS = 600.0
DEFAULT_BATCH_PORT = 8086
DEFAULT_POLL_SECONDS = 1.0
# Where the Knative manifests (infra/) and the function sources (functions/) are when
# BUCKETML_MANIFESTS / BUCKETML_FUNCTIONS do not say: the repository root when bucketml runs
# from a source checkout (or an editable install of one), else the copies an installed package
# carries in bucketml/_bundled/ (setup.py copies them into the wheel at build time).
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parents[1]
BUNDLED_ROOT = _PACKAGE_DIR / "_bundled"

# --- access and request limits (docs/http-api.md#authentication) ---------------------------
AUTH_MODES = ("auto", "token", "none")
DEFAULT_MAX_REQUEST_BYTES = 20 * 1024 * 1024  # predict: one request body
DEFAULT_MAX_EVENT_BYTES = 10 * 1024 * 1024  # broker ingress: one CloudEvent
# The upload limits preprocess enforces (docs/datasets.md); their defaults live with the
# reader, in `bucketml.training.reading.Limits`.
UPLOAD_LIMIT_VARIABLES = {
    "max_upload_bytes": "BUCKETML_MAX_UPLOAD_BYTES",
    "max_text_bytes": "BUCKETML_MAX_TEXT_BYTES",
    "max_columns": "BUCKETML_MAX_COLUMNS",
    "max_rows": "BUCKETML_MAX_ROWS",
}


class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable and what to set instead."""


@dataclass(frozen=True)
class Endpoints:
    """Where the bucket, the broker and predict are, and where a function sends its events."""

    bucket: str  # BUCKETML_BUCKET: a folder path (local backend) or gs://bucket
    broker_url: str  # BUCKETML_BROKER_URL
    predict_url: str  # BUCKETML_PREDICT_URL
    # K_SINK when Knative injects it (a ContainerSource does), else the broker ingress.
    event_sink_url: str

    @classmethod
    def from_env(cls, env: Environment = os.environ) -> Endpoints:
        broker = env.get("BUCKETML_BROKER_URL", f"http://{DEFAULT_HOST}:{DEFAULT_BROKER_PORT}")
        return cls(
            bucket=env.get("BUCKETML_BUCKET", DEFAULT_BUCKET),
            broker_url=broker,
            predict_url=env.get("BUCKETML_PREDICT_URL", f"http://{DEFAULT_HOST}:{DEFAULT_PREDICT_PORT}"),
            event_sink_url=env.get("K_SINK") or broker,
        )


@dataclass(frozen=True)
class SourceTree:
    """The folders `bucketml dev` runs from: its state, the manifests the local broker routes
    by, and the functions it starts (infra/knative and functions/ of the source tree, or the
    installed package's copies: `resource_path`)."""

    state_dir: Path  # BUCKETML_STATE_DIR
    manifests_dir: Path  # BUCKETML_MANIFESTS
    functions_dir: Path  # BUCKETML_FUNCTIONS

    @classmethod
    def from_env(cls, env: Environment = os.environ) -> SourceTree:
        return cls(
            state_dir=Path(env.get("BUCKETML_STATE_DIR", DEFAULT_STATE_DIR)),
            manifests_dir=Path(env.get("BUCKETML_MANIFESTS") or resource_path("infra/knative")),
            functions_dir=Path(env.get("BUCKETML_FUNCTIONS") or resource_path("functions")),
        )


@dataclass(frozen=True)
class Access:
    """Who may call the broker ingress and predict (docs/http-api.md#authentication)."""

    # BUCKETML_AUTH: `auto` (a token is required off loopback, or whenever one is set),
    # `token` (always required) or `none` (never: something in front authenticates).
    mode: str
    # BUCKETML_TOKEN, or the content of the file BUCKETML_TOKEN_FILE names (a mounted
    # Kubernetes Secret; surrounding whitespace, such as a final newline, is ignored).
    token: str | None

    @classmethod
    def from_env(cls, env: Environment = os.environ) -> Access:
        return cls(_auth_mode(env), _token(env))


@dataclass(frozen=True)
class RequestLimits:
    """The largest request each server reads; larger is answered 413."""

    max_request_bytes: int  # BUCKETML_MAX_REQUEST_BYTES: predict, one request body
    max_event_bytes: int  # BUCKETML_MAX_EVENT_BYTES: the broker ingress, one CloudEvent

    @classmethod
    def from_env(cls, env: Environment = os.environ) -> RequestLimits:
        return cls(
            _byte_limit(env, "BUCKETML_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
            _byte_limit(env, "BUCKETML_MAX_EVENT_BYTES", DEFAULT_MAX_EVENT_BYTES),
        )


@dataclass(frozen=True)
class Platform:
    """What the process learns about where it runs."""

    log_format: str  # BUCKETML_LOG_FORMAT: `text` (default) or `json` (one object per line)
    # K_SERVICE: set by Knative and Cloud Run, so a function knows it is reached over the network.
    knative_service: str | None
    # HOST: the address functions-framework listens on when not given --host (its default 0.0.0.0).
    functions_framework_host: str | None
    storage_emulator_host: str | None  # STORAGE_EMULATOR_HOST: a fake GCS for tests

    @classmethod
    def from_env(cls, env: Environment = os.environ) -> Platform:
        return cls(
            log_format=env.get("BUCKETML_LOG_FORMAT", "text").lower(),
            knative_service=env.get("K_SERVICE") or None,
            functions_framework_host=env.get("HOST") or None,
            storage_emulator_host=env.get("STORAGE_EMULATOR_HOST") or None,
        )


@dataclass(frozen=True)
class InferenceLog:
    """predict's optional copy of every inference call, sent as CloudEvents (docs/http-api.md)."""

    url: str  # BUCKETML_INFERENCE_LOG_URL: where the events go; unset, nothing is logged
    mode: str  # BUCKETML_INFERENCE_LOG_MODE: all (default), request or response

    @classmethod
    def from_env(cls, env: Environment = os.environ) -> InferenceLog | None:
        url = env.get("BUCKETML_INFERENCE_LOG_URL")
        return cls(url, env.get("BUCKETML_INFERENCE_LOG_MODE", "all")) if url else None


# --- accessors: read at each call --------------------------------------------------------------
def bucket_url() -> str:
    """A folder path (local backend) or gs://bucket (Google Cloud Storage)."""
    return Endpoints.from_env().bucket


def broker_url() -> str:
    return Endpoints.from_env().broker_url


def event_sink_url() -> str:
    """Where a function sends events beyond its one reply: K_SINK when it is set (a Knative
    ContainerSource or SinkBinding injects it), else the broker ingress."""
    return Endpoints.from_env().event_sink_url


def predict_url() -> str:
    return Endpoints.from_env().predict_url


def state_dir() -> Path:
    return SourceTree.from_env().state_dir


def manifests_dir() -> Path:
    """The Knative manifests the local broker routes by (infra/knative) and deploy renders."""
    return SourceTree.from_env().manifests_dir


def functions_dir() -> Path:
    return SourceTree.from_env().functions_dir


def resource_path(relative: str) -> Path:
    """A folder of the source tree (`infra/knative`, `infra/overlays`, `infra/variants`,
    `functions`): the checkout's own when bucketml runs from one, else the installed package's
    copy. The environment variables above take precedence where they apply."""
    if _PACKAGE_DIR.parent.name == "shared" and (_SOURCE_ROOT / relative).is_dir():
        return _SOURCE_ROOT / relative
    return BUNDLED_ROOT / relative


def infra_dir() -> Path:
    """The folder holding knative/ (the kustomize base), overlays/ and variants/ that deploy renders."""
    return resource_path("infra")


def pointer_poll_seconds() -> float:
    """How often a predict replica checks whether a model's current pointer moved."""
    return float(os.environ.get("BUCKETML_POLL_SECONDS", str(DEFAULT_POLL_SECONDS)))


def monitor_flush_seconds() -> float:
    """How often a predict replica writes its figures to monitoring/ (BUCKETML_MONITOR_FLUSH_SECONDS)."""
    return _positive_seconds("BUCKETML_MONITOR_FLUSH_SECONDS", DEFAULT_MONITOR_FLUSH_SECONDS)


def monitor_window_seconds() -> float:
    """The length of the tumbling windows drift is measured over (BUCKETML_MONITOR_WINDOW_SECONDS):
    the monitor sees the current window and the previous one."""
    return _positive_seconds("BUCKETML_MONITOR_WINDOW_SECONDS", DEFAULT_MONITOR_WINDOW_SECONDS)


def monitor_seconds() -> float:
    """How often `bucketml dev` runs the monitor (BUCKETML_MONITOR_SECONDS); a cluster's
    PingSource runs it every minute."""
    return _positive_seconds("BUCKETML_MONITOR_SECONDS", DEFAULT_MONITOR_SECONDS)


def _positive_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, got {text!r}")
    return value


def auth_mode() -> str:
    return _auth_mode(os.environ)


def token() -> str | None:
    return _token(os.environ)


def max_request_bytes() -> int:
    """predict: the largest request body it reads (BUCKETML_MAX_REQUEST_BYTES); larger is a 413."""
    return _byte_limit(os.environ, "BUCKETML_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)


def max_event_bytes() -> int:
    """The broker ingress: the largest request (one CloudEvent) it takes (BUCKETML_MAX_EVENT_BYTES)."""
    return _byte_limit(os.environ, "BUCKETML_MAX_EVENT_BYTES", DEFAULT_MAX_EVENT_BYTES)


def platform() -> Platform:
    return Platform.from_env()


def upload_limits() -> dict[str, int]:
    """The upload limits set in the environment (field of `Limits` -> value); ValueError, from
    int(), for one that is not a number. Unset ones keep their defaults."""
    return {field: int(os.environ[name]) for field, name in UPLOAD_LIMIT_VARIABLES.items() if os.environ.get(name)}


# --- validation --------------------------------------------------------------------------------
def _auth_mode(env: Environment) -> str:
    mode = env.get("BUCKETML_AUTH", "").strip().lower() or "auto"
    if mode not in AUTH_MODES:
        raise ConfigError(f"BUCKETML_AUTH={mode!r} is not one of {', '.join(AUTH_MODES)}")
    return mode


def _token(env: Environment) -> str | None:
    value = env.get("BUCKETML_TOKEN", "").strip()
    path = env.get("BUCKETML_TOKEN_FILE", "").strip()
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


def _byte_limit(env: Environment, name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"{name}={text!r} is not a positive number of bytes")
    return int(text)
