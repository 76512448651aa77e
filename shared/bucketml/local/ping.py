"""Local stand-in for Knative PingSources: `python -m bucketml.local.ping --manifests DIR
--subscriber NAME=URL ... --seconds N` sends each PingSource's ping event to its sink.

The PingSources, their sinks and data come from the same manifests a cluster applies; only the
period differs: every N seconds (BUCKETML_MONITOR_SECONDS, default 10) instead of the cron
schedule, so a canary or drift is decided within seconds on a laptop. Like a PingSource, a ping
that its sink does not take is not repeated: the next one comes on time.
"""

from __future__ import annotations

import logging
import threading
import uuid

import click
import requests
from cloudevents.http import CloudEvent

from bucketml import settings
from bucketml.contracts import events
from bucketml.local.broker.triggers import ManifestError, PingSource, load_ping_sources
from bucketml.logs import configure

log = logging.getLogger("bucketml.ping")


def ping_event(source: PingSource, namespace: str = "default") -> tuple[dict[str, str], bytes]:
    """The event a PingSource sends, in binary mode."""
    attributes = {"type": events.PING, "source": f"/apis/v1/namespaces/{namespace}/pingsources/{source.name}",
                  "id": str(uuid.uuid4()), "time": events.now_rfc3339()}
    if source.content_type:
        attributes["datacontenttype"] = source.content_type
    return events.to_binary_http(CloudEvent(attributes, source.data.encode() if source.data is not None else None))


def run(sources: list[PingSource], seconds: float, stop: threading.Event) -> None:
    session = requests.Session()
    while not stop.wait(seconds):
        for source in sources:
            headers, body = ping_event(source)
            try:
                response = session.post(source.sink, headers=headers, data=body, timeout=max(seconds, 30.0))
            except requests.RequestException as exc:
                log.warning("%s: the sink %s is unreachable: %s", source.name, source.sink, exc)
                continue
            if response.status_code >= 300:
                log.warning("%s: the sink %s answered %s: %s", source.name, source.sink, response.status_code,
                            response.text[:200])


@click.command()
@click.option("--manifests", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--subscriber", "subscribers", multiple=True, metavar="NAME=URL", help="A Service's local URL.")
@click.option("--seconds", type=float, default=None, help="The period (default BUCKETML_MONITOR_SECONDS).")
def main(manifests: str, subscribers: tuple[str, ...], seconds: float | None) -> None:
    configure()
    urls = dict(item.split("=", 1) for item in subscribers)
    try:
        sources = load_ping_sources(manifests, urls)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    period = seconds if seconds is not None else settings.monitor_seconds()
    log.info("pinging %s every %gs", ", ".join(f"{s.name} -> {s.sink}" for s in sources) or "nothing", period)
    run(sources, period, threading.Event())


if __name__ == "__main__":
    main()
