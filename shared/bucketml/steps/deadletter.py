"""The dead-letter store: events no subscriber could take, kept in the bucket under deadletters/.

Both engines fill it the same way: the Broker's `delivery.deadLetterSink` names the `deadletter`
function, which Knative calls with the undeliverable event plus its `knativeerror*` extensions
and the local broker calls the same way (it reads the same manifest). `bucketml events dead`
lists and shows the records, `bucketml events replay ID` sends the event to the broker again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from cloudevents.http import CloudEvent

from bucketml.contracts import events
from bucketml.storage import NotFound, PreconditionFailed, Storage

log = logging.getLogger("bucketml.deadletter")

PREFIX = "deadletters/"
# Knative adds these to an event it sends to a dead-letter sink; a replay must not carry them.
ERROR_DESTINATION, ERROR_CODE, ERROR_DATA = "knativeerrordest", "knativeerrorcode", "knativeerrordata"
ERROR_EXTENSIONS = (ERROR_DESTINATION, ERROR_CODE, ERROR_DATA)
# A concurrent writer of the same record (a duplicate delivery) makes a compare-and-swap lose; retry.
CAS_ATTEMPTS = 5


class DeadLetterNotFound(LookupError):
    """No record with that id (the message says how to list them)."""


@dataclass(frozen=True)
class DeadLetter:
    id: str
    record: dict[str, Any]

    @property
    def attributes(self) -> dict[str, Any]:
        return self.record["event"]["attributes"]

    def event(self) -> CloudEvent:
        """The original event, as it was first sent (without Knative's error extensions)."""
        stored = self.record["event"]
        if "data_base64" in stored:
            data: Any = base64.b64decode(stored["data_base64"])
        else:
            data = stored.get("data")
        return CloudEvent(dict(stored["attributes"]), data)


def record_id(attributes: dict[str, Any]) -> str:
    """One record per (event, failed destination): a duplicate dead-letter delivery updates it."""
    key = "\n".join(str(attributes.get(name, "")) for name in ("source", "id", ERROR_DESTINATION))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _object_name(id_: str) -> str:
    return f"{PREFIX}{id_}.json"


def store(storage: Storage, event: CloudEvent) -> DeadLetter:
    """Keep `event` (as a dead-letter sink receives it); idempotent per event and destination."""
    attributes = dict(event.get_attributes())
    id_ = record_id(attributes)
    name = _object_name(id_)
    now = events.now_rfc3339()
    error = {
        "destination": attributes.get(ERROR_DESTINATION),
        "code": attributes.get(ERROR_CODE),
        "message": _decoded(attributes.get(ERROR_DATA)),
    }
    original = {k: v for k, v in attributes.items() if k not in ERROR_EXTENSIONS}
    for _ in range(CAS_ATTEMPTS):
        info, current = None, None
        try:
            info = storage.stat(name)
            current = json.loads(storage.read(name, generation=info.generation))
        except NotFound:
            info = None
        if current is None:
            record = {"id": id_, "first_dead_at": now, "last_dead_at": now, "times": 1, "error": error,
                      "event": {"attributes": original, **_data_field(event)}, "replays": []}
        else:  # the same event died again (after a replay, or a duplicate delivery)
            record = {**current, "last_dead_at": now, "times": current.get("times", 1) + 1, "error": error}
        try:
            storage.write(name, json.dumps(record, indent=2).encode(), content_type="application/json",
                          if_generation_match=info.generation if info else 0)
            return DeadLetter(id_, record)
        except PreconditionFailed:
            continue
    raise PreconditionFailed(f"{name} kept changing while it was being updated; the delivery will be retried")


def keep(storage: Storage, event: CloudEvent) -> None:
    """The dead-letter sink's step: store, log with the event id, no reply event."""
    letter = store(storage, event)
    error = letter.record["error"]
    log.warning("dead letter %s: %s %s (event id %s) could not be delivered to %s: %s", letter.id, event["type"],
                event.get("subject") or "", event["id"], error["destination"] or "?", error["message"] or "no reason given")


def listing(storage: Storage) -> list[DeadLetter]:
    """Every record, oldest death first."""
    found = []
    for info in storage.list(PREFIX):
        if info.name.endswith(".json"):
            try:
                found.append(DeadLetter(info.name[len(PREFIX):-len(".json")], json.loads(storage.read(info.name))))
            except (NotFound, ValueError):
                continue  # removed meanwhile, or not ours
    return sorted(found, key=lambda d: (d.record.get("first_dead_at", ""), d.id))


def get(storage: Storage, id_: str) -> DeadLetter:
    if not (len(id_) == 16 and all(c in "0123456789abcdef" for c in id_)):
        raise DeadLetterNotFound(f"{id_!r} is not a dead-letter id (16 hex digits); list them with `bucketml events dead`")
    try:
        return DeadLetter(id_, json.loads(storage.read(_object_name(id_))))
    except NotFound:
        raise DeadLetterNotFound(f"no dead letter {id_}; list them with `bucketml events dead`") from None


def replay(storage: Storage, id_: str, broker_url: str) -> DeadLetter:
    """Send the event to the broker again (it routes it by the Triggers, as on first arrival;
    every handler is idempotent) and note the replay in the record."""
    letter = get(storage, id_)
    events.emit(broker_url, letter.event())  # raises SinkUnavailable: nothing is noted then
    name = _object_name(id_)
    for _ in range(CAS_ATTEMPTS):
        info = storage.stat(name)
        record = json.loads(storage.read(name, generation=info.generation))
        record["replays"] = [*record.get("replays", []), {"at": events.now_rfc3339(), "broker": broker_url}]
        try:
            storage.write(name, json.dumps(record, indent=2).encode(), content_type="application/json",
                          if_generation_match=info.generation)
            return DeadLetter(id_, record)
        except PreconditionFailed:
            continue
    return letter


def _data_field(event: CloudEvent) -> dict[str, Any]:
    data = event.get_data()
    if data is None:
        return {"data": None}
    if isinstance(data, (bytes, bytearray)):
        try:
            if events.is_json_content_type(event.get("datacontenttype")):
                return {"data": json.loads(data)}
            return {"data_base64": base64.b64encode(data).decode()}
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read: kept as bytes
            return {"data_base64": base64.b64encode(data).decode()}
    return {"data": data}


def _decoded(value: Any) -> str | None:
    """knativeerrordata is the failed answer's body, base64-encoded."""
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return str(value)


def summaries(storage: Storage) -> Iterator[dict[str, Any]]:
    """One line's worth per record, for listings."""
    for letter in listing(storage):
        attrs = letter.attributes
        yield {"id": letter.id, "first_dead_at": letter.record.get("first_dead_at"), "times": letter.record.get("times", 1),
               "type": attrs.get("type"), "subject": attrs.get("subject"), "destination": letter.record["error"]["destination"],
               "code": letter.record["error"]["code"], "replays": len(letter.record.get("replays", []))}
