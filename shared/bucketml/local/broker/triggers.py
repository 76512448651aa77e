"""The event topology, read from the same Knative Broker and Trigger manifests the cluster applies."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urljoin, urlsplit

import yaml

EVENTING_API = "eventing.knative.dev/v1"

# Days and smaller only: years and months have no fixed length in seconds.
_DURATION = re.compile(
    r"P(?!$)"
    r"(?:(?P<weeks>\d+(?:[.,]\d+)?)W)?"
    r"(?:(?P<days>\d+(?:[.,]\d+)?)D)?"
    r"(?:T(?=\d)"
    r"(?:(?P<hours>\d+(?:[.,]\d+)?)H)?"
    r"(?:(?P<minutes>\d+(?:[.,]\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:[.,]\d+)?)S)?)?"
)
_SECONDS_PER = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


class ManifestError(ValueError):
    """A manifest the local broker cannot run (the message names the file and object)."""


def parse_duration(text: str) -> float:
    """Seconds in an ISO 8601 duration such as PT0.5S, PT2M or P1DT12H."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not an ISO 8601 duration like PT0.5S or PT2M (years and months are not supported)")
    return sum(float(value.replace(",", ".")) * _SECONDS_PER[unit] for unit, value in match.groupdict().items() if value)


@dataclass(frozen=True)
class Delivery:
    """Knative DeliverySpec: `retry` retries after the first attempt, spaced by the backoff."""

    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay: float = 0.0
    timeout: float | None = None
    dead_letter_sink: str | None = None  # URL; where an event goes once its retries are spent

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry number `retry_number` (1 for the first retry)."""
        if self.backoff_policy == "linear":
            return self.backoff_delay * retry_number
        return self.backoff_delay * 2**retry_number


@dataclass(frozen=True)
class Trigger:
    name: str
    broker: str
    filter: Mapping[str, str]
    subscriber: str
    delivery: Delivery = field(default_factory=Delivery)

    def matches(self, event_attributes: Mapping[str, Any]) -> bool:
        """Knative attribute filter: every listed attribute equals exactly; an empty filter matches all."""
        for name, expected in self.filter.items():
            value = event_attributes.get(name)
            if value is None or str(value) != expected:
                return False
        return True


@dataclass(frozen=True)
class Topology:
    brokers: Mapping[str, Delivery]  # broker name -> its default delivery
    triggers: tuple[Trigger, ...]

    @property
    def default_broker(self) -> str:
        """The broker behind the bare ingress path: the only one, else the one named `default`."""
        return next(iter(self.brokers)) if len(self.brokers) == 1 else "default"

    def trigger(self, name: str) -> Trigger | None:
        return next((t for t in self.triggers if t.name == name), None)

    def routes(self, broker: str, event_attributes: Mapping[str, Any]) -> list[Trigger]:
        return [t for t in self.triggers if t.broker == broker and t.matches(event_attributes)]


def load_topology(manifest_dir: str | Path, subscribers: Mapping[str, str]) -> Topology:
    """Read every *.yaml/*.yml under `manifest_dir`; `subscribers` maps a Service name to its base URL."""
    folder = Path(manifest_dir)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: manifest folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    objects: list[tuple[Path, dict]] = []
    for path in files:
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
        for doc in documents:
            if isinstance(doc, dict) and doc.get("apiVersion") == EVENTING_API and doc.get("kind") in ("Broker", "Trigger"):
                objects.append((path, doc))

    brokers: dict[str, Delivery] = {}
    broker_specs: dict[str, dict] = {}
    for path, doc in objects:
        if doc["kind"] == "Broker":
            name = _name(path, doc)
            spec = _mapping(doc.get("spec"), path, f"Broker {name!r}: spec")
            delivery = _mapping(spec.get("delivery"), path, f"Broker {name!r}: spec.delivery")
            if name in brokers:
                raise ManifestError(f"{path}: Broker {name!r} is defined twice")
            brokers[name] = _delivery(delivery, path, f"Broker {name!r}", subscribers)
            broker_specs[name] = delivery

    triggers: list[Trigger] = []
    for path, doc in objects:
        if doc["kind"] == "Trigger":
            trigger = _trigger(path, doc, broker_specs, subscribers)
            if any(t.name == trigger.name for t in triggers):
                raise ManifestError(f"{path}: Trigger {trigger.name!r} is defined twice")
            triggers.append(trigger)
    return Topology(brokers, tuple(triggers))


SOURCES_API = "sources.knative.dev/v1"


@dataclass(frozen=True)
class PingSource:
    """A Knative PingSource: a ping event sent to `sink` on a schedule (locally, every few seconds)."""

    name: str
    schedule: str
    sink: str  # URL
    content_type: str | None = None
    data: str | None = None


def load_ping_sources(manifest_dir: str | Path, subscribers: Mapping[str, str]) -> list[PingSource]:
    """The PingSources in the *.yaml/*.yml files of `manifest_dir`, their sinks resolved as Triggers' subscribers."""
    found = []
    for path in sorted(p for p in Path(manifest_dir).iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
        for doc in documents:
            if not (isinstance(doc, dict) and doc.get("apiVersion") == SOURCES_API and doc.get("kind") == "PingSource"):
                continue
            name = _name(path, doc)
            where = f"PingSource {name!r}"
            spec = _mapping(doc.get("spec"), path, f"{where}: spec")
            schedule, content_type, data = spec.get("schedule"), spec.get("contentType"), spec.get("data")
            if not isinstance(schedule, str) or not schedule.strip():
                raise ManifestError(f"{path}: {where}: spec.schedule must be a cron expression such as '* * * * *'")
            if any(value is not None and not isinstance(value, str) for value in (content_type, data)):
                raise ManifestError(f"{path}: {where}: spec.contentType and spec.data must be strings")
            sink = _subscriber_url(_mapping(spec.get("sink"), path, f"{where}: spec.sink"), subscribers, path, where,
                                   field="spec.sink")
            found.append(PingSource(name, schedule, sink, content_type, data))
    return found


def _trigger(path: Path, doc: dict, broker_specs: Mapping[str, dict], subscribers: Mapping[str, str]) -> Trigger:
    name = _name(path, doc)
    where = f"Trigger {name!r}"
    spec = _mapping(doc.get("spec"), path, f"{where}: spec")
    broker = spec.get("broker")
    if broker not in broker_specs:
        raise ManifestError(f"{path}: {where}: spec.broker {broker!r} names no Broker in the manifests")
    if "filters" in spec:
        # Silently ignoring the newer SQL-like filters would route every event to this trigger.
        raise ManifestError(f"{path}: {where}: spec.filters is not supported locally; use spec.filter.attributes")
    attributes = _mapping(_mapping(spec.get("filter"), path, f"{where}: spec.filter").get("attributes"), path, f"{where}: spec.filter.attributes")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
        raise ManifestError(f"{path}: {where}: spec.filter.attributes must map names to string values")
    subscriber = _subscriber_url(_mapping(spec.get("subscriber"), path, f"{where}: spec.subscriber"), subscribers, path, where)
    # Knative's rule: a Trigger with its own spec.delivery uses it whole; the Broker's delivery
    # applies only to Triggers without one (no merging field by field, so a Trigger that sets
    # only a timeout has no dead-letter sink and no retries).
    own = spec.get("delivery")
    delivery = broker_specs[broker] if own is None else _mapping(own, path, f"{where}: spec.delivery")
    return Trigger(name, broker, dict(attributes), subscriber, _delivery(delivery, path, where, subscribers))


def _subscriber_url(subscriber: Mapping, subscribers: Mapping[str, str], path: Path, where: str,
                    field: str = "spec.subscriber") -> str:
    """A Knative Destination (ref and/or uri) as a URL."""
    ref, uri = subscriber.get("ref"), subscriber.get("uri")
    if uri is not None and not isinstance(uri, str):
        raise ManifestError(f"{path}: {where}: {field}.uri must be a string")
    if ref is None:
        parts = urlsplit(uri or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ManifestError(f"{path}: {where}: {field} needs a ref or an absolute http(s) uri, got {uri!r}")
        return uri
    ref = _mapping(ref, path, f"{where}: {field}.ref")
    if ref.get("kind") != "Service":
        raise ManifestError(f"{path}: {where}: {field} ref kind {ref.get('kind')!r} is not supported locally (only Service)")
    service = ref.get("name")
    if service not in subscribers:
        known = ", ".join(sorted(subscribers)) or "none"
        raise ManifestError(f"{path}: {where}: no URL for subscriber Service {service!r} (known: {known})")
    # Knative resolves a relative uri against the address of the ref.
    return urljoin(subscribers[service], uri) if uri else subscribers[service]


def _delivery(spec: Mapping, path: Path, where: str, subscribers: Mapping[str, str]) -> Delivery:
    try:
        retry = spec.get("retry", 0)
        if not isinstance(retry, int) or isinstance(retry, bool) or retry < 0:
            raise ValueError(f"retry must be a non-negative integer, got {retry!r}")
        policy = spec.get("backoffPolicy", "exponential")
        if policy not in ("exponential", "linear"):
            raise ValueError(f"backoffPolicy must be exponential or linear, got {policy!r}")
        delay = parse_duration(spec["backoffDelay"]) if "backoffDelay" in spec else 0.0
        timeout = parse_duration(spec["timeout"]) if "timeout" in spec else None
        if timeout == 0:
            raise ValueError("timeout must be longer than zero")
    except ValueError as exc:
        raise ManifestError(f"{path}: {where}: delivery: {exc}") from exc
    sink = spec.get("deadLetterSink")
    if sink is not None:
        sink = _subscriber_url(_mapping(sink, path, f"{where}: delivery.deadLetterSink"), subscribers, path, where,
                               "delivery.deadLetterSink")
    return Delivery(retry, policy, delay, timeout, sink)


def _name(path: Path, doc: dict) -> str:
    name = _mapping(doc.get("metadata"), path, f"{doc['kind']}: metadata").get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{path}: a {doc['kind']} has no metadata.name")
    return name


def _mapping(value: Any, path: Path, what: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ManifestError(f"{path}: {what} must be a mapping")
    return value
