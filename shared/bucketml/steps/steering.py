"""Steering a model by hand: promote, roll back, start a canary, and the figures each step is
announced with. One source of truth for the `bucketml` command line and the web console, so
both move the same pointer the same way and announce the same events.

The registry does the compare-and-swap (registry.model_registry); each step is announced as
`bucketml.model.published.v1` (the current version moved) and/or a `bucketml.rollout.*` event
with what it was decided on. How a line is shown and how an event reaches the broker are the
caller's (`echo`, `announce`): the CLI prints and names the variable to set, the console shows
the lines on its page.
"""

from __future__ import annotations

from typing import Callable

import requests
from cloudevents.http import CloudEvent

from bucketml import auth
from bucketml.contracts import events
from bucketml.contracts.event_data import RolloutFigures
from bucketml.registry.model_registry import CANARY, SHADOW, Pointer, Registry, RegistryError
from bucketml.steps.rollout import rollout_event

ANSWERED = "bucketml_predict_requests_total"  # the predict function's metrics (serving/metrics.py)
SHADOW_ROWS = "bucketml_shadow_rows_total"
SHADOW_AGREEING = "bucketml_shadow_agreeing_rows_total"
INFERENCE_ENDPOINTS = ("predict", "v2_infer", "v1_predict")
NEXT_POLL = "predict replicas still switch on their next poll of the pointer"

Echo = Callable[[str], object]
# announce(event, fallback): post the event to the broker; when it cannot take it, say so and
# what still happens (`fallback`).
Announce = Callable[[CloudEvent, str], object]


class SteeringRefused(RegistryError, ValueError):
    """A step that cannot be taken as asked (no earlier version, a canary in the way); the
    message says what to do instead."""


# --- the figures a rollout step is decided on -------------------------------------------------
def _samples(predict_url: str) -> list | None:
    """The samples of one predict replica's /metrics, or None when it cannot be asked."""
    from prometheus_client.parser import text_string_to_metric_families  # only rollout steps parse metrics

    try:
        response = requests.get(predict_url.rstrip("/") + "/metrics", headers=auth.client_headers(), timeout=5)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    try:
        return [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]
    except ValueError:  # something else listens there: no figures rather than a failed step
        return None


def requests_per_version(samples: list, model: str) -> dict[str, int]:
    """Answered (2xx) inference requests of `model` per version, counted since the replica
    started. A replica is all the caller can reach: behind a load balancer the others count their own."""
    counts: dict[str, int] = {}
    for sample in samples:
        labels = sample.labels
        if (sample.name == ANSWERED and labels.get("model") == model and labels.get("version")
                and labels.get("code", "").startswith("2") and labels.get("endpoint") in INFERENCE_ENDPOINTS):
            counts[labels["version"]] = counts.get(labels["version"], 0) + int(sample.value)
    return counts


def _rows(samples: list, name: str, model: str, version: int) -> int:
    return sum(int(s.value) for s in samples
               if s.name == name and s.labels.get("model") == model and s.labels.get("version") == str(version))


def figures(model: str, pointer: Pointer, predict_url: str | None, kind: str = CANARY) -> RolloutFigures:
    """The canary's share (or the shadow's) and start as the pointer (before the step) records
    them, and what a predict replica counted when it could be asked."""
    named = pointer.data.get(kind) or {}
    found = {"percent": named.get("percent"), "started": named.get("started")}
    samples = _samples(predict_url) if predict_url else None
    if samples is not None:
        found.update(requests=requests_per_version(samples, model), requests_from=predict_url)
        if kind == SHADOW:
            found.update(compared_rows=_rows(samples, SHADOW_ROWS, model, named.get("version")),
                         agreeing_rows=_rows(samples, SHADOW_AGREEING, model, named.get("version")))
    return RolloutFigures.model_validate({key: value for key, value in found.items() if value is not None})


# --- the steps ----------------------------------------------------------------------------------
def move_current(registry: Registry, name: str, version: int, reason: str, echo: Echo, announce: Announce) -> bool:
    """Move the pointer (compare-and-swap) and announce model.published like train does;
    whether it moved."""
    moved, previous = registry.move_pointer(name, version, reason=reason)
    if not moved:
        echo(f"{name}: version {version} is already current")
        return False
    echo(f"{name}: current version {previous} -> {version}")
    announce(registry.published_event(name, "registry"), NEXT_POLL)
    return True


def promote(registry: Registry, name: str, version: int, predict_url: str | None, by: str, echo: Echo,
            announce: Announce) -> bool:
    """Make `version` current (when it is the canary, this ends the canary: rollout.promoted too)."""
    before = registry.current(name)
    canary = Registry.canary_of(before)
    decided = figures(name, before, predict_url) if canary and canary[0] == version else None
    if not move_current(registry, name, version, f"promoted to version {version} by {by}", echo, announce):
        return False
    if decided is not None:  # the pointer no longer names a canary once it is the current version
        after = registry.current(name)
        echo(f"{name}: canary version {version} promoted; every unpinned request goes to it")
        announce(rollout_event(events.ROLLOUT_PROMOTED, name, version, version, after.generation, decided,
                               previous=before.version), "the promotion stands")
    return True


def rollback(registry: Registry, name: str, to_version: int | None, predict_url: str | None, by: str, echo: Echo,
             announce: Announce, command: str = "rollback") -> bool:
    """Make an earlier version current again (the one before the current, or `to_version`); with a
    canary, remove the canary instead (the current version stays)."""
    pointer = registry.current(name)
    current = pointer.version
    if current is None:
        raise SteeringRefused(f"model '{name}' has no current version to roll back from")
    canary = Registry.canary_of(pointer)
    if canary is not None:
        if to_version is not None:
            raise SteeringRefused(f"model '{name}' has a canary (version {canary[0]} at {canary[1]}%): "
                                  f"`bucketml {command} {name}` removes it first, then roll back with --to")
        decided = figures(name, pointer, predict_url)
        ended, current = registry.end_canary(name)
        echo(f"{name}: canary version {ended} rolled back; version {current} answers every unpinned request")
        announce(rollout_event(events.ROLLOUT_ROLLED_BACK, name, ended, current, registry.pointer_generation(name),
                               decided), NEXT_POLL)
        return True
    if to_version is None:
        earlier = [v for v in registry.versions(name) if v < current]
        if not earlier:
            raise SteeringRefused(f"model '{name}' has no version before {current}")
        to_version = earlier[-1]
    return move_current(registry, name, to_version, f"rolled back from version {current} by {by}", echo, announce)


def start_canary(registry: Registry, name: str, version: int, percent: int, echo: Echo, announce: Announce) -> Pointer:
    """Send `percent` % of unpinned requests to `version` until a promote or rollback ends it."""
    pointer = registry.start_canary(name, version, percent)
    echo(f"{name}: canary version {version} answers {percent}% of unpinned requests; version {pointer.version} the rest")
    decided = figures(name, pointer, None)  # nothing answered by the canary yet: its share is the figure
    announce(rollout_event(events.ROLLOUT_STARTED, name, version, pointer.version, pointer.generation, decided),
             NEXT_POLL)
    return pointer
