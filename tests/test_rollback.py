"""Moving the current version by hand: `bucketml rollback` and `bucketml promote` move the
pointer with compare-and-swap, and every predict replica serves the new choice within seconds,
whether or not the model.published event reaches it."""

from __future__ import annotations

import os
import subprocess
import time

from helpers import BUCKETML, churn_frame, free_port, predict_server, publish, wait_until

from bucketml.registry import Registry
from bucketml.storage import LocalStorage


def cli(bucket, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BUCKETML_BUCKET=str(bucket), BUCKETML_BROKER_URL=f"http://127.0.0.1:{free_port()}")
    return subprocess.run([BUCKETML, *args], capture_output=True, text=True, env=env, timeout=60)


def test_rollback_and_promote_reach_every_replica(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    publish(storage, "churn", churn_frame(seed=1), "first.csv")
    publish(storage, "churn", churn_frame(seed=2), "second.csv")
    with predict_server(storage.root, tmp_path, 0.5) as one, predict_server(storage.root, tmp_path, 0.5) as two:
        replicas = (one, two)
        wait_until(lambda: all(r.version_of("churn") == 2 for r in replicas), "both replicas on version 2")

        rolled = cli(storage.root, "rollback", "churn")
        assert rolled.returncode == 0, rolled.stderr
        assert "churn: current version 2 -> 1" in rolled.stdout
        assert "next poll" in rolled.stdout  # no broker running: it says how replicas still learn
        started = time.monotonic()
        wait_until(lambda: all(r.version_of("churn") == 1 for r in replicas), "both replicas on version 1", timeout=5)
        assert time.monotonic() - started < 5
        record = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}
        assert all(r.predict({"model": "churn", "records": [record]}).json()["version"] == 1 for r in replicas)
        pointer = Registry(storage).current("churn")
        assert pointer.version == 1 and pointer.data["previous"] == 2 and "rolled back" in pointer.data["reason"]

        promoted = cli(storage.root, "promote", "churn", "2")
        assert promoted.returncode == 0 and "churn: current version 1 -> 2" in promoted.stdout
        wait_until(lambda: all(r.version_of("churn") == 2 for r in replicas), "both replicas back on version 2", timeout=5)

        again = cli(storage.root, "promote", "churn", "2")
        assert again.returncode == 0 and "already current" in again.stdout


def test_rollback_errors_are_one_line_and_change_nothing(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    publish(storage, "solo", churn_frame(seed=3), "only.csv")
    for args, expected in (
        (("rollback", "solo"), "no version before 1"),
        (("promote", "solo", "7"), "no version 7"),
        (("rollback", "ghost"), "no current version"),
    ):
        result = cli(storage.root, *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert Registry(storage).current("solo").version == 1
