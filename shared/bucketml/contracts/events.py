"""The event catalog and the CloudEvents plumbing shared by functions, watcher and CLI.

Type names are a public contract (docs/architecture.md lists them with their data).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import uuid
from typing import Any, Mapping
from urllib.parse import quote, unquote

from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from bucketml import timestamps

OBJECT_FINALIZED = "google.cloud.storage.object.v1.finalized"
DATASET_PREPARED = "bucketml.dataset.prepared.v1"
DATASET_REJECTED = "bucketml.dataset.rejected.v1"
MODEL_TRAINED = "bucketml.model.trained.v1"
MODEL_PUBLISHED = "bucketml.model.published.v1"
TRAINING_FAILED = "bucketml.training.failed.v1"
ROLLOUT_STARTED = "bucketml.rollout.started.v1"
ROLLOUT_PROMOTED = "bucketml.rollout.promoted.v1"
ROLLOUT_ROLLED_BACK = "bucketml.rollout.rolled_back.v1"
MODEL_DRIFT = "bucketml.model.drift.v1"
PING = "dev.knative.sources.ping"  # Knative's PingSource: what runs the monitor
BATCH_COMPLETED = "bucketml.batch.completed.v1"
BATCH_FAILED = "bucketml.batch.failed.v1"

PLATFORM_TYPES = (DATASET_PREPARED, DATASET_REJECTED, MODEL_TRAINED, MODEL_PUBLISHED, TRAINING_FAILED,
                  ROLLOUT_STARTED, ROLLOUT_PROMOTED, ROLLOUT_ROLLED_BACK, MODEL_DRIFT, BATCH_COMPLETED, BATCH_FAILED)
# The outcomes that end the story of one upload.
UPLOAD_OUTCOMES = (MODEL_PUBLISHED, MODEL_TRAINED, DATASET_REJECTED, TRAINING_FAILED)
# The outcomes of one file scored under batch/.
BATCH_OUTCOMES = (BATCH_COMPLETED, BATCH_FAILED)

MODEL_ATTRIBUTE = "bucketmlmodel"


class MalformedEvent(ValueError):
    """The request is not a CloudEvent we can act on (answered with 400)."""


class SinkUnavailable(RuntimeError):
    """An event could not be handed to the event sink (answered with 503, so it is retried)."""


def now_rfc3339() -> str:
    """An event's `time`: microseconds, so events made in the same millisecond still sort."""
    return timestamps.utc_now("microseconds")


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


SPEC_VERSION = "1.0"
REQUIRED_ATTRIBUTES = ("id", "source", "type")
OPTIONAL_STRING_ATTRIBUTES = ("datacontenttype", "dataschema", "subject", "time")
ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]+$")  # CloudEvents 1.0: lower-case ASCII letters and digits
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
HOW_TO_SEND = (
    "send CloudEvents 1.0 in binary mode (headers ce-specversion, ce-id, ce-source, ce-type; the body is the data) "
    "or in structured mode (Content-Type: application/cloudevents+json; a JSON object with specversion, id, source, type)"
)


def parse_request(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """Parse a binary or structured CloudEvent 1.0; raise MalformedEvent naming what is wrong."""
    lowered = {str(k).lower(): v for k, v in dict(headers).items()}
    if "ce-specversion" in lowered:  # binary mode: name the missing headers (the SDK's message would not)
        missing = [f"ce-{attr}" for attr in REQUIRED_ATTRIBUTES if not lowered.get(f"ce-{attr}")]
        if missing:
            raise MalformedEvent(f"binary-mode CloudEvent without the header(s) {', '.join(missing)}: {HOW_TO_SEND}")
        headers = {k: _percent_decoded(k, v) if k.startswith("ce-") else v for k, v in lowered.items()}
    try:
        event = from_http(dict(headers), body, data_unmarshaller=_as_sent)
    except Exception as exc:  # the SDK raises several unrelated types for bad input
        raise MalformedEvent(f"not a valid CloudEvent ({_shorten(exc)}): {HOW_TO_SEND}") from exc
    check_attributes(event.get_attributes())
    if "ce-specversion" not in lowered and b'"data_base64"' in body:  # structured with binary data: the SDK is lax
        _check_data_base64(body)
    return event


def _as_sent(data: bytes | str | None) -> Any:
    """The data as it came. The SDK hands the unmarshaller a binary-mode body (bytes, kept as sent:
    reading it is the recipient's business, and event_data reads JSON) or the JSON text of a
    structured event's 'data' member (str, which it wrote from the parsed value: read back). Its
    default would parse any body that looks like JSON, whatever the content type, and fail the
    whole event on data nested too deep."""
    if isinstance(data, str):
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            return data
    return data


def _check_data_base64(body: bytes) -> None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return
    if not isinstance(document, dict) or "data_base64" not in document:
        return
    if "data" in document:
        raise MalformedEvent("a structured CloudEvent has either 'data' or 'data_base64', not both")
    try:
        base64.b64decode(document["data_base64"], validate=True)
    except (ValueError, TypeError):
        raise MalformedEvent("CloudEvent 'data_base64' is not base64 text") from None


def check_attributes(attributes: Mapping[str, Any]) -> None:
    """The context attributes of a CloudEvent 1.0, by the spec's type rules (as a Knative Broker's
    ingress checks them); MalformedEvent names the first that breaks one."""
    version = attributes.get("specversion")
    if version != SPEC_VERSION:
        raise MalformedEvent(f"CloudEvents specversion {_shorten(version)} is not supported: send specversion {SPEC_VERSION}")
    for name in REQUIRED_ATTRIBUTES:
        value = attributes.get(name)
        if value is None or value == "":
            raise MalformedEvent(f"CloudEvent attribute '{name}' is missing")
        if not isinstance(value, str):
            raise MalformedEvent(f"CloudEvent attribute '{name}' must be a string, got {type(value).__name__} {_shorten(value)}")
    for name, value in attributes.items():
        if not isinstance(name, str) or not ATTRIBUTE_NAME.fullmatch(name):
            raise MalformedEvent(
                f"CloudEvent attribute name {_shorten(name)} is not valid: attribute names are lower-case letters a-z and digits"
            )
        if name in OPTIONAL_STRING_ATTRIBUTES and value is not None and not isinstance(value, str):
            raise MalformedEvent(f"CloudEvent attribute '{name}' must be a string, got {type(value).__name__} {_shorten(value)}")
        if isinstance(value, str) and not _is_cloudevents_string(value):
            raise MalformedEvent(
                f"CloudEvent attribute '{name}' has a control character or a lone surrogate, "
                f"which CloudEvents strings may not hold: {_shorten(value)}"
            )
        if name == "time" and value is not None and not _is_timestamp(value):
            raise MalformedEvent(
                f"CloudEvent attribute 'time' must be an RFC 3339 timestamp such as 2024-05-01T10:30:00Z, got {_shorten(value)}"
            )
        if value is not None and not isinstance(value, (str, bool, int)):  # extensions: string, boolean, integer
            raise MalformedEvent(
                f"CloudEvent attribute '{name}' must be a string, a boolean or an integer, got {type(value).__name__}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**31) <= value < 2**31:
            raise MalformedEvent(f"CloudEvent attribute '{name}' is an integer beyond 32 bits: {_shorten(value)}")


def _is_cloudevents_string(value: str) -> bool:
    if any(ord(c) < 32 or 127 <= ord(c) <= 159 for c in value):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _percent_decoded(header: str, value: str) -> str:
    """A binary-mode attribute header's value: the HTTP binding percent-encodes what HTTP headers
    cannot carry (non-ASCII as UTF-8 bytes, and '%' itself)."""
    if "%" not in value:
        return value
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise MalformedEvent(f"header {header} is not percent-encoded UTF-8: {_shorten(value)}") from None


def _percent_encoded(value: Any) -> str:
    """What to_binary leaves out (CloudEvents HTTP binding 3.1.3.2): '%' and everything outside
    printable ASCII percent-encoded as UTF-8, so that any attribute value can travel as a header;
    booleans and integers in their canonical string form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "".join(c if " " <= c <= "~" and c != "%" else quote(c, safe="") for c in str(value))


def to_binary_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of `event` in binary content mode, attribute headers percent-encoded."""
    headers, body = to_binary(event)
    return {k: _percent_encoded(v) if k.lower().startswith("ce-") else v for k, v in headers.items()}, body


def _is_timestamp(value: str) -> bool:
    if not RFC3339.fullmatch(value):
        return False
    try:
        datetime.datetime.fromisoformat(value.upper())  # Python 3.11 reads the Z
    except ValueError:  # a 13th month, a 25th hour
        return False
    return True


def _shorten(value: Any, limit: int = 200) -> str:
    """repr() of a value from a request, cut so that an error message never echoes a whole body."""
    text = str(value) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_json_content_type(content_type: str | None) -> bool:
    """Whether a datacontenttype (or Content-Type) names JSON; none at all means JSON."""
    if not content_type:
        return True  # no datacontenttype: JSON, as the CloudEvents JSON format implies
    mimetype = content_type.split(";")[0].strip().lower()
    return mimetype in ("application/json", "text/json") or mimetype.endswith("+json")


def event_data(event: CloudEvent) -> dict:
    """The event's data as a JSON object; MalformedEvent if it is something else."""
    content_type = event.get("datacontenttype")
    if not is_json_content_type(content_type):
        raise MalformedEvent(f"event data must be JSON (datacontenttype application/json), not {_shorten(content_type)}")
    data = event.data
    if isinstance(data, bytes):  # binary mode
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise MalformedEvent(f"event data is not JSON: {_shorten(exc)}") from exc
    elif isinstance(data, str):  # structured mode: an object sent as JSON text inside the JSON, or a mere string
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            pass
    if not isinstance(data, dict):
        raise MalformedEvent(f"event data must be a JSON object, got {type(data).__name__}")
    return data


def binary_response(event: CloudEvent, status: int = 200) -> tuple[bytes, int, dict[str, str]]:
    """A Flask/functions-framework reply carrying `event` in binary content mode."""
    headers, body = to_binary_http(event)
    return body, status, dict(headers)


def post(url: str, event: CloudEvent, session=None, timeout: float = 10.0):
    """Send `event` to a broker ingress (or any CloudEvents sink) in binary mode; the response.
    With a token set (BUCKETML_TOKEN or BUCKETML_TOKEN_FILE) the request carries it as a bearer
    token, which a token-protected broker requires."""
    import requests  # here, not at import: only the CLI and train's extra events need it

    from bucketml.auth import client_headers

    headers, body = to_binary_http(event)
    return (session or requests).post(url, data=body, headers={**headers, **client_headers()}, timeout=timeout)


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
