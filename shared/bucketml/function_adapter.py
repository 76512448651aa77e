"""Turns an HTTP request carrying a CloudEvent into a call of a library step, and back.

CloudEvent functions sit behind a Broker, which retries anything but a 2xx and treats a
non-CloudEvent body as failure, so the reply is the next event in binary mode or an empty
202 (design.md §2). A step that announces more than one event (train: model.trained, then
model.published) posts the earlier ones to the event sink and replies with the last. Status codes: bad data is a successful reply carrying a rejected/failed
event; a malformed event is 400 (retrying cannot help); a storage fault is 503 (retry).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

from cloudevents.http import CloudEvent

from . import config, events, logs
from .storage import (
    InvalidObjectName,
    NotFound,
    PreconditionFailed,
    Storage,
    StorageError,
    open_storage,
)

log = logging.getLogger("bucketml.function")


def configure_logging() -> None:
    logs.configure()


@functools.lru_cache(maxsize=1)
def storage() -> Storage:
    return open_storage(config.bucket_url())


def _error(status: int, message: str) -> tuple[str, int, dict[str, str]]:
    return json.dumps({"error": message}), status, {"Content-Type": "application/json"}


def handle(request, accepts: str, step: Callable[[Storage, dict[str, Any]], CloudEvent | list[CloudEvent] | None]):
    """Run `step` on the CloudEvent in `request` if it is of type `accepts`."""
    if request.method != "POST":  # e.g. a liveness probe: answer without noise in the log
        return _error(405, f"POST a {accepts} CloudEvent to this function")
    try:
        event = events.parse_request(request.headers, request.get_data())
        if event["type"] != accepts:
            raise events.MalformedEvent(f"this function handles {accepts} events, not {event['type']}")
        reply = step(storage(), events.event_data(event))
        if isinstance(reply, list):
            *earlier, reply = reply or [None]
            for extra in earlier:  # before the reply, so subscribers see them in order
                events.emit(config.event_sink_url(), extra)
    except (events.MalformedEvent, InvalidObjectName) as exc:
        log.warning("refused a malformed event: %s", exc)
        return _error(400, str(exc))
    except (NotFound, PreconditionFailed) as exc:  # a race with another writer: a retry settles it
        log.warning("conflict, asking for a retry: %s", exc)
        return _error(503, str(exc))
    except StorageError as exc:
        log.error("storage unavailable, asking for a retry: %s", exc)
        return _error(503, str(exc))
    except events.SinkUnavailable as exc:  # the retry finds the version made and announces it again
        log.error("%s; asking for a retry", exc)
        return _error(503, str(exc))
    if reply is None:
        return events.empty_response()
    return events.binary_response(reply)
