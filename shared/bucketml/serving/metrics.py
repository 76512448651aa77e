"""The predict function's Prometheus metrics (served at /metrics)."""

from __future__ import annotations

import functools

import prometheus_client

REQUESTS = prometheus_client.Counter(
    "bucketml_predict_requests", "Requests by route, HTTP status and the model version that answered.",
    ["endpoint", "code", "model", "version"],
)
LATENCY = prometheus_client.Histogram(
    "bucketml_predict_request_seconds", "Time from request to response inside the function, by route.",
    ["endpoint"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ROWS = prometheus_client.Counter("bucketml_predict_rows", "Rows scored, by model version.", ["model", "version"])
# A shadow version's agreement with the answers sent: agreeing / compared is its agreement rate.
SHADOW_ROWS = prometheus_client.Counter(
    "bucketml_shadow_rows", "Rows a shadow version scored after the current version answered them.", ["model", "version"],
)
SHADOW_AGREEING = prometheus_client.Counter(
    "bucketml_shadow_agreeing_rows", "Of those rows, the ones where the shadow's prediction agreed with the answer.",
    ["model", "version"],
)
SHADOW_FAILED = prometheus_client.Counter(
    "bucketml_shadow_failed_requests", "Requests the shadow version could not score (its columns differ, say).",
    ["model", "version"],
)


@functools.lru_cache(maxsize=4096)
def labelled(family, *labels: str):
    """The labelled child of a metric family: looked up once, not on every request."""
    return family.labels(*labels)
