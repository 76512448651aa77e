"""The GCS event source for any Kubernetes cluster: Pub/Sub bucket notifications -> the Broker.

Without Eventarc, a bucket's notifications go to a Pub/Sub topic
(`gcloud storage buckets notifications create gs://B --topic=T --event-types=OBJECT_FINALIZE
--object-prefix=datasets/ --payload-format=json`). This adapter pulls them from a subscription of that topic and posts each
one to the sink (K_SINK, which the Knative ContainerSource sets) as the same
`google.cloud.storage.object.v1.finalized` CloudEvent the local watcher sends
(`bucketml.contracts.events.finalized_event`), in binary content mode.

A message is acknowledged only after the sink answered 2xx; any other outcome nacks it, so Pub/Sub
redelivers it. Killing the adapter loses nothing: what it had not acknowledged comes back.
Delivery is at least once; the event id is stable per (object, generation), as the watcher's is,
so a duplicate is recognisable. Other notification types are acknowledged and logged.

    python -m bucketml.cloud.gcs_source --project P --subscription S --sink URL

PUBSUB_EMULATOR_HOST points the client at the Pub/Sub emulator.
"""

from __future__ import annotations

import datetime
import json
import logging
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import click
import requests

from bucketml.contracts import events
from bucketml import logs
from bucketml.storage.base import rfc3339

log = logging.getLogger("bucketml.gcs_source")

FINALIZE = "OBJECT_FINALIZE"
SINK_TIMEOUT = 30.0  # seconds for the sink to accept one event
MAX_IN_FLIGHT = 16  # messages leased and being posted at once
# The ack deadline the adapter sets and keeps extending while a post is in flight. It is also
# how long the messages a killed adapter had leased wait before Pub/Sub redelivers them.
LEASE_SECONDS = 10
RETRY_SECONDS = 2  # a refused event is pulled again after this
PULL_SECONDS = 30  # one pull waits this long for messages


def _timestamp(value: str | None) -> str | None:
    """GCS's form, millisecond precision (2024-05-01T10:00:00.123Z), whatever the notification used."""
    if not value:
        return value
    try:
        return rfc3339(datetime.datetime.fromisoformat(value))
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
    return events.finalized_event(obj["bucket"], obj, id_=events.finalized_event_id(obj["name"], obj["generation"]))


class Forwarder:
    """One notification -> at most one POST to the sink. True: acknowledge it; False: redeliver it."""

    def __init__(self, sink: str, timeout: float = SINK_TIMEOUT):
        self.sink = sink
        self.timeout = timeout
        self._local = threading.local()  # one requests.Session per worker thread

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def __call__(self, attributes: Mapping[str, str], data: bytes, message_id: str = "") -> bool:
        what = f"{attributes.get('bucketId')}/{attributes.get('objectId')}#{attributes.get('objectGeneration')}"
        try:
            event = to_cloud_event(attributes, data)
        except ValueError as exc:
            # A retry cannot fix it; acknowledged so it does not loop (a dead-letter topic on the
            # subscription is the place for such messages if they must be kept).
            log.error("dropped unreadable notification %s (message %s): %s", what, message_id, exc)
            return True
        if event is None:
            log.info("ignored %s for %s", attributes.get("eventType"), what)
            return True
        try:
            response = events.post(self.sink, event, self._session(), timeout=self.timeout)
        except requests.RequestException as exc:
            log.warning("sink unreachable, %s will be redelivered: %s", what, exc)
            return False
        if not 200 <= response.status_code < 300:
            log.warning("sink refused %s (HTTP %s), it will be redelivered: %s", what, response.status_code, response.text[:200])
            return False
        log.info("finalized %s sent as %s", what, event["id"])
        return True


def run(project: str, subscription: str, sink: str, max_in_flight: int = MAX_IN_FLIGHT,
        lease_seconds: int = LEASE_SECONDS) -> None:
    """Pull, post, acknowledge, until SIGTERM/SIGINT.

    A synchronous pull loop rather than the client's streaming pull: every lease is explicit
    (extended while its post is in flight, never longer than `lease_seconds`), so what a killed
    adapter held comes back after at most `lease_seconds`, on Pub/Sub and on its emulator alike.
    """
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1  # imported here: a second to import, only this process needs it

    subscriber = pubsub_v1.SubscriberClient()
    path = subscription if subscription.startswith("projects/") else subscriber.subscription_path(project, subscription)
    forward = Forwarder(sink)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def lease(ack_ids: list[str], seconds: int) -> None:
        try:
            subscriber.modify_ack_deadline(subscription=path, ack_ids=ack_ids, ack_deadline_seconds=seconds)
        except gexc.GoogleAPICallError as exc:  # the lease runs out: a redelivery, nothing lost
            log.warning("could not set the ack deadline of %d message(s): %s", len(ack_ids), exc)

    def settle(ack: list[str], nack: list[str]) -> None:
        if ack:
            try:
                subscriber.acknowledge(subscription=path, ack_ids=ack)
            except gexc.GoogleAPICallError as exc:  # delivered, but will come again: a duplicate
                log.warning("could not acknowledge %d message(s), they will be sent again: %s", len(ack), exc)
        if nack:  # back in the subscription after RETRY_SECONDS (0 would spin on a sink that is down)
            lease(nack, RETRY_SECONDS)

    log.info("forwarding %s to %s", path, sink)
    puller = ThreadPoolExecutor(1, thread_name_prefix="pull")  # a blocked gRPC call would hold up SIGTERM
    with subscriber, ThreadPoolExecutor(max_in_flight, thread_name_prefix="post") as pool:
        while not stop.is_set():
            call = puller.submit(subscriber.pull, subscription=path, max_messages=max_in_flight, timeout=PULL_SECONDS)
            while not call.done() and not stop.is_set():
                stop.wait(0.1)
            if stop.is_set():  # whatever this pull still brings is leased to nobody and comes back
                break
            try:
                response = call.result()
            except gexc.DeadlineExceeded:
                continue  # nothing to pull
            except gexc.GoogleAPICallError as exc:
                log.warning("pull failed, retrying: %s", exc)
                stop.wait(1)
                continue
            received = response.received_messages
            if not received:
                continue
            # Each message's lease starts as the subscription's ack deadline; set it now.
            lease([m.ack_id for m in received], lease_seconds)
            pending = {
                pool.submit(forward, dict(m.message.attributes), m.message.data, m.message.message_id): m.ack_id
                for m in received
            }
            while pending:  # settle each message as soon as its post is done; extend the others
                done, _ = wait(pending, timeout=lease_seconds / 3)
                outcomes = [(pending.pop(f), _ok(f)) for f in done]
                settle([a for a, ok in outcomes if ok], [a for a, ok in outcomes if not ok])
                if pending:
                    lease(list(pending.values()), lease_seconds)
    puller.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")


def _ok(future) -> bool:
    try:
        return future.result()
    except Exception:  # a bug in one message's handling: redeliver it, keep the loop alive
        log.exception("forwarding a notification failed")
        return False


# --- checking the set-up before `bucketml dev --bucket gs://...` starts anything ---------------
# Uploads are the objects under datasets/; a notification limited to them spares the broker an
# event for every object the platform writes itself (prepared data, models, reports).
UPLOADS_PREFIX = "datasets/"
# Files to score (the batch function) are uploaded under batch/: a second notification with
# that prefix. Optional: without it, datasets still train and only batch scoring is not told.
BATCH_PREFIX = "batch/"

class SetupError(Exception):
    """The bucket, its notifications or their subscription are not what the source needs; the
    message says what was expected, what was found and what to do."""


def subscription_path(project: str | None, subscription: str) -> str:
    """projects/P/subscriptions/S from an id and its project, or the path as given."""
    if subscription.startswith("projects/"):
        if len(subscription.split("/")) != 4 or subscription.split("/")[2] != "subscriptions":
            raise SetupError(f"subscription {subscription!r} is neither an id nor projects/PROJECT/subscriptions/NAME")
        return subscription
    if "/" in subscription:
        raise SetupError(f"subscription {subscription!r} is neither an id nor projects/PROJECT/subscriptions/NAME")
    if not project:
        raise SetupError(f"subscription {subscription!r} is an id without a project: pass --project or set "
                         f"GOOGLE_CLOUD_PROJECT, or give projects/PROJECT/subscriptions/{subscription}")
    return f"projects/{project}/subscriptions/{subscription}"


def setup_commands(bucket: str, path: str | None = None, topic: str | None = None, prefix: str = UPLOADS_PREFIX) -> str:
    """The gcloud commands that make `bucket` notify a subscription of the objects under
    `prefix` (docs/deploy.md)."""
    sub = path.rsplit("/", 1)[-1] if path else "bucketml-uploads"
    project = path.split("/")[1] if path else "PROJECT"
    topic_id = topic.rsplit("/", 1)[-1] if topic else "bucketml-uploads"
    lines = []
    if topic is None:
        lines.append(f"gcloud pubsub topics create {topic_id} --project {project}")
    if path is None or topic is None:
        lines.append(f"gcloud pubsub subscriptions create {sub} --topic {topic_id} --ack-deadline 10 --project {project}")
    lines.append(f"gcloud storage buckets notifications create gs://{bucket} --topic {topic or topic_id} "
                 f"--event-types OBJECT_FINALIZE --object-prefix {prefix} --payload-format json")
    return "\n".join("    " + line for line in lines)


def notifies(notifications, topic: str, prefix: str = UPLOADS_PREFIX) -> bool | list[str]:
    """True when one of a bucket's notification configurations (google-cloud-storage
    BucketNotification objects) publishes OBJECT_FINALIZE in the JSON payload format to `topic`
    (projects/P/topics/T) for the objects under `prefix` (datasets/); else what each of them
    does, for the error message."""
    found = []
    for notification in notifications:
        to = f"projects/{notification.topic_project}/topics/{notification.topic_name}"
        if (to == topic and notification.payload_format == "JSON_API_V1"
                and (not notification.event_types or FINALIZE in notification.event_types)
                and prefix.startswith(notification.blob_name_prefix or "")):
            return True
        under = notification.blob_name_prefix or ""
        found.append(f"{to} ({','.join(notification.event_types or ['all events'])}, {notification.payload_format}"
                     f"{f', objects under {under}' if under else ''})")
    return found


def batch_note(bucket: str, path: str, topic: str, notifications) -> str | None:
    """A warning when no notification tells `topic` of the files uploaded under batch/ (those
    to score), with the command that adds one; None when one does. Not an error: datasets
    train without it."""
    if notifies(notifications, topic, BATCH_PREFIX) is True:
        return None
    return (f"gs://{bucket} sends no OBJECT_FINALIZE notification for the objects under {BATCH_PREFIX} to {topic}, so "
            f"files uploaded there to be scored (batch/<model>/<name>.csv) will not be; datasets train as usual. "
            f"To score files, add the notification:\n{setup_commands(bucket, path, topic, BATCH_PREFIX)}")


def check_setup(bucket: str, path: str) -> list[str]:
    """That bucket `bucket` exists and can be listed, that subscription `path`
    (projects/P/subscriptions/S) exists, and that the bucket notifies its topic of finalized
    objects in the JSON payload format. Raises SetupError for what is missing; returns notes
    about what could not be checked (a permission the caller lacks, an emulator without
    notification configurations) and a warning when no notification covers batch/."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exceptions

    from bucketml.storage import StorageError
    from bucketml.storage.gcs import GCSStorage

    notes: list[str] = []
    credentials = ("no Google Cloud credentials: run `gcloud auth application-default login` "
                   "or set GOOGLE_APPLICATION_CREDENTIALS")
    # 1. The bucket: listing it is what the functions need (roles/storage.objectAdmin allows it).
    try:
        storage = GCSStorage(bucket)
        next(iter(storage.client.list_blobs(bucket, max_results=1)), None)
    except gexc.NotFound:
        raise SetupError(f"bucket gs://{bucket} does not exist: check the name, or create it with "
                         f"`gcloud storage buckets create gs://{bucket} --location REGION`") from None
    except gexc.Forbidden as exc:
        raise SetupError(f"the credentials in use may not list gs://{bucket} ({exc.message}): grant them "
                         "roles/storage.objectAdmin on the bucket, or use other credentials") from None
    except auth_exceptions.DefaultCredentialsError:
        raise SetupError(credentials) from None
    except StorageError as exc:
        raise SetupError(str(exc)) from None
    except (gexc.GoogleAPICallError, auth_exceptions.GoogleAuthError, requests.RequestException) as exc:
        raise SetupError(f"Google Cloud Storage did not answer for gs://{bucket}: {exc}") from None

    # 2. The subscription, and the topic it reads.
    from google.cloud import pubsub_v1

    try:
        with pubsub_v1.SubscriberClient() as subscriber:
            topic = subscriber.get_subscription(request={"subscription": path}, retry=None, timeout=15).topic
    except gexc.NotFound:
        raise SetupError(f"subscription {path} does not exist; gs://{bucket}'s uploads reach `bucketml dev` "
                         f"through a Pub/Sub subscription of the bucket's notifications. Create them with:\n"
                         f"{setup_commands(bucket, path)}") from None
    except gexc.PermissionDenied as exc:
        notes.append(f"could not read subscription {path} ({exc.message}); assuming it exists and receives "
                     f"gs://{bucket}'s notifications")
        return notes
    except auth_exceptions.DefaultCredentialsError:
        raise SetupError(credentials) from None
    except (gexc.GoogleAPICallError, auth_exceptions.GoogleAuthError) as exc:
        raise SetupError(f"Pub/Sub did not answer for subscription {path}: {exc}") from None
    if not topic or topic == "_deleted-topic_":
        raise SetupError(f"subscription {path} belongs to a deleted topic: delete it and create the topic, the "
                         f"subscription and the notification again:\n{setup_commands(bucket, path)}")

    # 3. A notification of the bucket that publishes finalized objects, as JSON, to that topic.
    try:
        notifications = list(storage.client.bucket(bucket).list_notifications())
    except (gexc.GoogleAPICallError, requests.RequestException) as exc:
        code = getattr(exc, "code", None)
        notes.append(f"could not list gs://{bucket}'s notification configurations ({code or exc}); make sure one "
                     f"publishes OBJECT_FINALIZE in the JSON payload format to {topic}")
        return notes
    found = notifies(notifications, topic)
    if found is True:
        return notes + ([note] if (note := batch_note(bucket, path, topic, notifications)) else [])
    raise SetupError(
        f"gs://{bucket} sends no OBJECT_FINALIZE notification with the JSON payload to {topic}, the topic of "
        f"{path}; it notifies: {'; '.join(found) or 'nothing'}. Create the notification with:\n"
        f"{setup_commands(bucket, path, topic)}")


@click.command(help=__doc__.split("\n\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", help="project of the subscription (env GOOGLE_CLOUD_PROJECT)")
@click.option("--subscription", envvar="BUCKETML_PUBSUB_SUBSCRIPTION",
              help="subscription id or projects/P/subscriptions/S (env BUCKETML_PUBSUB_SUBSCRIPTION)")
@click.option("--sink", envvar="K_SINK", help="CloudEvents sink URL, the Broker ingress (env K_SINK)")
@click.option("--max-in-flight", type=int, default=MAX_IN_FLIGHT, show_default=True, help="messages posted at once")
@click.option("--lease-seconds", type=int, default=LEASE_SECONDS, show_default=True,
              help="ack deadline kept while posting; a crashed adapter's messages return after it (10-600)")
def main(project: str | None, subscription: str | None, sink: str | None, max_in_flight: int, lease_seconds: int) -> None:
    # A Knative ContainerSource gives every setting in the environment, hence each flag's envvar.
    if not subscription:
        raise click.UsageError("no subscription: pass --subscription or set BUCKETML_PUBSUB_SUBSCRIPTION")
    if not subscription.startswith("projects/") and not project:
        raise click.UsageError("no project: pass --project or set GOOGLE_CLOUD_PROJECT")
    if not sink:
        raise click.UsageError("no sink: pass --sink or set K_SINK")
    logs.configure()
    run(project, subscription, sink, max_in_flight, max(10, min(600, lease_seconds)))


if __name__ == "__main__":
    main()
