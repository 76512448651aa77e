"""`bucketml dev`: the whole platform on one machine, each part a real process on loopback.

Processes: the broker (routes by infra/knative), the bucket watcher (local GCS notifications;
with a gs:// bucket, the GCS source pulling the bucket's Pub/Sub notifications instead), the
functions (preprocess, train, predict, monitor, batch and the dead-letter sink) under
functions-framework, and the pinger that runs the monitor every BUCKETML_MONITOR_SECONDS as the
manifests' PingSource does in a cluster. Their output is merged into one log, a part that dies
is restarted, and Ctrl-C stops everything; undelivered events stay in the
broker's SQLite file and are delivered after the next start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import requests

from bucketml import auth
from bucketml import settings as config

RESTART_DELAY = 1.0
CRASH_LOOP_SECONDS = 10.0  # a part that ends sooner after its start is restarted ever more slowly
MAX_RESTART_DELAY = 30.0
FUNCTIONS_START_TIMEOUT = 60.0  # the broker starts once the functions listen, or after this
STOP_TIMEOUT = 10.0
PIDS_FILE = "dev.pids.json"  # in the state folder: which processes this `bucketml dev` started
NOTIFIERS = ("watcher", "gcs-source")  # the part that turns uploads into events: one or the other
COLOURS = {"broker": 35, "watcher": 36, "gcs-source": 36, "preprocess": 33, "train": 32, "predict": 34, "deadletter": 31,
           "monitor": 35, "ping": 36, "batch": 95, "console": 32, "dev": 1}


@dataclasses.dataclass(frozen=True)
class Ports:
    """The port each part listens on (BUCKETML_*_PORT, `bucketml dev --*-port`)."""

    predict: int = config.DEFAULT_PREDICT_PORT
    broker: int = config.DEFAULT_BROKER_PORT
    preprocess: int = config.DEFAULT_PREPROCESS_PORT
    train: int = config.DEFAULT_TRAIN_PORT
    deadletter: int = config.DEFAULT_DEADLETTER_PORT
    monitor: int = config.DEFAULT_MONITOR_PORT
    batch: int = config.DEFAULT_BATCH_PORT
    console: int = config.DEFAULT_CONSOLE_PORT

    def of_functions(self) -> dict[str, int]:
        """Function name (its Knative Service name in infra/knative) -> port, for the functions the
        broker delivers events to (the console takes none: it is visited, not subscribed)."""
        return {"preprocess": self.preprocess, "train": self.train, "predict": self.predict, "deadletter": self.deadletter,
                "monitor": self.monitor, "batch": self.batch}


@dataclasses.dataclass(frozen=True)
class Settings:
    bucket: Path | str  # a local folder (Path), or "gs://NAME" for a Google Cloud Storage bucket
    state_dir: Path
    host: str
    ports: Ports = Ports()
    # With a gs:// bucket: projects/P/subscriptions/S, the Pub/Sub subscription of the bucket's
    # notifications that `python -m bucketml.cloud.gcs_source` turns into upload events.
    subscription: str | None = None

    @property
    def on_gcs(self) -> bool:
        return str(self.bucket).startswith("gs://")

    @property
    def broker_db(self) -> Path:
        """The broker's SQLite file: one per gs:// bucket, so the undelivered events of one bucket
        are never delivered to functions working on another."""
        if self.on_gcs:
            return self.state_dir / f"broker-gs-{str(self.bucket)[len('gs://'):]}.sqlite"
        return self.state_dir / "broker.sqlite"

    def url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    @property
    def broker_url(self) -> str:
        return self.url(self.ports.broker)

    @property
    def predict_url(self) -> str:
        return self.url(self.ports.predict)


@dataclasses.dataclass
class Part:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None  # where it listens; None for the watcher and the GCS source, which only send
    is_function: bool = False  # functions start first (see Supervisor.start)
    process: subprocess.Popen | None = None
    started: float = 0.0  # time.monotonic() of the last start
    quick_failures: int = 0  # ends in a row, each within CRASH_LOOP_SECONDS of its start


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.parts = self._parts()
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()  # a restart never races stop()
        self._print_lock = threading.Lock()
        self._colour = sys.stdout.isatty()

    def _parts(self) -> list[Part]:
        s = self.settings
        functions = config.functions_dir()
        env = dict(os.environ, BUCKETML_BUCKET=str(s.bucket), BUCKETML_BROKER_URL=s.broker_url, PYTHONUNBUFFERED="1")

        def function(name: str, port: int, threads: int | None) -> Part:
            argv = [sys.executable, "-m", "functions_framework", "--source", str(functions / name / "main.py"),
                    "--target", name, "--host", s.host, "--port", str(port)]
            if threads is None:  # predict and the console: ASGI, one event loop per worker
                return Part(name, argv + ["--asgi"], dict(env, WORKERS="1", BUCKETML_PREDICT_URL=s.predict_url),
                            port, is_function=True)
            # gunicorn defaults to cpu*4 threads; say what each function needs.
            return Part(name, argv, dict(env, WORKERS="1", THREADS=str(threads)), port, is_function=True)

        ports = s.ports
        broker = [sys.executable, "-m", "bucketml.local.broker", "--manifests", str(config.manifests_dir()),
                  "--db", str(s.broker_db), "--host", s.host, "--port", str(ports.broker)]
        # The PingSources of the same manifests (the monitor's), every BUCKETML_MONITOR_SECONDS.
        ping = [sys.executable, "-m", "bucketml.local.ping", "--manifests", str(config.manifests_dir())]
        for name, port in ports.of_functions().items():
            broker += ["--subscriber", f"{name}={s.url(port)}"]
            ping += ["--subscriber", f"{name}={s.url(port)}"]
        if s.on_gcs:  # the bucket's Pub/Sub notifications, as a cluster without Eventarc gets them
            notifier = Part("gcs-source", [sys.executable, "-m", "bucketml.cloud.gcs_source", "--subscription",
                                           str(s.subscription), "--sink", s.broker_url], env, None)
        else:
            notifier = Part("watcher", [sys.executable, "-m", "bucketml.local.watcher", "--bucket", str(s.bucket),
                                        "--broker", s.broker_url, "--db", str(s.state_dir / "watcher.sqlite")], env, None)
        return [
            Part("broker", broker, env, ports.broker),
            function("preprocess", ports.preprocess, 2),
            function("train", ports.train, 2),
            function("predict", ports.predict, None),
            function("deadletter", ports.deadletter, 2),
            function("monitor", ports.monitor, 1),
            function("batch", ports.batch, 2),
            function("console", ports.console, None),
            notifier,
            Part("ping", ping, env, None),
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
        part.started = time.monotonic()
        threading.Thread(target=self._pump, args=(part, part.process), daemon=True).start()
        self._record_pids()

    # --- parts left behind by a `bucketml dev` that was killed ---------------------------
    # Each part runs in its own session (so Ctrl-C reaches only the supervisor); a supervisor
    # killed with SIGKILL therefore leaves them running, holding their ports and the state.
    # The pids file lets the next start find and stop them.
    def _record_pids(self) -> None:
        path = self.settings.state_dir / PIDS_FILE
        parts = {p.name: p.process.pid for p in self.parts if p.process is not None}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"dev": os.getpid(), "parts": parts}))
        temporary.replace(path)  # atomic: a reader never sees half a file

    def stop_leftovers(self) -> None:
        """Stop the parts a previous `bucketml dev` on this state folder left running; refuse to
        start beside one that is still running."""
        path = self.settings.state_dir / PIDS_FILE
        try:
            recorded = json.loads(path.read_text())
            previous, parts = int(recorded["dev"]), {str(k): int(v) for k, v in recorded["parts"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # none, or unreadable: nothing known to stop
        if previous != os.getpid() and _is_ours(previous):
            raise click.ClickException(
                f"another `bucketml dev` (pid {previous}) is running with the state folder {self.settings.state_dir}; "
                "stop it first (Ctrl-C in its terminal), or give this one another --state-dir and --bucket"
            )
        for name, group in parts.items():
            members = [pid for pid in _group_members(group) if _is_ours(pid)]
            if not members:
                continue
            self.say("dev", f"stopping {name} (process group {group}), left running by a `bucketml dev` that did not stop")
            _signal_group(group, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and _group_members(group):
                time.sleep(0.1)
            _signal_group(group, signal.SIGKILL)
        path.unlink(missing_ok=True)

    @staticmethod
    def _kill_leftovers(process: subprocess.Popen) -> None:
        """Kill what is left of an ended part's process group: a gunicorn worker whose master was
        killed keeps serving (and holding the port) until it notices, so it goes first."""
        _signal_group(process.pid, signal.SIGKILL)  # each part leads its own process group

    def start(self) -> None:
        s = self.settings
        if not s.on_gcs:
            s.bucket.mkdir(parents=True, exist_ok=True)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.stop_leftovers()
        # Functions first: a broker restarted with deliveries pending would otherwise spend their
        # retries on connection refusals while the functions import their libraries.
        functions = [part for part in self.parts if part.is_function]
        for part in functions:
            self._start(part)
        deadline = time.monotonic() + FUNCTIONS_START_TIMEOUT
        for part in functions:
            while time.monotonic() < deadline and part.process.poll() is None and not _listening(s.host, part.port):
                time.sleep(0.1)
        for part in self.parts:
            if part not in functions:
                self._start(part)
        threading.Thread(target=self._keep_alive, daemon=True).start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the broker answers and every function accepts connections."""
        s = self.settings
        urls = [s.broker_url + "/healthz", s.predict_url + "/v2/health/live",
                s.url(s.ports.preprocess), s.url(s.ports.train), s.url(s.ports.deadletter), s.url(s.ports.monitor),
                s.url(s.ports.batch), s.url(s.ports.console) + "/healthz"]
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
        """Restart a part that ended, after RESTART_DELAY; one that keeps failing within
        CRASH_LOOP_SECONDS of its start waits twice as long each time, up to MAX_RESTART_DELAY."""
        while not self._stopping.wait(0.5):
            for part in self.parts:
                code = part.process.poll() if part.process else None
                if code is None or self._stopping.is_set():
                    continue
                self._kill_leftovers(part.process)
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                if time.monotonic() - part.started >= CRASH_LOOP_SECONDS:
                    part.quick_failures = 0
                delay = min(RESTART_DELAY * 2 ** part.quick_failures, MAX_RESTART_DELAY)
                part.quick_failures += 1
                self.say("dev", f"{part.name} {how}; restarting it in {delay:.0f}s")
                if self._stopping.wait(delay):
                    return
                with self._lifecycle:
                    if not self._stopping.is_set():
                        self._start(part)
                        self.say("dev", f"{part.name} restarted (pid {part.process.pid})")

    def stop(self) -> None:
        with self._lifecycle:
            self._stopping.set()
        # Watcher or GCS source first (no new events), the functions together, broker last (it
        # records what is still undelivered).
        stages = [[p for p in self.parts if p.name in NOTIFIERS],
                  [p for p in self.parts if p.name not in (*NOTIFIERS, "broker")],
                  [p for p in self.parts if p.name == "broker"]]
        for stage in stages:
            running = [part for part in stage if part.process and part.process.poll() is None]
            for part in running:
                part.process.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT
            for part in running:
                try:
                    part.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say("dev", f"{part.name} did not stop in {STOP_TIMEOUT:.0f}s; killing it")
                    part.process.kill()
                    part.process.wait()
            for part in stage:
                if part.process:
                    self._kill_leftovers(part.process)
        (self.settings.state_dir / PIDS_FILE).unlink(missing_ok=True)

    def banner(self) -> None:
        s = self.settings
        if s.on_gcs:
            where = [f"bucket           {s.bucket}   (upload CSVs to {s.bucket}/datasets/<model>/, files to score to "
                     f"{s.bucket}/batch/<model>/)",
                     f"notifications    {s.subscription}   (the GCS source posts them to the broker)"]
        else:
            where = [f"bucket folder    {s.bucket}   (drop CSVs into {s.bucket / 'datasets'}/<model>/, files to score "
                     f"into {s.bucket / 'batch'}/<model>/)"]
        for line in (
            *where,
            f"state            {s.state_dir}",
            f"predict          {s.predict_url}",
            f"broker ingress   {s.broker_url}",
            f"preprocess       {s.url(s.ports.preprocess)}",
            f"train            {s.url(s.ports.train)}",
            f"deadletter       {s.url(s.ports.deadletter)}",
            f"monitor          {s.url(s.ports.monitor)}   (every {config.monitor_seconds():g}s: canary decisions, drift)",
            f"batch            {s.url(s.ports.batch)}",
            f"console          {s.url(s.ports.console)}/   (open it in a browser: models, events, upload)",
            f"triggers         {config.manifests_dir()}",
        ):
            self.say("dev", line)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_ours(pid: int) -> bool:
    """Alive and a bucketml process: a recorded pid may have been reused by anything since."""
    text = _cmdline(pid)
    return "bucketml" in text or "functions_framework" in text or "functions-framework" in text


def _group_members(group: int) -> list[int]:
    """Live processes in process group `group` (its leader may be gone while a worker lives on);
    zombies do not count (an orphan's may never be reaped where PID 1 is no init)."""
    members = []
    if not Path("/proc").is_dir():  # not Linux: leftovers are not found (nor stopped)
        return members
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # Field 5 of /proc/<pid>/stat is the process group; the command name before it is in parentheses.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def run(settings: Settings, after_ready=None) -> None:
    """Start everything, optionally run `after_ready(settings)`, serve until interrupted."""
    try:  # the parts check this too; refusing here starts nothing that would only keep failing
        access = auth.server_policy(settings.host, "bucketml dev", f"--host {settings.host}")
        config.RequestLimits.from_env()
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    supervisor = Supervisor(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    supervisor.banner()
    supervisor.say("dev", "access           " + (
        "broker and predict require 'Authorization: Bearer <token>' (the token set in BUCKETML_TOKEN/BUCKETML_TOKEN_FILE)"
        if access.required else "open to this machine (set BUCKETML_TOKEN to require a bearer token)"))
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
