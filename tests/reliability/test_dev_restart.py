"""`bucketml dev` itself killed with SIGKILL: its parts run in their own sessions and live on,
holding their ports. The next `bucketml dev` on the same state folder stops them and starts
afresh; a second `bucketml dev` beside a running one is refused instead of fighting it."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import requests
from platform_support import alive_in_group, parts

from helpers import BUCKETML, free_ports, running_platform, wait_until



def start_dev(root: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, Path]:
    """`bucketml dev` as helpers.running_platform starts it, for a test that kills it itself."""
    log = root / "first-dev.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [BUCKETML, "dev", "--bucket", "bucket", "--state-dir", "state",
             *[arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]],
            cwd=root, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, BUCKETML_POLL_SECONDS="0.5"),
        )
    wait_until(lambda: "ready; press Ctrl-C" in log.read_text() or process.poll() is not None, "bucketml dev to be ready",
               timeout=60)
    assert process.poll() is None, log.read_text()
    return process, log


def test_the_next_start_stops_what_a_killed_dev_left_running(tmp_path):
    ports = free_ports()
    first, _ = start_dev(tmp_path, ports)
    groups = {name: pids[0] for name, pids in parts(first.pid).items()}
    try:
        assert set(groups) == {"broker", "watcher", "preprocess", "train", "predict", "deadletter", "monitor", "ping",
                               "batch", "console"}
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # The parts outlive it and keep answering: this is what the next start must clean up.
        assert requests.get(f"http://127.0.0.1:{ports['broker']}/healthz", timeout=5).status_code == 200
        assert all(alive_in_group(group) for group in groups.values())
        with running_platform(tmp_path, ports) as second:
            log = second["log"].read_text()
            for name, group in groups.items():
                assert f"stopping {name} (process group {group}), left running by a `bucketml dev` that did not stop" in log
            assert not any(alive_in_group(group) for group in groups.values())
            assert requests.get(second["predict"] + "/v2/health/live", timeout=5).status_code == 200
            fresh = {name: pids[0] for name, pids in parts(second["process"].pid).items()}
            assert set(fresh) == set(groups) and not set(fresh.values()) & set(groups.values())
        # running_platform's exit asserted that this `bucketml dev` stopped cleanly (Ctrl-C).
        assert not (tmp_path / "state" / "dev.pids.json").exists()
    finally:
        for group in groups.values():  # whatever the outcome, nothing of the first one lives on
            if alive_in_group(group):
                os.killpg(group, signal.SIGKILL)


def test_a_second_dev_on_the_same_state_is_refused(tmp_path):
    with running_platform(tmp_path, free_ports()) as first:
        other = free_ports()
        second = subprocess.run(
            [BUCKETML, "dev", "--bucket", "bucket", "--state-dir", "state",
             *[arg for name, port in other.items() for arg in (f"--{name}-port", str(port))]],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=dict(os.environ),
        )
        assert second.returncode == 1
        assert f"another `bucketml dev` (pid {first['process'].pid}) is running" in second.stderr + second.stdout
        # The running one was not disturbed.
        wait_until(lambda: requests.get(first["broker"] + "/healthz", timeout=5).status_code == 200, "the first broker")
        assert first["process"].poll() is None
