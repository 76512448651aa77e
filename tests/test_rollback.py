"""Moving the current version by hand: `bucketml rollback` and `bucketml promote` move the
pointer with compare-and-swap, and every predict replica serves the new choice within seconds,
whether or not the model.published event reaches it; a version that cannot load is never
swapped in."""

from __future__ import annotations

import os
import subprocess
import time

from helpers import BUCKETML, churn_frame, free_port, predict_server, publish, wait_until

from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage

RECORD = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}


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
        assert all(r.predict({"model": "churn", "records": [RECORD]}).json()["version"] == 1 for r in replicas)
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


def test_a_current_version_that_cannot_load_is_not_swapped_in(tmp_path):
    """A broken model.onnx made current (a bad write, a bug): replicas keep the old version,
    say why in readiness, and take the next good version as usual."""
    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    publish(storage, "churn", churn_frame(seed=0), "a.csv", {"algorithms": "logistic_regression"})
    with predict_server(storage.root, tmp_path, poll_seconds=0.2) as server:
        wait_until(lambda: server.version_of("churn") == 1, "version 1 to be served")
        good = server.predict({"model": "churn", "records": [RECORD]}).json()

        card = registry.card("churn", 1)
        broken = registry.register("churn", lambda version: b"this is not an ONNX model", card)
        registry.move_pointer("churn", broken, reason="a broken write, for the test")
        wait_until(lambda: "churn" in server.get("/v2/health/ready").json().get("errors", {}), "the load failure to show")
        ready = server.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.json()["models"] == {"churn": 1}
        assert f"version {broken}" in ready.json()["errors"]["churn"]
        assert "could not be loaded" in server.get("/v2/models/churn/ready").json()["error"]
        for _ in range(20):  # every request still answered, by version 1
            answer = server.predict({"model": "churn", "records": [RECORD]})
            assert answer.status_code == 200 and answer.json() == good

        fixed = publish(storage, "churn", churn_frame(seed=1), "b.csv", {"algorithms": "logistic_regression"})
        wait_until(lambda: server.version_of("churn") == fixed, "the next good version to be served")
        assert "errors" not in server.get("/v2/health/ready").json()
    log = server.log.read_text()
    assert log.count("could not load the current version of churn") == 1, log  # once, not once per poll
