"""What one predict replica saw of each version it served, written to the bucket for the monitor.

Per model version and pointer generation ("epoch": the pointer's generation when the requests
were answered, so a canary and its stable version are counted over the same period), a replica
counts its unpinned inference answers, their 5xx answers, a latency histogram, the predictions
in the reference's target bins, how often a canary agreed with the stable version on the same
rows, and the served inputs in the reference's bins over tumbling windows (the current and the
previous one, for drift). The request path only appends to a bounded queue; a background thread
bins what was queued and writes `monitoring/<model>/<version>/<replica>.json` every few
seconds, so every replica's figures reach the monitor and a file stays a few kilobytes whatever
the traffic.
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from bucketml import timestamps
from bucketml.monitoring.reference import Reference, category_of
from bucketml.storage import Storage, StorageError

log = logging.getLogger("bucketml.monitoring")

PREFIX = "monitoring/"
# Upper bounds of the latency buckets, in milliseconds (the last bucket is everything slower).
LATENCY_EDGES_MS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2500, 5000)
# Rows of scored requests waiting to be binned (at most a few tens of MB of inputs). Beyond it a
# request's inputs go uncounted until the next flush; `unbinned_requests` says how many.
QUEUE_ROWS_LIMIT = 200_000
BIN_SECONDS = 0.5


# (prediction counts in the target's bins, {column: counts in its bins}, rows): what a batch of
# scored requests adds to a version's figures.
Counted = tuple[np.ndarray | None, dict[str, np.ndarray], int]


def count_in_bins(reference: Reference | None, columns: dict[str, Any], predictions: Sequence[Any], rows: int) -> Counted:
    """Count served inputs and predictions into the reference's bins."""
    if reference is None:
        return None, {}, rows
    target = reference.target
    predicted = target.counts([category_of(p) for p in predictions] if target.kind == "category" else predictions)
    features = {bins.name: bins.counts(columns[bins.name]) for bins in reference.features if columns.get(bins.name) is not None}
    return predicted, features, rows


def replica_name(model: str, version: int, replica: str) -> str:
    return f"{PREFIX}{model}/{version}/{replica}.json"


def new_replica_id() -> str:
    """Unique per process: the pod's host name (Knative: the pod name) and the process id."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class VersionFigures:
    """One replica's figures for one version during one pointer generation."""

    def __init__(self, model: str, version: int, epoch: int, task: str, reference: Reference | None,
                 window_seconds: float):
        self.model, self.version, self.epoch, self.task = model, version, epoch, task
        self.reference = reference
        self.window_seconds = window_seconds
        self.started = timestamps.utc_now()
        self.requests = 0
        self.errors = 0
        self.latency = [0] * (len(LATENCY_EDGES_MS) + 1)
        self.predictions = np.zeros(reference.target.size, dtype=np.int64) if reference else None
        self.compared = {"rows": 0, "agreeing": 0, "squared_difference": 0.0, "stable_sum": 0.0, "stable_squares": 0.0}
        self.unbinned_requests = 0  # queued inputs dropped when the queue was full
        self.window: dict[str, Any] = self._new_window()
        self.previous_window: dict[str, Any] | None = None
        self.changed = True

    def _new_window(self) -> dict[str, Any]:
        reference = self.reference
        return {
            "started": timestamps.utc_now(), "started_monotonic": time.monotonic(), "rows": 0,
            "features": {b.name: np.zeros(b.size, dtype=np.int64) for b in (reference.features if reference else [])},
            "predictions": np.zeros(reference.target.size, dtype=np.int64) if reference else None,
        }

    def roll_window(self) -> None:
        if time.monotonic() - self.window["started_monotonic"] >= self.window_seconds:
            self.previous_window, self.window = self.window, self._new_window()
            self.changed = True

    def answered(self, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.latency[bisect.bisect_left(LATENCY_EDGES_MS, seconds * 1000.0)] += 1
        self.changed = True

    def add(self, counted: Counted) -> None:
        """Add counts made by `count_in_bins` (outside any lock)."""
        predictions, features, rows = counted
        if self.reference is None or predictions is None:
            return
        self.predictions += predictions
        self.window["predictions"] += predictions
        self.window["rows"] += rows
        for name, counts in features.items():
            self.window["features"][name] += counts
        self.changed = True

    def compared_with(self, mine: Sequence[Any], stable: Sequence[Any]) -> None:
        """A canary's predictions against the stable version's on the same rows."""
        figures = self.compared
        figures["rows"] += len(mine)
        if self.task == "classification":
            figures["agreeing"] += sum(1 for a, b in zip(mine, stable) if a == b)
        else:
            a, b = np.asarray(mine, dtype=np.float64), np.asarray(stable, dtype=np.float64)
            figures["squared_difference"] += float(np.sum((a - b) ** 2))
            figures["stable_sum"] += float(b.sum())
            figures["stable_squares"] += float(np.sum(b * b))
        self.changed = True

    def to_dict(self, replica: str) -> dict[str, Any]:
        def window(w: dict[str, Any] | None) -> dict[str, Any] | None:
            if w is None:
                return None
            return {"started": w["started"], "rows": w["rows"],
                    "features": {name: counts.tolist() for name, counts in w["features"].items()},
                    "predictions": w["predictions"].tolist() if w["predictions"] is not None else None}

        return {
            "model": self.model, "version": self.version, "epoch": self.epoch, "replica": replica, "task": self.task,
            "started": self.started, "written": timestamps.utc_now(), "requests": self.requests, "errors": self.errors,
            "latency_ms": {"edges": list(LATENCY_EDGES_MS), "counts": list(self.latency)},
            "predictions": self.predictions.tolist() if self.predictions is not None else None,
            "compared": dict(self.compared), "unbinned_requests": self.unbinned_requests,
            "window_seconds": self.window_seconds, "window": window(self.window),
            "previous_window": window(self.previous_window),
        }


class ReplicaFigures:
    """Every version this replica answered with, per pointer generation; flushed to the bucket."""

    def __init__(self, storage: Storage, flush_seconds: float, window_seconds: float, replica: str | None = None):
        self.storage = storage
        self.flush_seconds = flush_seconds
        self.window_seconds = window_seconds
        self.replica = replica or new_replica_id()
        self._figures: dict[tuple[str, int], VersionFigures] = {}
        self._queue: collections.deque = collections.deque()
        self._queued_rows = 0
        self._lock = threading.Lock()
        self._thread_pid: int | None = None
        self._unwritable: str | None = None  # why the last write failed, said once

    def _for(self, model: str, version: int, epoch: int, task: str, reference: Reference | None) -> VersionFigures:
        """The figures of (model, version), started afresh when the pointer moved since (a late
        item of an older generation is counted in a throwaway, never in the newer figures)."""
        key = (model, version)
        figures = self._figures.get(key)
        if figures is not None and figures.epoch > epoch:
            return VersionFigures(model, version, epoch, task, reference, self.window_seconds)
        if figures is None or figures.epoch != epoch:
            figures = self._figures[key] = VersionFigures(model, version, epoch, task, reference, self.window_seconds)
        return figures

    # --- the request path: cheap ---------------------------------------------------------
    def answered(self, model: str, version: int, epoch: int, task: str, reference: Reference | None, status: int,
                 seconds: float) -> None:
        with self._lock:
            self._for(model, version, epoch, task, reference).answered(status, seconds)

    def scored(self, model: str, version: int, epoch: int, task: str, reference: Reference | None,
               columns: Callable[[], dict[str, Any]], predictions: Sequence[Any], rows: int) -> None:
        """Queue a scored request's inputs (`columns()` gives {column: values}, called later, off
        the request path) and predictions for binning."""
        if reference is None:
            return
        if self._queued_rows + rows > QUEUE_ROWS_LIMIT:
            with self._lock:
                self._for(model, version, epoch, task, reference).unbinned_requests += 1
            return
        self._queued_rows += rows  # (racy under threads by a few rows: a bound, not an account)
        self._queue.append((model, version, epoch, task, reference, columns, predictions, rows))

    def compared(self, model: str, version: int, epoch: int, task: str, reference: Reference | None,
                 mine: Sequence[Any], stable: Sequence[Any]) -> None:
        with self._lock:
            self._for(model, version, epoch, task, reference).compared_with(mine, stable)

    # --- the background thread -----------------------------------------------------------
    def start(self) -> None:
        """Start the thread that bins and writes (threads do not survive a fork: call in the worker)."""
        if self._thread_pid == os.getpid():
            return
        self._thread_pid = os.getpid()
        threading.Thread(target=self._run, name="bucketml-monitoring", daemon=True).start()

    def _run(self) -> None:
        # Binned every BIN_SECONDS (small amounts of work, never a burst that holds the GIL for
        # long), written every flush_seconds.
        written = time.monotonic()
        while True:
            time.sleep(min(BIN_SECONDS, self.flush_seconds))
            try:
                if time.monotonic() - written >= self.flush_seconds:
                    written = time.monotonic()
                    self.flush()
                else:
                    self.bin_queued()
            except Exception:  # the bucket or a bad value: figures are best effort, serving goes on
                log.exception("writing the monitoring figures failed")

    def bin_queued(self) -> None:
        """Count the queued inputs into their bins, one numpy pass per column and version."""
        grouped: dict[tuple[str, int, int], tuple[str, Reference, list]] = {}
        while self._queue:
            model, version, epoch, task, reference, *scored = self._queue.popleft()
            self._queued_rows -= scored[-1]
            grouped.setdefault((model, version, epoch), (task, reference, []))[2].append(scored)
        for (model, version, epoch), (task, reference, items) in grouped.items():
            parts: dict[str, list] = {}
            predictions: list = []
            rows = 0
            for get_columns, predicted, count in items:
                for name, values in get_columns().items():
                    parts.setdefault(name, []).append(values)
                predictions.extend(predicted)
                rows += count
            # Counted before the lock is taken: the request path takes it for every answer.
            counted = count_in_bins(reference, {name: _joined(values) for name, values in parts.items()}, predictions, rows)
            with self._lock:
                figures = self._for(model, version, epoch, task, reference)
                figures.roll_window()
                figures.add(counted)

    def flush(self) -> None:
        """Bin what is queued and write the figures that changed since the last write."""
        self.bin_queued()
        with self._lock:
            for figures in self._figures.values():
                figures.roll_window()
            changed = [(f, f.to_dict(self.replica)) for f in self._figures.values() if f.changed]
            for figures, _ in changed:
                figures.changed = False
        for figures, data in changed:
            try:
                self.storage.write(replica_name(figures.model, figures.version, self.replica),
                                   json.dumps(data).encode(), content_type="application/json")
                self._unwritable = None
            except (StorageError, OSError) as exc:  # a bucket outage (a folder gone, a server down): serving goes on
                figures.changed = True  # written next time
                if self._unwritable != str(exc):  # once per cause, not every flush
                    self._unwritable = str(exc)
                    log.warning("could not write the monitoring figures of %s version %s (tried again every %gs): %s",
                                figures.model, figures.version, self.flush_seconds, exc)


def _joined(parts: list) -> np.ndarray | list:
    """One column's values from several requests: arrays (the numbers-only path) stay arrays."""
    if all(isinstance(part, np.ndarray) for part in parts):
        return np.concatenate(parts) if parts else np.empty(0)
    joined: list = []
    for part in parts:
        joined.extend(part.tolist() if isinstance(part, np.ndarray) else part)
    return joined
