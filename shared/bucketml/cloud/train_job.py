"""Training as a Kubernetes Job (Knative JobSink), for trainings longer than a request may last.

A JobSink creates one Job per `bucketml.dataset.prepared.v1` event and mounts the event as JSON
at /etc/jobsink-event/event. This runs the same train step as the train function, then sends
what it announces (model.trained, and model.published if the pointer moved) to the event sink
(K_SINK, else BUCKETML_BROKER_URL): a Job has no reply. Exit codes: 0 done (a version, or a
training.failed event sent); 1 a transient fault (the event sink or the bucket), so the Job's
backoffLimit retries it, and the retry finds the version already made; 2 a malformed event.

    python -m bucketml.cloud.train_job [EVENT_FILE]
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
from cloudevents.http import from_json

from bucketml import settings
from bucketml.contracts import events
from bucketml import logs
from bucketml.storage import StorageError, open_storage
from bucketml.steps.train import handle_prepared

log = logging.getLogger("bucketml.train_job")

EVENT_FILE = "/etc/jobsink-event/event"


def run(event_file: str) -> int:
    try:
        event = from_json(Path(event_file).read_bytes())
        if event["type"] != events.DATASET_PREPARED:
            raise events.MalformedEvent(f"this job trains on {events.DATASET_PREPARED} events, not {event['type']}")
        announced = handle_prepared(open_storage(settings.bucket_url()), events.event_data(event))
        for outcome in announced:
            events.emit(settings.event_sink_url(), outcome)
            log.info("sent %s %s", outcome["type"], outcome["id"])
    except (OSError, ValueError, KeyError) as exc:  # unreadable file, not a CloudEvent, malformed data
        log.error("cannot train on %s: %s", event_file, exc)
        return 2
    except (events.SinkUnavailable, StorageError) as exc:
        log.error("%s; exiting for the Job to retry", exc)
        return 1
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("event_file", default=EVENT_FILE, required=False)
def main(event_file: str) -> None:
    """Train on the dataset.prepared CloudEvent in EVENT_FILE (default: where a JobSink mounts it).
    Exit status 0 done, 1 transient fault (the Job retries), 2 malformed event."""
    logs.configure()
    raise SystemExit(run(event_file))


if __name__ == "__main__":
    main()
