"""Canary rollouts from the command line: the figures that decide a step, and its event.

`bucketml canary` names a canary in the pointer, `bucketml promote` of the canary's version makes
it current and `bucketml rollback` with a canary removes it; `bucketml shadow` names or stops a
shadow (registry.model_registry does the compare-and-swap). Each step is announced as a
bucketml.rollout.* event with what it was decided on.
"""

from __future__ import annotations

import requests

from bucketml.contracts.event_data import RolloutFigures
from bucketml.local.client import auth_headers
from bucketml.registry.model_registry import CANARY, SHADOW, Pointer

ANSWERED = "bucketml_predict_requests_total"  # the predict function's metrics (serving/metrics.py)
SHADOW_ROWS = "bucketml_shadow_rows_total"
SHADOW_AGREEING = "bucketml_shadow_agreeing_rows_total"
INFERENCE_ENDPOINTS = ("predict", "v2_infer", "v1_predict")


def _samples(predict_url: str) -> list | None:
    """The samples of one predict replica's /metrics, or None when it cannot be asked."""
    from prometheus_client.parser import text_string_to_metric_families  # only these commands parse metrics

    try:
        response = requests.get(predict_url.rstrip("/") + "/metrics", headers=auth_headers(), timeout=5)
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
    started. A replica is all the CLI can reach: behind a load balancer the others count their own."""
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
