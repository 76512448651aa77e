"""Turns an HTTP request carrying a CloudEvent into a call of a library step, and back.

CloudEvent functions sit behind a Broker, which retries anything but a 2xx and treats a
non-CloudEvent body as failure, so the reply is the next event in binary mode or an empty
202 (docs/architecture.md, "Why CloudEvent functions are HTTP functions"). A step that announces
more than one event (train: model.trained, then model.published) posts the earlier ones to the
event sink and replies with the last. Status codes: bad data is a successful reply carrying a
rejected/failed event; a malformed event is 400 (retrying cannot help); a storage fault is 503
(retry).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

from cloudevents.http import CloudEvent

from bucketml import settings
from bucketml.contracts import events
from bucketml import logs
from bucketml.storage import (
    InvalidObjectName,
    NotFound,
    PreconditionFailed,
    Storage,
    StorageError,
    open_storage,
)

log = logging.getLogger("bucketml.function")

MAX_EVENT_BYTES = settings.max_event_bytes()  # one CloudEvent: the broker ingress's limit (BUCKETML_MAX_EVENT_BYTES)


def configure_logging() -> None:
    logs.configure()


@functools.lru_cache(maxsize=1)
def storage() -> Storage:
    return open_storage(settings.bucket_url())


def _error(status: int, message: str) -> tuple[str, int, dict[str, str]]:
    return json.dumps({"error": message}), status, {"Content-Type": "application/json"}


def handle(request, accepts: str, step: Callable[[Storage, dict[str, Any]], CloudEvent | list[CloudEvent] | None]):
    """Run `step` on the data of the CloudEvent in `request` if it is of type `accepts`."""

    def run(event: CloudEvent):
        if event["type"] != accepts:
            raise events.MalformedEvent(f"this function handles {accepts} events, not {event['type']}")
        return step(storage(), events.event_data(event))

    return _serve(request, f"a {accepts}", run)


def handle_any(request, step: Callable[[Storage, CloudEvent], CloudEvent | None], quiet: bool = False):
    """Run `step` on the whole CloudEvent in `request`, whatever its type (the dead-letter sink,
    the monitor). `quiet`: no log line for an event acknowledged without a reply (a ping a minute
    would fill the log; the step logs what it did)."""
    return _serve(request, "a", lambda event: step(storage(), event), quiet)


def _serve(request, what: str, run: Callable[[CloudEvent], CloudEvent | list[CloudEvent] | None], quiet: bool = False):
    if request.method != "POST":  # e.g. a liveness probe: answer without noise in the log
        return _error(405, f"POST {what} CloudEvent to this function")
    event = None
    try:
        # An event is small: a bigger body is refused unparsed (functions-framework drains it after).
        if (request.content_length or 0) > MAX_EVENT_BYTES or len(body := request.get_data()) > MAX_EVENT_BYTES:
            log.warning("refused a request body over %d bytes", MAX_EVENT_BYTES)
            return _error(413, f"request body over {MAX_EVENT_BYTES} bytes: a CloudEvent for this function is far smaller")
        event = events.parse_request(request.headers, body)
        reply = run(event)
        if isinstance(reply, list):
            *earlier, reply = reply or [None]
            for extra in earlier:  # before the reply, so subscribers see them in order
                events.emit(settings.event_sink_url(), extra)
    except (events.MalformedEvent, InvalidObjectName) as exc:
        log.warning("refused %s: %s", _which(event), exc)
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
    if reply is None:  # the step logged why; this line ties it to the delivery
        if not quiet:
            log.info("acknowledged %s without a reply event", _which(event))
        return events.empty_response()
    if reply["type"] in (events.DATASET_REJECTED, events.TRAINING_FAILED, events.BATCH_FAILED):
        # A business outcome, not an error: one line that ties the outcome to the event that caused it.
        data = reply.get_data() if isinstance(reply.get_data(), dict) else {}
        log.warning("%s ended in %s (%s): %s", _which(event), reply["type"], data.get("reason"), data.get("message"))
    return events.binary_response(reply)


def _which(event: CloudEvent | None) -> str:
    """An event as a log line names it: its id finds it in the broker's or Eventarc's records."""
    if event is None:
        return "a malformed event"
    # repr: the sender chose these strings, and a newline in them must not forge a log line.
    return f"event {event['id']!r} ({event['type']!r}, subject {event.get('subject')!r})"
