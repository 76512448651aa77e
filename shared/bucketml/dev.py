"""`bucketml dev`: the whole platform on one machine, each part a real process on loopback.

Processes: the broker (routes by infra/knative), the bucket watcher (local GCS notifications)
and the three functions under functions-framework. Their output is merged into one log, a
part that dies is restarted, and Ctrl-C stops everything; undelivered events stay in the
broker's SQLite file and are delivered after the next start.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import requests

from . import config

RESTART_DELAY = 1.0
STOP_TIMEOUT = 10.0
COLOURS = {"broker": 35, "watcher": 36, "preprocess": 33, "train": 32, "predict": 34, "dev": 1}


@dataclasses.dataclass
class Settings:
    bucket: Path
    state_dir: Path
    host: str
    predict_port: int
    broker_port: int
    preprocess_port: int
    train_port: int

    def url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    @property
    def broker_url(self) -> str:
        return self.url(self.broker_port)

    @property
    def predict_url(self) -> str:
        return self.url(self.predict_port)


@dataclasses.dataclass
class Part:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None
    process: subprocess.Popen | None = None


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.parts = self._parts()
        self._stopping = threading.Event()
        self._print_lock = threading.Lock()
        self._colour = sys.stdout.isatty()

    def _parts(self) -> list[Part]:
        s = self.settings
        functions = config.functions_dir()
        env = dict(os.environ, BUCKETML_BUCKET=str(s.bucket), BUCKETML_BROKER_URL=s.broker_url, PYTHONUNBUFFERED="1")

        def function(name: str, port: int, threads: int | None) -> Part:
            argv = [sys.executable, "-m", "functions_framework", "--source", str(functions / name / "main.py"),
                    "--target", name, "--host", s.host, "--port", str(port)]
            if threads is None:  # predict: ASGI, one event loop per worker
                return Part(name, argv + ["--asgi"], dict(env, WORKERS="1"), None)
            # gunicorn defaults to cpu*4 threads; say what each function needs.
            return Part(name, argv, dict(env, WORKERS="1", THREADS=str(threads)), None)

        subscribers = {"preprocess": s.preprocess_port, "train": s.train_port, "predict": s.predict_port}
        broker = [sys.executable, "-m", "bucketml.broker", "--manifests", str(config.manifests_dir()),
                  "--db", str(s.state_dir / "broker.sqlite"), "--host", s.host, "--port", str(s.broker_port)]
        for name, port in subscribers.items():
            broker += ["--subscriber", f"{name}={s.url(port)}"]
        watcher = [sys.executable, "-m", "bucketml.watcher", "--bucket", str(s.bucket), "--broker", s.broker_url,
                   "--db", str(s.state_dir / "watcher.sqlite")]
        return [
            Part("broker", broker, env, s.broker_url + "/healthz"),
            function("preprocess", s.preprocess_port, 2),
            function("train", s.train_port, 2),
            function("predict", s.predict_port, None),
            Part("watcher", watcher, env, None),
        ]

    # --- output ------------------------------------------------------------------------
    def say(self, part: str, line: str) -> None:
        label = f"{part:<10}|"
        if self._colour:
            label = f"\033[{COLOURS.get(part, 0)}m{label}\033[0m"
        with self._print_lock:
            print(f"{label} {line}", flush=True)

    def _pump(self, part: Part, process: subprocess.Popen) -> None:
        for raw in process.stdout:
            self.say(part.name, raw.rstrip("\n"))

    # --- lifecycle ---------------------------------------------------------------------
    def _start(self, part: Part) -> None:
        # Own session: Ctrl-C reaches only this supervisor, which then stops the parts in order.
        part.process = subprocess.Popen(
            part.argv, env=part.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, cwd=str(config.functions_dir().parent),
        )
        threading.Thread(target=self._pump, args=(part, part.process), daemon=True).start()

    def start(self) -> None:
        s = self.settings
        s.bucket.mkdir(parents=True, exist_ok=True)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        for part in self.parts:
            self._start(part)
        threading.Thread(target=self._keep_alive, daemon=True).start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the broker answers and every function accepts connections."""
        s = self.settings
        urls = [s.broker_url + "/healthz", s.predict_url + "/v2/health/live",
                s.url(s.preprocess_port), s.url(s.train_port)]
        deadline = time.monotonic() + timeout
        for url in urls:
            while True:
                try:
                    requests.get(url, timeout=2)
                    break
                except requests.RequestException:
                    if time.monotonic() > deadline:
                        raise click.ClickException(f"{url} did not come up within {timeout:.0f}s; see the log above")
                    time.sleep(0.1)

    def _keep_alive(self) -> None:
        while not self._stopping.wait(0.5):
            for part in self.parts:
                code = part.process.poll() if part.process else None
                if code is not None and not self._stopping.is_set():
                    self.say("dev", f"{part.name} exited with code {code}; restarting in {RESTART_DELAY:.0f}s")
                    time.sleep(RESTART_DELAY)
                    if not self._stopping.is_set():
                        self._start(part)

    def stop(self) -> None:
        self._stopping.set()
        # Watcher first (no new events), broker last (it records what is still undelivered).
        for part in sorted(self.parts, key=lambda p: {"watcher": 0, "broker": 2}.get(p.name, 1)):
            if part.process and part.process.poll() is None:
                part.process.terminate()
                try:
                    part.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.say("dev", f"{part.name} did not stop in {STOP_TIMEOUT:.0f}s; killing it")
                    part.process.kill()
                    part.process.wait()

    def banner(self) -> None:
        s = self.settings
        for line in (
            f"bucket folder    {s.bucket}   (drop CSVs into {s.bucket / 'datasets'}/<model>/)",
            f"state            {s.state_dir}",
            f"predict          {s.predict_url}",
            f"broker ingress   {s.broker_url}",
            f"preprocess       {s.url(s.preprocess_port)}",
            f"train            {s.url(s.train_port)}",
            f"triggers         {config.manifests_dir()}",
        ):
            self.say("dev", line)


def run(settings: Settings, after_ready=None) -> None:
    """Start everything, optionally run `after_ready(settings)`, serve until interrupted."""
    supervisor = Supervisor(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    supervisor.banner()
    supervisor.start()
    try:
        supervisor.wait_ready()
        supervisor.say("dev", "ready; press Ctrl-C to stop")
        if after_ready is not None:
            threading.Thread(target=after_ready, args=(settings, supervisor.say), daemon=True).start()
        stop.wait()
    finally:
        supervisor.say("dev", "stopping")
        supervisor.stop()
        supervisor.say("dev", "stopped")
