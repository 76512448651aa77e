"""Durable event log and delivery queue in SQLite, so a restart loses nothing it accepted."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from bucketml.contracts.events import MODEL_ATTRIBUTE
from bucketml.timestamps import utc_now

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
# What a delivery is for: the Trigger's subscriber, or (once that failed for good) its
# dead-letter sink. The kind column says which; before it existed the kind was spelled as a
# suffix of the trigger name, which is still how the HTTP API and the log show it.
SUBSCRIBER, DEAD_LETTER_SINK = "subscriber", "dead-letter-sink"
DEAD_LETTER_SUFFIX = "/" + DEAD_LETTER_SINK

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    attributes TEXT NOT NULL,
    data BLOB NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_type ON events (type, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    event_seq INTEGER NOT NULL REFERENCES events (seq),
    trigger_name TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT,
    updated_at TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'subscriber',
    last_status INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries (event_seq);
"""


class StoreClosed(RuntimeError):
    """The broker is shutting down; whatever was not recorded stays pending."""


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    attributes: dict[str, Any]
    data: bytes
    received_at: str


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    event_seq: int
    trigger: str
    subscriber: str
    status: str
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    updated_at: str
    kind: str = SUBSCRIBER
    last_status: int | None = None  # the HTTP status of the last failed attempt, when it got one

    @property
    def to_dead_letter_sink(self) -> bool:
        return self.kind == DEAD_LETTER_SINK

    @property
    def label(self) -> str:
        """The delivery's name in the HTTP API and the log: the trigger, marked when it is the
        delivery to the trigger's dead-letter sink."""
        return self.trigger + DEAD_LETTER_SUFFIX if self.to_dead_letter_sink else self.trigger


@dataclass(frozen=True)
class NewEvent:
    """An accepted event and the (trigger, subscriber URL) pairs it must reach."""

    attributes: Mapping[str, Any]
    data: bytes
    routes: Iterable[tuple[str, str]]


class Store:
    """One connection behind a lock: the ingress threads and delivery workers share it safely."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit, so "commit, then answer" is visible in the code.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._closed = False
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")  # another process (the CLI) may read it
        self._db.executescript(_SCHEMA)
        self._upgrade()

    def _upgrade(self) -> None:
        """Add the columns a broker.sqlite from before `kind` and `last_status` lacks, filled in
        from what that release wrote: the trigger-name suffix and the "HTTP <status>" error text."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(deliveries)")}
        if {"kind", "last_status"} <= columns:
            return
        with self._transaction():
            if "kind" not in columns:
                self._db.execute("ALTER TABLE deliveries ADD COLUMN kind TEXT NOT NULL DEFAULT 'subscriber'")
                self._db.execute(
                    "UPDATE deliveries SET kind = ?, trigger_name = substr(trigger_name, 1, length(trigger_name) - ?)"
                    " WHERE substr(trigger_name, -?) = ?",
                    (DEAD_LETTER_SINK, len(DEAD_LETTER_SUFFIX), len(DEAD_LETTER_SUFFIX), DEAD_LETTER_SUFFIX),
                )
            if "last_status" not in columns:
                self._db.execute("ALTER TABLE deliveries ADD COLUMN last_status INTEGER")
                self._db.execute(
                    "UPDATE deliveries SET last_status = CAST(substr(last_error, 6, 3) AS INTEGER)"
                    " WHERE last_error GLOB 'HTTP [0-9][0-9][0-9]*'"
                )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def add_event(self, event: NewEvent) -> int:
        """Insert the event and its pending deliveries in one transaction; return its seq once committed."""
        with self._transaction():
            return self._insert(event, utc_now())

    def due(self, now: float, limit: int, exclude: Iterable[int] = ()) -> list[tuple[DeliveryRecord, StoredEvent]]:
        """Pending deliveries whose time has come, oldest first, skipping those already in flight."""
        excluded = list(exclude)
        sql = (
            "SELECT d.*, e.attributes, e.data, e.received_at FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            f" WHERE d.status = 'pending' AND d.next_attempt_at <= ? AND d.id NOT IN ({','.join('?' * len(excluded))})"
            " ORDER BY d.next_attempt_at, d.id LIMIT ?"
        )
        rows = self._query(sql, (now, *excluded, limit))
        return [(_delivery(row), _event(row, row["event_seq"])) for row in rows]

    def next_attempt_at(self, exclude: Iterable[int] = ()) -> float | None:
        excluded = list(exclude)
        sql = f"SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending' AND id NOT IN ({','.join('?' * len(excluded))})"
        return self._query(sql, excluded)[0][0]

    def mark_delivered(self, delivery_id: int, subscriber: str, reply: NewEvent | None = None) -> int | None:
        """Record success; a reply event is stored in the same transaction, so it is never lost or doubled."""
        with self._transaction():
            now = utc_now()
            self._update(delivery_id, subscriber, DELIVERED, None, None, now)
            return self._insert(reply, now) if reply else None

    def mark_retry(self, delivery_id: int, subscriber: str, at: float, error: str, status: int | None = None) -> None:
        with self._transaction():
            self._update(delivery_id, subscriber, PENDING, at, error, utc_now(), status)

    def mark_dead(self, delivery_id: int, subscriber: str, error: str, status: int | None = None,
                  dead_letter_sink: str | None = None) -> None:
        """Give up on a delivery; with `dead_letter_sink` (a URL) the event is queued for the same
        trigger's dead-letter sink in the same transaction, so it cannot fall between the two."""
        with self._transaction():
            now = utc_now()
            self._update(delivery_id, subscriber, DEAD, None, error, now, status)
            if dead_letter_sink:
                self._db.execute(
                    "INSERT INTO deliveries (event_seq, trigger_name, subscriber, status, attempts, next_attempt_at,"
                    " updated_at, kind) SELECT event_seq, trigger_name, ?, 'pending', 0, 0, ?, ? FROM deliveries WHERE id = ?",
                    (dead_letter_sink, now, DEAD_LETTER_SINK, delivery_id),
                )

    def list_events(self, *, after: int | None = None, type_: str | None = None, model: str | None = None, limit: int = 100,
                    newest_first: bool = False, before: int | None = None) -> list[StoredEvent]:
        clauses, params = [], []
        if after is not None:
            clauses.append("seq > ?")
            params.append(after)
        if before is not None:
            clauses.append("seq < ?")
            params.append(before)
        if type_:
            clauses.append("type = ?")
            params.append(type_)
        if model:
            clauses.append(f"json_extract(attributes, '$.{MODEL_ATTRIBUTE}') = ?")
            params.append(model)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        rows = self._query(f"SELECT * FROM events {where} ORDER BY seq {order} LIMIT ?", (*params, limit))
        return [_event(row, row["seq"]) for row in rows]

    def get_event(self, seq: int) -> tuple[StoredEvent, list[DeliveryRecord]] | None:
        rows = self._query("SELECT * FROM events WHERE seq = ?", (seq,))
        if not rows:
            return None
        deliveries = self._query("SELECT * FROM deliveries WHERE event_seq = ? ORDER BY id", (seq,))
        return _event(rows[0], seq), [_delivery(row) for row in deliveries]

    def dead_letters(self, limit: int = 100) -> list[tuple[DeliveryRecord, StoredEvent]]:
        rows = self._query(
            "SELECT d.*, e.attributes, e.data, e.received_at FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " WHERE d.status = 'dead' ORDER BY d.updated_at, d.id LIMIT ?",
            (limit,),
        )
        return [(_delivery(row), _event(row, row["event_seq"])) for row in rows]

    def _insert(self, event: NewEvent, now: str) -> int:
        attrs = event.attributes
        cursor = self._db.execute(
            "INSERT INTO events (id, source, type, subject, attributes, data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (attrs["id"], attrs["source"], attrs["type"], attrs.get("subject"), json.dumps(dict(attrs)), event.data, now),
        )
        seq = cursor.lastrowid
        self._db.executemany(
            "INSERT INTO deliveries (event_seq, trigger_name, subscriber, status, attempts, next_attempt_at, updated_at)"
            " VALUES (?, ?, ?, 'pending', 0, 0, ?)",
            [(seq, trigger, subscriber, now) for trigger, subscriber in event.routes],
        )
        return seq

    def _update(self, delivery_id: int, subscriber: str, status: str, at: float | None, error: str | None, now: str,
                http_status: int | None = None) -> None:
        # A success keeps the last failure's error and status; a failure replaces both.
        self._db.execute(
            "UPDATE deliveries SET status = ?, subscriber = ?, attempts = attempts + 1, next_attempt_at = ?,"
            " last_error = COALESCE(?, last_error), last_status = CASE WHEN ? IS NULL THEN last_status ELSE ? END,"
            " updated_at = ? WHERE id = ?",
            (status, subscriber, at, error, error, http_status, now, delivery_id),
        )

    def _query(self, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        with self._lock:
            self._check_open()
            return self._db.execute(sql, tuple(params)).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the event store is closed")


def _event(row: sqlite3.Row, seq: int) -> StoredEvent:
    return StoredEvent(seq, json.loads(row["attributes"]), bytes(row["data"]), row["received_at"])


def _delivery(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        row["id"], row["event_seq"], row["trigger_name"], row["subscriber"], row["status"],
        row["attempts"], row["next_attempt_at"], row["last_error"], row["updated_at"], row["kind"], row["last_status"],
    )
