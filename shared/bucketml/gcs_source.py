"""The GCS event source for any Kubernetes cluster: Pub/Sub bucket notifications -> the Broker.

Without Eventarc, a bucket's notifications go to a Pub/Sub topic
(`gcloud storage buckets notifications create gs://B --topic=T --event-types=OBJECT_FINALIZE
--payload-format=json`). This adapter pulls them from a subscription of that topic and posts each
one to the sink (K_SINK, injected by a Knative SinkBinding or ContainerSource) as the same
`google.cloud.storage.object.v1.finalized` CloudEvent the local watcher sends
(`bucketml.events.finalized_event`), in binary content mode.

A message is acknowledged only after the sink answered 2xx; any other outcome nacks it, so Pub/Sub
redelivers it. Killing the adapter loses nothing: what it had not acknowledged comes back.
Delivery is at least once; the event id is stable per (object, generation), as the watcher's is,
so a duplicate is recognisable. Other notification types are acknowledged and logged.

    python -m bucketml.gcs_source --project P --subscription S --sink URL

PUBSUB_EMULATOR_HOST points the client at the Pub/Sub emulator.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import signal
import threading
from typing import Any, Mapping

import requests

from . import events, logs
from .storage.base import rfc3339

log = logging.getLogger("bucketml.gcs_source")

FINALIZE = "OBJECT_FINALIZE"
SINK_TIMEOUT = 30.0  # seconds for the sink to accept one event
MAX_IN_FLIGHT = 16  # messages leased and being posted at once


def event_id(name: str, generation: int | str) -> str:
    """The id the local watcher gives the same (object, generation)."""
    return hashlib.sha1(f"{name}#{generation}".encode()).hexdigest()[:20]


def _timestamp(value: str | None) -> str | None:
    """GCS's form, millisecond precision (2024-05-01T10:00:00.123Z), whatever the notification used."""
    if not value:
        return value
    try:
        return rfc3339(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return value


def object_data(attributes: Mapping[str, str], payload: Mapping[str, Any]) -> dict:
    """StorageObjectData (as `ObjectInfo.event_data` builds it) from a JSON_API_V1 notification:
    the object resource in the message data, the bucket, name and generation in its attributes."""
    bucket = attributes.get("bucketId") or payload.get("bucket")
    name = attributes.get("objectId") or payload.get("name")
    generation = attributes.get("objectGeneration") or payload.get("generation")
    if not bucket or not name or not generation:
        raise ValueError("the notification names no bucketId, objectId and objectGeneration")
    data = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{generation}",
        "bucket": bucket,
        "name": name,
        "generation": str(generation),
        # A finalize creates a new generation, whose metageneration starts at 1.
        "metageneration": str(payload.get("metageneration") or 1),
        "contentType": payload.get("contentType"),
        "size": str(payload.get("size") or 0),
        "md5Hash": payload.get("md5Hash"),
        "timeCreated": _timestamp(payload.get("timeCreated")),
        "updated": _timestamp(payload.get("updated")),
        "storageClass": payload.get("storageClass") or "STANDARD",
    }
    if payload.get("metadata"):
        data["metadata"] = {str(k): str(v) for k, v in payload["metadata"].items()}
    return data


def to_cloud_event(attributes: Mapping[str, str], data: bytes):
    """The finalized CloudEvent for one notification, or None for another event type.
    Raises ValueError for a finalize notification it cannot read."""
    if attributes.get("eventType") != FINALIZE:
        return None
    try:
        payload = json.loads(data or b"{}")
    except ValueError as exc:
        raise ValueError(f"the notification data is not JSON (payload format must be JSON_API_V1): {exc}") from exc
    if not isinstance(payload, dict):
        raise ValueError("the notification data is not a JSON object")
    obj = object_data(attributes, payload)
    return events.finalized_event(obj["bucket"], obj, id_=event_id(obj["name"], obj["generation"]))


class Forwarder:
    """The Pub/Sub callback: one message -> one POST to the sink -> ack or nack."""

    def __init__(self, sink: str, timeout: float = SINK_TIMEOUT):
        self.sink = sink
        self.timeout = timeout
        self._local = threading.local()  # one requests.Session per callback thread

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def __call__(self, message) -> None:
        attributes = dict(message.attributes)
        what = f"{attributes.get('bucketId')}/{attributes.get('objectId')}#{attributes.get('objectGeneration')}"
        try:
            event = to_cloud_event(attributes, message.data)
        except ValueError as exc:
            # A retry cannot fix it; acknowledged so it does not loop (a dead-letter topic on the
            # subscription is the place for such messages if they must be kept).
            log.error("dropped unreadable notification %s (message %s): %s", what, message.message_id, exc)
            message.ack()
            return
        if event is None:
            log.info("ignored %s for %s", attributes.get("eventType"), what)
            message.ack()
            return
        try:
            response = events.post(self.sink, event, self._session(), timeout=self.timeout)
        except requests.RequestException as exc:
            log.warning("sink unreachable, %s will be redelivered: %s", what, exc)
            message.nack()
            return
        if not 200 <= response.status_code < 300:
            log.warning("sink refused %s (HTTP %s), it will be redelivered: %s", what, response.status_code, response.text[:200])
            message.nack()
            return
        message.ack()
        log.info("finalized %s sent as %s", what, event["id"])


def run(project: str, subscription: str, sink: str, max_in_flight: int = MAX_IN_FLIGHT) -> None:
    """Pull until SIGTERM/SIGINT or a fatal subscriber error."""
    from google.cloud import pubsub_v1  # imported here: a second to import, only this process needs it

    subscriber = pubsub_v1.SubscriberClient()
    path = subscription if subscription.startswith("projects/") else subscriber.subscription_path(project, subscription)
    future = subscriber.subscribe(
        path, callback=Forwarder(sink), flow_control=pubsub_v1.types.FlowControl(max_messages=max_in_flight),
    )
    stop = threading.Event()

    def shutdown(*_):
        stop.set()
        future.cancel()  # stops pulling; leased messages not acked are redelivered

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shutdown)
    log.info("forwarding %s to %s", path, sink)
    with subscriber:
        try:
            future.result()
        except Exception:
            if not stop.is_set():
                raise
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bucketml.gcs_source", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"),
                        help="project of the subscription (env GOOGLE_CLOUD_PROJECT)")
    parser.add_argument("--subscription", default=os.environ.get("BUCKETML_PUBSUB_SUBSCRIPTION"),
                        help="subscription id or projects/P/subscriptions/S (env BUCKETML_PUBSUB_SUBSCRIPTION)")
    parser.add_argument("--sink", default=os.environ.get("K_SINK"), help="CloudEvents sink URL, the Broker ingress (env K_SINK)")
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT, help="messages posted at once")
    args = parser.parse_args(argv)
    if not args.subscription:
        parser.error("no subscription: pass --subscription or set BUCKETML_PUBSUB_SUBSCRIPTION")
    if not args.subscription.startswith("projects/") and not args.project:
        parser.error("no project: pass --project or set GOOGLE_CLOUD_PROJECT")
    if not args.sink:
        parser.error("no sink: pass --sink or set K_SINK")
    logs.configure()
    run(args.project, args.subscription, args.sink, args.max_in_flight)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
