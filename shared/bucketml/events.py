"""The event catalog and the CloudEvents plumbing shared by functions, watcher and CLI.

Type names are a public contract (docs/architecture.md lists them with their data).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from typing import Any, Mapping

from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

OBJECT_FINALIZED = "google.cloud.storage.object.v1.finalized"
DATASET_PREPARED = "bucketml.dataset.prepared.v1"
DATASET_REJECTED = "bucketml.dataset.rejected.v1"
MODEL_TRAINED = "bucketml.model.trained.v1"
MODEL_PUBLISHED = "bucketml.model.published.v1"
TRAINING_FAILED = "bucketml.training.failed.v1"

PLATFORM_TYPES = (DATASET_PREPARED, DATASET_REJECTED, MODEL_TRAINED, MODEL_PUBLISHED, TRAINING_FAILED)
# The outcomes that end the story of one upload.
UPLOAD_OUTCOMES = (MODEL_PUBLISHED, MODEL_TRAINED, DATASET_REJECTED, TRAINING_FAILED)

MODEL_ATTRIBUTE = "bucketmlmodel"


class MalformedEvent(ValueError):
    """The request is not a CloudEvent we can act on (answered with 400)."""


class SinkUnavailable(RuntimeError):
    """An event could not be handed to the event sink (answered with 503, so it is retried)."""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def platform_event(type_: str, function: str, model: str, data: Mapping[str, Any], *, id_: str | None = None) -> CloudEvent:
    """A bucketml event: source names the function, subject and extension name the model."""
    attributes = {
        "type": type_,
        "source": f"/bucketml/{function}",
        "subject": model,
        "id": id_ or str(uuid.uuid4()),
        "time": now_rfc3339(),
        "datacontenttype": "application/json",
        MODEL_ATTRIBUTE: model,
    }
    return CloudEvent(attributes, dict(data))


def finalized_event_id(name: str, generation: int | str) -> str:
    """A stable id per (object, generation): a re-announcement of the same upload is recognisable
    (the local watcher and the GCS source adapter give the same id)."""
    return hashlib.sha1(f"{name}#{generation}".encode()).hexdigest()[:20]


def finalized_event(bucket: str, object_data: Mapping[str, Any], *, id_: str | None = None) -> CloudEvent:
    """The event GCS (through Eventarc or a Knative source) sends when an object is written."""
    attributes = {
        "type": OBJECT_FINALIZED,
        "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "subject": f"objects/{object_data['name']}",
        "id": id_ or str(uuid.uuid4()),
        "time": object_data.get("updated") or now_rfc3339(),
        "datacontenttype": "application/json",
    }
    return CloudEvent(attributes, dict(object_data))


def parse_request(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """Parse a binary or structured CloudEvent; raise MalformedEvent with a reason."""
    try:
        event = from_http(dict(headers), body)
    except Exception as exc:  # the SDK raises several unrelated types for bad input
        raise MalformedEvent(f"not a valid CloudEvent: {exc}") from exc
    for attr in ("type", "source", "id"):
        if not event.get(attr):
            raise MalformedEvent(f"CloudEvent attribute '{attr}' is missing")
    return event


def event_data(event: CloudEvent) -> dict:
    data = event.data
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise MalformedEvent(f"event data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedEvent("event data must be a JSON object")
    return data


def binary_response(event: CloudEvent, status: int = 200) -> tuple[bytes, int, dict[str, str]]:
    """A Flask/functions-framework reply carrying `event` in binary content mode."""
    headers, body = to_binary(event)
    return body, status, dict(headers)


def post(url: str, event: CloudEvent, session=None, timeout: float = 10.0):
    """Send `event` to a broker ingress (or any CloudEvents sink) in binary mode; the response."""
    import requests  # here, not at import: only the CLI and train's extra events need it

    headers, body = to_binary(event)
    return (session or requests).post(url, data=body, headers=dict(headers), timeout=timeout)


def empty_response() -> tuple[str, int]:
    """Acknowledge without a reply event (a Knative Broker accepts 202 with no body)."""
    return "", 202


def emit(url: str, event: CloudEvent) -> None:
    """Hand `event` to the sink at `url` or raise SinkUnavailable (the caller's delivery is then retried)."""
    import requests

    try:
        response = post(url, event)
    except requests.RequestException as exc:
        raise SinkUnavailable(f"the event sink {url} is unreachable: {exc}") from exc
    if response.status_code >= 300:
        raise SinkUnavailable(f"the event sink {url} refused {event['type']}: HTTP {response.status_code} {response.text[:200]}")
