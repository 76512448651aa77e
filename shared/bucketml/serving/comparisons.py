"""Second opinions: a shadow scoring what the current version answered, or the stable version
scoring what a canary answered, off the request path and in micro-batches.

An answered request is queued with what was answered; one background thread takes whatever is
queued every few milliseconds and scores it per version in ONE onnxruntime call (the rows of
many requests together), then hands each request's predictions, or its failure, to the callback
it was queued with. Scoring single-row requests one by one costs about as much again as the
answers (mostly onnxruntime's per-call overhead); in batches the second opinion costs a fraction
of that, and it never delays or changes an answer: the answer was sent before it was queued.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable

from bucketml.encoding import number_matrix, rows_from_features, rows_from_records
from bucketml.serving.runtime import OnnxModel

log = logging.getLogger("bucketml.serving")

PAUSE_SECONDS = 0.02  # how long the thread lets requests gather before it scores them
QUEUE_ROWS_LIMIT = 100_000  # rows waiting; beyond it a request is not compared (its callback hears so)


@dataclasses.dataclass
class Comparison:
    other: OnnxModel  # the version giving the second opinion
    body: dict  # the /predict body as parsed for the answer
    has_booleans: bool  # JSON true/false in the body: the columnar path reads them as numbers
    answered: list  # the predictions sent
    done: Callable[[list | None], None]  # called with the other version's predictions, or None if it could not score


class Comparisons:
    def __init__(self, pause_seconds: float = PAUSE_SECONDS):
        self.pause_seconds = pause_seconds
        self._queue: collections.deque[Comparison] = collections.deque()
        self._queued_rows = 0
        self._thread_pid: int | None = None
        self._lock = threading.Lock()

    def submit(self, comparison: Comparison) -> None:
        """Queue a comparison (after the answer was sent); starts the thread in this process."""
        rows = len(comparison.answered)
        if self._queued_rows + rows > QUEUE_ROWS_LIMIT:
            comparison.done(None)
            return
        self._queued_rows += rows
        self._queue.append(comparison)
        if self._thread_pid != os.getpid():
            with self._lock:
                if self._thread_pid != os.getpid():  # threads do not survive a fork: one per serving process
                    self._thread_pid = os.getpid()
                    threading.Thread(target=self._run, name="bucketml-comparisons", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.pause_seconds)
            try:
                self.drain()
            except Exception:  # a second opinion must never take the serving process down
                log.exception("comparing answers failed")

    def drain(self) -> None:
        """Score everything queued now, one batch per version."""
        batches: dict[int, list[Comparison]] = {}
        while self._queue:
            comparison = self._queue.popleft()
            self._queued_rows -= len(comparison.answered)
            batches.setdefault(id(comparison.other), []).append(comparison)
        for comparisons in batches.values():
            _score_batch(comparisons)


def _rows(other: OnnxModel, body: dict) -> list:
    if "records" in body:
        return rows_from_records(other.columns, body["records"], other.ignored)
    return rows_from_features(other.columns, body["features"])


def _score_batch(comparisons: list[Comparison]) -> None:
    other = comparisons[0].other
    ready: list[tuple[Comparison, list]] = []
    for comparison in comparisons:
        try:  # the other version's columns may differ: such a request is its own failure
            ready.append((comparison, _rows(other, comparison.body)))
        except Exception:
            comparison.done(None)
    if not ready:
        return
    try:
        predictions = _predict(other, [row for _, rows in ready for row in rows],
                               any(c.has_booleans for c, _ in ready))
    except Exception:  # one bad value fails the batch: score each request alone to tell which
        for comparison, rows in ready:
            try:
                comparison.done(_predict(other, rows, comparison.has_booleans))
            except Exception:
                comparison.done(None)
        return
    start = 0
    for comparison, rows in ready:
        comparison.done(predictions[start:start + len(rows)])
        start += len(rows)


def _predict(other: OnnxModel, rows: list, has_booleans: bool) -> list:
    """As the answer was computed (service.PredictService._score): the columnar path when it applies."""
    if other.numbers_only and not has_booleans:
        matrix = number_matrix(rows, len(other.columns))
        if matrix is not None:
            return other.predict_matrix(matrix)["predictions"]
    values: dict[str, list[Any]] = {c["name"]: [row[j] for row in rows] for j, c in enumerate(other.columns)}
    return other.predict(values, len(rows))["predictions"]
