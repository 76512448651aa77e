"""Decisions from the replicas' figures: promote or roll back a canary, and which served inputs
drifted from the training data. Pure functions over the files the replicas write
(monitoring.aggregates), so the monitor and `bucketml drift` compute the same figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

from bucketml.monitoring.aggregates import LATENCY_EDGES_MS
from bucketml.monitoring.reference import Reference, psi, psi_between

# The tolerances a canary is held to (docs/architecture.md, "Automatic canary decisions").
ERROR_RATE_TOLERANCE = 0.01  # its share of 5xx answers may exceed the stable version's by 1 point
# Its p99 latency may be 50% above the stable version's, or 10 ms above it, whichever allows more:
# the histogram's buckets are coarse, and at a few hundred requests a p99 is the third-slowest
# answer, which one pause of the process can move by milliseconds.
P99_RELATIVE_TOLERANCE = 1.5
P99_ABSOLUTE_TOLERANCE_MS = 10.0
PREDICTION_PSI_LIMIT = 0.2  # its predictions' spread against the stable version's over the same period
MIN_AGREEMENT = {"classification": 0.8, "regression": 0.5}  # same label / R² of its predictions against the stable version's
MIN_COMPARED_ROWS = 50  # rows scored by both before agreement counts
MIN_DRIFT_ROWS = 100  # served rows in the window before drift is judged


@dataclasses.dataclass
class Totals:
    """Several replicas' figures for one version, summed."""

    replicas: int = 0
    requests: int = 0
    errors: int = 0
    latency: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    predictions: np.ndarray | None = None
    compared: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "rows": 0, "agreeing": 0, "squared_difference": 0.0, "stable_sum": 0.0, "stable_squares": 0.0})
    window_rows: int = 0
    window_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    window_predictions: np.ndarray | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_ms(self) -> float | None:
        """The upper bound of the latency bucket holding the 99th percentile (None: no request;
        twice the last bound when it is in the open-ended bucket)."""
        total = sum(self.latency)
        if not total:
            return None
        cumulative = np.cumsum(self.latency)
        index = int(np.searchsorted(cumulative, 0.99 * total, side="left"))
        return float(LATENCY_EDGES_MS[index]) if index < len(LATENCY_EDGES_MS) else 2.0 * LATENCY_EDGES_MS[-1]

    def agreement(self, task: str) -> float | None:
        """Classification: the share of compared rows given the stable version's label.
        Regression: R² of the canary's predictions as estimates of the stable version's."""
        rows = self.compared["rows"]
        if rows < MIN_COMPARED_ROWS:
            return None
        if task == "classification":
            return self.compared["agreeing"] / rows
        spread = self.compared["stable_squares"] - self.compared["stable_sum"] ** 2 / rows
        if spread <= 0:
            return 1.0 if self.compared["squared_difference"] <= 1e-12 else 0.0
        return 1.0 - self.compared["squared_difference"] / spread


def _add(total: np.ndarray | None, counts: list | None) -> np.ndarray | None:
    if counts is None:
        return total
    counts_array = np.asarray(counts, dtype=np.int64)
    if total is None:
        return counts_array
    return total + counts_array if total.shape == counts_array.shape else total  # bins of another reference: skipped


def merge(files: Iterable[dict[str, Any]]) -> Totals:
    """Sum the figures of replica files (those of one version and pointer generation)."""
    totals = Totals()
    for data in files:
        totals.replicas += 1
        totals.requests += int(data.get("requests", 0))
        totals.errors += int(data.get("errors", 0))
        latency = (data.get("latency_ms") or {}).get("counts") or []
        if len(latency) == len(totals.latency):
            totals.latency = [a + int(b) for a, b in zip(totals.latency, latency)]
        totals.predictions = _add(totals.predictions, data.get("predictions"))
        for key in totals.compared:
            totals.compared[key] += (data.get("compared") or {}).get(key, 0)
        for window in (data.get("window"), data.get("previous_window")):
            if not window:
                continue
            totals.window_rows += int(window.get("rows", 0))
            totals.window_predictions = _add(totals.window_predictions, window.get("predictions"))
            for name, counts in (window.get("features") or {}).items():
                added = _add(totals.window_features.get(name), counts)
                if added is not None:
                    totals.window_features[name] = added
    return totals


@dataclasses.dataclass
class CanaryDecision:
    step: str  # "wait", "promote" or "roll_back"
    reasons: list[str]
    figures: dict[str, Any]


def decide_canary(stable: Totals, canary: Totals, task: str, min_requests: int) -> CanaryDecision:
    """Promote when the canary answered `min_requests` unpinned requests and is no worse than the
    stable version over the same period: 5xx share, p99 latency (within the tolerances above),
    the spread of its predictions, and, where both scored the same rows, agreement."""
    agreement = canary.agreement(task)
    prediction_psi = (psi_between(stable.predictions, canary.predictions)
                      if stable.predictions is not None and canary.predictions is not None else None)
    figures = {
        "requests": {"stable": stable.requests, "canary": canary.requests},
        "errors": {"stable": stable.errors, "canary": canary.errors},
        "p99_ms": {"stable": stable.p99_ms, "canary": canary.p99_ms},
        "compared_rows": int(canary.compared["rows"]),
        "agreement": None if agreement is None else round(agreement, 4),
        "prediction_psi": None if prediction_psi is None else round(prediction_psi, 4),
        "replicas": max(stable.replicas, canary.replicas),
        "min_requests": min_requests,
    }
    if canary.requests < min_requests:
        return CanaryDecision("wait", [f"the canary answered {canary.requests} of the {min_requests} requests "
                                       "it needs before a decision"], figures)
    failures = []
    if canary.error_rate > stable.error_rate + ERROR_RATE_TOLERANCE:
        failures.append(f"its 5xx share {canary.error_rate:.2%} is above the stable version's {stable.error_rate:.2%} "
                        f"by more than {ERROR_RATE_TOLERANCE:.0%}")
    if canary.p99_ms is not None and stable.p99_ms is not None:
        allowed = max(stable.p99_ms * P99_RELATIVE_TOLERANCE, stable.p99_ms + P99_ABSOLUTE_TOLERANCE_MS)
        if canary.p99_ms > allowed:
            failures.append(f"its p99 latency {canary.p99_ms:g} ms is above the {allowed:g} ms allowed "
                            f"(the stable version's {stable.p99_ms:g} ms)")
    if prediction_psi is not None and prediction_psi > PREDICTION_PSI_LIMIT:
        failures.append(f"its predictions are spread differently from the stable version's (PSI {prediction_psi:.3f} "
                        f"> {PREDICTION_PSI_LIMIT})")
    if agreement is not None and agreement < MIN_AGREEMENT[task]:
        what = "gave the stable version's label on" if task == "classification" else "had an R² against the stable version's predictions of"
        failures.append(f"it {what} {agreement:.2%} of {int(canary.compared['rows'])} rows, below {MIN_AGREEMENT[task]:.0%}"
                        if task == "classification" else
                        f"it {what} {agreement:.3f} on {int(canary.compared['rows'])} rows, below {MIN_AGREEMENT[task]}")
    if failures:
        return CanaryDecision("roll_back", failures, figures)
    return CanaryDecision("promote", [f"after {canary.requests} requests it is no worse than the stable version "
                                      "(5xx share, p99 latency, predictions, agreement)"], figures)


@dataclasses.dataclass
class Drift:
    rows: int
    features: dict[str, float | None]  # column -> PSI of the window against the training rows
    prediction_psi: float | None
    threshold: float

    @property
    def judged(self) -> bool:
        return self.rows >= MIN_DRIFT_ROWS

    @property
    def drifting(self) -> list[str]:
        """The columns whose PSI exceeds the threshold, most shifted first."""
        if not self.judged:
            return []
        over = [(value, name) for name, value in self.features.items() if value is not None and value > self.threshold]
        return [name for _, name in sorted(over, reverse=True)]


def drift(reference: Reference, totals: Totals, threshold: float) -> Drift:
    """PSI per input column (and of the predictions against the training target) over the
    replicas' current and previous windows."""
    features = {}
    for bins in reference.features:
        counts = totals.window_features.get(bins.name)
        value = psi(bins.shares, counts) if counts is not None else None
        features[bins.name] = None if value is None else round(value, 4)
    prediction = psi(reference.target.shares, totals.window_predictions) if totals.window_predictions is not None else None
    return Drift(totals.window_rows, features, None if prediction is None else round(prediction, 4), threshold)
