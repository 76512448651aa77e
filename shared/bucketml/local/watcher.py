"""Local stand-in for GCS notifications: a file that lands in `<bucket>/datasets/` (a dataset)
or `<bucket>/batch/` (a file to score) fires the `google.cloud.storage.object.v1.finalized`
event GCS would send, posted to the broker. The platform's own writes (prepared/, models/,
predictions/, ...) are not announced, as the documented GCS notifications do not cover them.

No upload is lost: file-system events only speed things up; a periodic rescan of the bucket
finds anything they missed (including files that arrived while the watcher was down), and an
object generation is recorded as announced only after the broker accepted its event.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from pathlib import Path

import click
import requests
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from bucketml.contracts import events
from bucketml import logs
from bucketml.storage import ObjectInfo, StorageError
from bucketml.storage.local import LocalStorage

log = logging.getLogger("bucketml.watcher")

UPLOAD_PREFIXES = ("datasets/", "batch/")  # the folders users upload into
SETTLE_SECONDS = 0.5  # a file must be unchanged this long before it counts as finalized
RESCAN_SECONDS = 2.0


class Announced:
    """Which (object, generation) pairs the broker has accepted; survives restarts."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS announced (name TEXT, generation INTEGER, event_id TEXT, at REAL,"
            " PRIMARY KEY (name, generation))"
        )
        self._lock = threading.Lock()

    def contains(self, name: str, generation: int) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM announced WHERE name=? AND generation=?", (name, generation)).fetchone()
        return row is not None

    def add(self, name: str, generation: int, event_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO announced VALUES (?, ?, ?, ?)", (name, generation, event_id, time.time()))


class BucketWatcher(FileSystemEventHandler):
    def __init__(self, storage: LocalStorage, broker_url: str, announced: Announced):
        self.storage = storage
        self.broker_url = broker_url
        self.announced = announced
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_scan = 0.0
        self._session = requests.Session()

    def _scan_soon(self, delay: float) -> None:
        self._next_scan = min(self._next_scan, time.monotonic() + delay)
        self._wake.set()

    # watchdog callback (its own thread): scan once the file has had time to settle.
    def on_any_event(self, event) -> None:
        if not event.is_directory:
            self._scan_soon(SETTLE_SECONDS + 0.05)

    def scan(self) -> None:
        """Announce every settled upload not announced yet."""
        try:
            objects = [info for prefix in UPLOAD_PREFIXES for info in self.storage.list(prefix)]
        except StorageError as exc:
            log.error("cannot list the bucket: %s", exc)
            return
        now_us = time.time() * 1e6
        for info in objects:
            if self.announced.contains(info.name, info.generation):
                continue
            if now_us - info.generation < SETTLE_SECONDS * 1e6:
                self._scan_soon(SETTLE_SECONDS)  # still being written
                continue
            self.announce(info)

    def announce(self, info: ObjectInfo) -> None:
        event_id = events.finalized_event_id(info.name, info.generation)  # a re-announcement is recognisable
        event = events.finalized_event(self.storage.bucket_name, info.event_data(), id_=event_id)
        try:
            response = events.post(self.broker_url, event, self._session)
        except requests.RequestException as exc:
            log.warning("broker unreachable, will retry %s: %s", info.name, exc)
            return
        if response.status_code >= 300:
            log.warning("broker refused %s (HTTP %s): %s", info.name, response.status_code, response.text[:200])
            return
        self.announced.add(info.name, info.generation, event_id)
        log.info("finalized %s generation %s (%s bytes)", info.name, info.generation, info.size)

    def run(self) -> None:
        root = Path(self.storage.url)
        observer = Observer()
        for prefix in UPLOAD_PREFIXES:
            (root / prefix).mkdir(parents=True, exist_ok=True)
            observer.schedule(self, str(root / prefix), recursive=True)
        observer.start()
        log.info("watching %s", " and ".join(str(root / prefix.rstrip("/")) for prefix in UPLOAD_PREFIXES))
        try:
            while not self._stop.is_set():
                self._next_scan = time.monotonic() + RESCAN_SECONDS
                self.scan()
                while not self._stop.is_set() and (remaining := self._next_scan - time.monotonic()) > 0:
                    self._wake.wait(remaining)
                    self._wake.clear()
        finally:
            observer.stop()
            observer.join(timeout=5)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bucket", required=True, help="the local bucket folder")
@click.option("--broker", required=True, help="broker ingress URL")
@click.option("--db", required=True, help="SQLite file recording announced uploads")
def main(bucket: str, broker: str, db: str) -> None:
    """Announce each upload to the local bucket's datasets/ and batch/ to the broker, as GCS would
    (`python -m bucketml.local.watcher`)."""
    logs.configure()
    watcher = BucketWatcher(LocalStorage(bucket), broker, Announced(Path(db)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: watcher.stop())
    watcher.run()


if __name__ == "__main__":
    main()
