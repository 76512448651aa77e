"""The local broker: Knative-shaped ingress, routing by the Trigger manifests, durable at-least-once delivery."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import queue
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import click
import requests
from cloudevents.http import CloudEvent
from werkzeug.exceptions import BadRequest, HTTPException, NotFound, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from bucketml import auth
from bucketml import settings
from bucketml import logs
from bucketml.local.broker.store import (
    DeliveryRecord,
    NewEvent,
    Store,
    StoreClosed,
    StoredEvent,
)
from bucketml.local.broker.triggers import ManifestError, Topology, Trigger, load_topology
from bucketml.contracts.events import MODEL_ATTRIBUTE, MalformedEvent, is_json_content_type, parse_request, to_binary_http
from bucketml.timestamps import from_epoch

log = logging.getLogger("bucketml.broker")

MAX_BODY = settings.DEFAULT_MAX_EVENT_BYTES  # BUCKETML_MAX_EVENT_BYTES sets a broker's own
CONNECT_TIMEOUT = 10.0
MAX_LIMIT = 1000
# Knative retries these statuses, every 5xx and connection failures; any other 4xx means the event is unwanted.
RETRYABLE_STATUS = frozenset({404, 408, 409, 429})


class _Request(Request):
    max_content_length = MAX_BODY


class _QuietHandler(WSGIRequestHandler):
    """No access log: it would drown the one line per event and per delivery outcome."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@dataclass(frozen=True)
class _Outcome:
    status: int | None = None
    error: str | None = None
    retryable: bool = False
    reply: NewEvent | None = None


class Broker:
    """Accept CloudEvents over HTTP, store them, and deliver them to the subscribers the Triggers name."""

    def __init__(
        self,
        manifest_dir: str | Path,
        subscribers: Mapping[str, str],
        db_path: str | Path,
        host: str = "127.0.0.1",
        port: int = 8081,
        *,
        workers: int = 8,
        shutdown_grace: float = 5.0,
        access: auth.Policy | None = None,
        max_body: int = MAX_BODY,
    ):
        self.topology: Topology = load_topology(manifest_dir, subscribers)
        # Every route but /healthz needs the token when the policy requires one (docs/http-api.md).
        self._access = access if access is not None and access.required else None
        self._max_body = max_body
        self.store = Store(db_path)
        self._urls = Map(
            [
                Rule("/", methods=["POST"], endpoint="ingress"),
                Rule("/<namespace>/<broker>", methods=["POST"], endpoint="ingress"),
                Rule("/events", methods=["GET"], endpoint="events"),
                Rule("/events/<int:seq>", methods=["GET"], endpoint="event"),
                Rule("/deadletters", methods=["GET"], endpoint="deadletters"),
                Rule("/healthz", methods=["GET"], endpoint="healthz"),
            ]
        )
        try:
            self._server = make_server(host, port, self._app, threaded=True, request_handler=_QuietHandler)
        except BaseException:
            self.store.close()
            raise
        self._workers = workers
        self._grace = shutdown_grace
        self._state_lock = threading.Lock()
        self._serving = False
        self._stopping = threading.Event()
        self._wake = threading.Event()  # set when a delivery may have become due
        self._queue: queue.Queue[tuple[DeliveryRecord, StoredEvent] | None] = queue.Queue()
        self._inflight: set[int] = set()
        self._inflight_lock = threading.Lock()
        self._dispatcher: threading.Thread | None = None
        self._pool: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Broker":
        """Serve in a background thread; returns at once (the socket is already listening)."""
        threading.Thread(target=self.serve_forever, name="broker-http", daemon=True).start()
        return self

    def serve_forever(self) -> None:
        """Deliver and serve HTTP in this thread until shutdown() is called from another one (runs once)."""
        with self._state_lock:
            if self._stopping.is_set() or self._serving:
                return
            self._serving = True
            self._start_delivery()
        log.info("listening on %s, %d trigger(s), database %s", self.url, len(self.topology.triggers), self.store.path)
        self._server.serve_forever(poll_interval=0.1)  # how soon shutdown() takes effect

    def shutdown(self) -> None:
        """Stop accepting, give in-flight deliveries `shutdown_grace` seconds, leave the rest pending, close."""
        with self._state_lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            serving = self._serving
        if serving:
            self._server.shutdown()
        self._server.server_close()
        self._wake.set()
        deadline = time.monotonic() + self._grace
        if self._dispatcher:
            self._dispatcher.join()  # after this no new work is queued
        for _ in self._pool:
            self._queue.put(None)
        for thread in self._pool:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._inflight_lock:
            left = len(self._inflight)
        # Workers still running find the store closed and leave their delivery pending for the next start.
        self.store.close()
        log.info("stopped%s", f"; {left} in-flight deliveries stay pending" if left else "")

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # Ingestion, shared by the HTTP ingress and by subscribers' reply events.

    def _new_event(self, broker: str, headers: Mapping[str, str], body: bytes) -> NewEvent:
        event = parse_request(headers, body)
        attributes = dict(event.get_attributes())
        routes = [(t.name, t.subscriber) for t in self.topology.routes(broker, attributes)]
        return NewEvent(attributes, _data_bytes(event, headers, body), routes)

    def _accepted(self, seq: int, event: NewEvent) -> None:
        triggers = ", ".join(name for name, _ in event.routes) or "no trigger"
        log.info(
            "accepted seq=%d type=%s model=%s for %s",
            seq, event.attributes["type"], event.attributes.get(MODEL_ATTRIBUTE, "-"), triggers,
        )
        self._wake.set()

    # Delivery: one dispatcher hands due deliveries to a pool of workers, so a long one blocks no other.

    def _start_delivery(self) -> None:
        self._dispatcher = threading.Thread(target=self._dispatch, name="broker-dispatch", daemon=True)
        # Daemon workers: one stuck in a 30-minute request must not keep the process alive after shutdown.
        self._pool = [threading.Thread(target=self._work, name=f"broker-worker-{i}", daemon=True) for i in range(self._workers)]
        for thread in (self._dispatcher, *self._pool):
            thread.start()

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before querying, so a wake-up during the query is not lost
            try:
                timeout = self._dispatch_due()
            except StoreClosed:
                return
            except Exception:
                log.exception("dispatcher error; trying again in 1s")
                timeout = 1.0
            self._wake.wait(timeout)

    def _dispatch_due(self) -> float | None:
        """Queue due deliveries for idle workers; return seconds until the next one is due (None: until woken)."""
        with self._inflight_lock:
            busy = set(self._inflight)
        if len(busy) < self._workers:
            for record, event in self.store.due(time.time(), self._workers - len(busy), busy):
                with self._inflight_lock:
                    self._inflight.add(record.id)
                busy.add(record.id)
                self._queue.put((record, event))
        if len(busy) >= self._workers:
            return None  # a worker that finishes wakes us
        next_at = self.store.next_attempt_at(busy)
        return None if next_at is None else max(0.0, next_at - time.time())

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            record, event = item
            try:
                self._deliver(record, event)
            except StoreClosed:
                log.info("pending seq=%d -> %s: the broker stopped during delivery", record.event_seq, record.label)
            except Exception:
                log.exception("could not record delivery seq=%d -> %s", record.event_seq, record.label)
            finally:
                with self._inflight_lock:
                    self._inflight.discard(record.id)
                self._wake.set()

    def _deliver(self, record: DeliveryRecord, event: StoredEvent) -> None:
        seq, name, attempts = record.event_seq, record.label, record.attempts + 1
        trigger_name, to_sink = record.trigger, record.to_dead_letter_sink
        trigger = self.topology.trigger(trigger_name)
        # The current URL, not the stored one: a restart may have moved the subscriber.
        url = (trigger.delivery.dead_letter_sink if to_sink else trigger.subscriber) if trigger else None
        if trigger is None or url is None:
            what = "its dead-letter sink is" if trigger else f"trigger {trigger_name!r} is"
            error = f"{what} no longer in the manifests"
            self.store.mark_dead(record.id, record.subscriber, error)
            log.error("dead seq=%d -> %s: %s", seq, name, error)
            return
        started = time.monotonic()
        try:
            outcome = self._send(trigger, url, self._dead_letter(event, record) if to_sink else event)
        except Exception as exc:  # a broker bug must not turn into a hot loop of instant retries
            log.exception("delivery seq=%d -> %s raised", seq, name)
            outcome = _Outcome(error=f"broker error: {exc!r}", retryable=True)
        elapsed = time.monotonic() - started
        if to_sink and outcome.reply:
            outcome = _Outcome(outcome.status)  # a dead-letter sink's reply goes nowhere, as in Knative

        if outcome.error is None:
            reply_seq = self.store.mark_delivered(record.id, url, outcome.reply)
            reply = f", reply {outcome.reply.attributes['type']} seq={reply_seq}" if outcome.reply else ""
            log.info("delivered seq=%d -> %s (%d%s) in %.2fs", seq, name, outcome.status, reply, elapsed)
            if outcome.reply:
                self._accepted(reply_seq, outcome.reply)
        elif outcome.retryable and attempts <= trigger.delivery.retry:
            delay = trigger.delivery.backoff(attempts)
            self.store.mark_retry(record.id, url, time.time() + delay, outcome.error, outcome.status)
            log.warning("retry seq=%d -> %s attempt %d in %.2fs: %s", seq, name, attempts + 1, delay, outcome.error)
        else:
            sink = None if to_sink else trigger.delivery.dead_letter_sink
            self.store.mark_dead(record.id, url, outcome.error, outcome.status, sink)
            log.error("dead seq=%d -> %s after %d attempt(s): %s%s", seq, name, attempts, outcome.error,
                      f"; sending it to the dead-letter sink {sink}" if sink else "")

    def _dead_letter(self, event: StoredEvent, to_sink: DeliveryRecord) -> StoredEvent:
        """The event as Knative hands it to a dead-letter sink: with where it failed and why."""
        found = self.store.get_event(event.seq)
        failed = next((d for d in (found[1] if found else []) if d.trigger == to_sink.trigger and not d.to_dead_letter_sink),
                      None)
        extensions = {}
        if failed is not None:
            extensions["knativeerrordest"] = failed.subscriber
            if failed.last_status is not None:
                extensions["knativeerrorcode"] = str(failed.last_status)
            if failed.last_error:
                extensions["knativeerrordata"] = base64.b64encode(failed.last_error.encode()[:1024]).decode()
        return dataclasses.replace(event, attributes={**event.attributes, **extensions})

    def _send(self, trigger: Trigger, url: str, event: StoredEvent) -> _Outcome:
        """POST the event in binary content mode and classify the answer the way Knative does."""
        # Attribute headers percent-encoded (the HTTP binding's rule): any Unicode value can travel.
        headers, body = to_binary_http(CloudEvent(event.attributes, event.data or None))
        timeout = trigger.delivery.timeout
        try:
            # requests' read timeout bounds the wait for the reply, which is what a slow function needs.
            response = requests.post(
                url, headers=headers, data=body,
                timeout=(min(CONNECT_TIMEOUT, timeout or CONNECT_TIMEOUT), timeout),
            )
        except requests.RequestException as exc:
            return _Outcome(error=f"{type(exc).__name__}: {exc}", retryable=True)
        status = response.status_code
        if not 200 <= status < 300:
            retryable = status >= 500 or status in RETRYABLE_STATUS
            return _Outcome(status, f"HTTP {status}{_excerpt(response.content)}", retryable)
        if _carries_event(response.headers):
            try:
                return _Outcome(status, reply=self._new_event(trigger.broker, response.headers, response.content))
            except MalformedEvent as exc:
                return _Outcome(status, f"HTTP {status} with an invalid CloudEvent reply: {exc}")
        if response.content:
            kind = response.headers.get("content-type", "no content-type")
            return _Outcome(
                status,
                f"HTTP {status} with a {len(response.content)}-byte {kind} body that is not a CloudEvent"
                " (reply with no body or with a CloudEvent)",
            )
        return _Outcome(status)

    # HTTP

    def _app(self, environ: dict, start_response: Any) -> Any:
        request = _Request(environ)
        request.max_content_length = self._max_body
        if self._access is not None and request.path != "/healthz":
            refusal = self._access.refusal(request.headers.get("Authorization"))
            if refusal is not None:  # before routing or reading the body
                response = _json({"error": refusal.message}, 401, [("WWW-Authenticate", refusal.challenge)])
                return response(environ, start_response)
        try:
            endpoint, args = self._urls.bind_to_environ(environ).match()
            response = getattr(self, f"_on_{endpoint}")(request, **args)
        except HTTPException as exc:
            # Keep Allow/Location headers; answer with a JSON error body.
            headers = [(k, v) for k, v in exc.get_headers(environ) if k.lower() != "content-type"]
            response = _json({"error": exc.description or exc.name}, exc.code or 500, headers)
        except StoreClosed:
            response = _json({"error": "the broker is shutting down"}, 503)
        return response(environ, start_response)

    def _on_ingress(self, request: Request, namespace: str | None = None, broker: str | None = None) -> Response:
        # Locally there is one namespace: the segment only mirrors the cluster's ingress URL shape.
        name = broker or self.topology.default_broker
        if name not in self.topology.brokers:
            raise NotFound(f"no Broker named {name!r} in the manifests")
        try:
            body = request.get_data(cache=False)  # stops reading past the limit
        except RequestEntityTooLarge:
            raise RequestEntityTooLarge(
                f"the request is over {self._max_body} bytes, the broker's limit for one event (BUCKETML_MAX_EVENT_BYTES)"
            ) from None
        try:
            event = self._new_event(name, request.headers, body)
        except MalformedEvent as exc:
            raise BadRequest(str(exc)) from exc
        seq = self.store.add_event(event)  # committed before the sender hears 202
        self._accepted(seq, event)
        return _json({"seq": seq}, 202)

    def _on_events(self, request: Request) -> Response:
        order = request.args.get("order", "asc")
        if order not in ("asc", "desc"):
            raise BadRequest(f"order must be asc (oldest first, the default) or desc (newest first), got {order!r}")
        events = self.store.list_events(
            after=_int_arg(request, "after"),
            before=_int_arg(request, "before"),
            type_=request.args.get("type"),
            model=request.args.get("model"),
            limit=min(_int_arg(request, "limit", 100), MAX_LIMIT),
            newest_first=order == "desc",
        )
        return _json({"events": [_event_json(e) for e in events]})

    def _on_event(self, request: Request, seq: int) -> Response:
        found = self.store.get_event(seq)
        if found is None:
            raise NotFound(f"no event with seq {seq}")
        event, deliveries = found
        return _json({**_event_json(event), "attributes": event.attributes, "deliveries": [_delivery_json(d) for d in deliveries]})

    def _on_deadletters(self, request: Request) -> Response:
        dead = self.store.dead_letters(min(_int_arg(request, "limit", 100), MAX_LIMIT))
        return _json({"deadletters": [{**_delivery_json(d), "event": _event_json(e)} for d, e in dead]})

    def _on_healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})


def _data_bytes(event: CloudEvent, headers: Mapping[str, str], body: bytes) -> bytes:
    """The event's data exactly as it travels in binary content mode."""
    if headers.get("ce-specversion"):  # binary mode: the body is the data
        return body
    data = event.get_data()
    if data is None:
        return b""
    if isinstance(data, (bytes, bytearray)):  # data_base64
        return bytes(data)
    if isinstance(data, str) and not is_json_content_type(event.get("datacontenttype")):
        return data.encode()
    return json.dumps(data).encode()


def _carries_event(headers: Mapping[str, str]) -> bool:
    mimetype = headers.get("content-type", "").split(";")[0].strip().lower()
    return bool(headers.get("ce-specversion")) or mimetype == "application/cloudevents+json"


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip()
    return f": {text[:limit]}{'...' if len(text) > limit else ''}" if text else ""


def _event_json(event: StoredEvent) -> dict:
    attrs = event.attributes
    out = {
        "seq": event.seq,
        "id": attrs["id"],
        "type": attrs["type"],
        "source": attrs["source"],
        "subject": attrs.get("subject"),
        "time": attrs.get("time"),
        "model": attrs.get(MODEL_ATTRIBUTE),
        "received_at": event.received_at,
    }
    data = event.data
    if not data:
        out["data"] = None
    elif not _is_utf8(data):
        out["data_base64"] = base64.b64encode(data).decode()
    elif is_json_content_type(attrs.get("datacontenttype")):
        try:
            out["data"] = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read: shown as text
            out["data"] = data.decode()
    else:
        out["data"] = data.decode()
    return out


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _delivery_json(record: DeliveryRecord) -> dict:
    next_at = record.next_attempt_at
    return {
        "event_seq": record.event_seq,
        "trigger": record.label,
        "subscriber": record.subscriber,
        "status": record.status,
        "attempts": record.attempts,
        "next_attempt_at": from_epoch(next_at) if record.status == "pending" and next_at is not None else None,
        "last_error": record.last_error,
        "updated_at": record.updated_at,
    }


def _int_arg(request: Request, name: str, default: int | None = None) -> int | None:
    value = request.args.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"query parameter {name!r} must be a non-negative integer")
    return int(value)


def _json(payload: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(json.dumps(payload), status, headers, mimetype="application/json")


def _subscribers(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """--subscriber SERVICE=URL, repeatable -> {Service name: base URL}."""
    found = {}
    for text in values:
        name, sep, url = text.partition("=")
        if not (sep and name and url.startswith(("http://", "https://"))):
            raise click.BadParameter(f"expected SERVICE=http://HOST:PORT, got {text!r}", ctx, param)
        found[name] = url
    return found


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--manifests", required=True, help="folder of Knative Broker/Trigger manifests")
@click.option("--db", required=True, help="SQLite file for the event log and delivery queue")
@click.option("--host", default=settings.DEFAULT_HOST, show_default=True)
@click.option("--port", type=int, default=settings.DEFAULT_BROKER_PORT, show_default=True)
@click.option("--subscriber", "subscribers", multiple=True, callback=_subscribers, metavar="SERVICE=URL",
              help="base URL of a Knative Service a Trigger names (repeatable)")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(manifests: str, db: str, host: str, port: int, subscribers: dict[str, str], log_level: str) -> None:
    """Run the local bucketml event broker (`python -m bucketml.local.broker`). Exit status 1
    when it cannot start, 2 for a usage error."""
    logs.configure(log_level)
    try:
        access = auth.server_policy(host, "the broker")  # before binding: refuse to listen unprotected
        broker = Broker(manifests, subscribers, db, host, port, access=access, max_body=settings.max_event_bytes())
    except (ManifestError, OSError, sqlite3.Error, settings.ConfigError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    broker.start()
    stop.wait()
    broker.shutdown()
