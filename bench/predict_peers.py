"""Inference: bucketml's predict function against MLServer and a plain Flask + scikit-learn
server, measured in one run on this machine with the same load generator (wrk).

    .venv/bin/python bench/predict_peers.py            # the full run (about 5 minutes)
    .venv/bin/python bench/predict_peers.py --quick    # a smoke run (about 2 minutes)
    .venv/bin/python bench/predict_peers.py --no-peers     # bucketml only

Per server: cold start (Popen to the first 200 prediction, polled every 10 ms), single-row
throughput and p50/p99 latency under wrk at 8 and 64 connections (after a warm-up), rows/s
of one 10,000-row request, and peak RSS (VmHWM) of its processes at the end of its run.

Model: scikit-learn's bundled breast_cancer data (569 rows, 30 numeric columns, two string
classes), so that MLServer's scikit-learn runtime takes one plain float tensor and no peer
needs a hand-written encoder. bucketml trains it in-process (preprocess + train into a local
bucket, `algorithms` = --algorithm). The peers serve the same model as a joblib pickle:
bucketml's own estimator factory (training.estimators) with the parameters its search chose
(from the model card), behind a median imputer (what bucketml puts before trees on numeric
columns), fitted on the same training rows that bucketml trained on (the prepared
train.csv). The run prints how often the peers' labels agree with bucketml's.

Every server answers labels and class probabilities: bucketml always does; the Flask server
computes predict_proba once and takes the argmax; MLServer is asked for its `predict` and
`predict_proba` outputs (its runtime calls the model once for each; --mlserver-outputs).

CPU budget (2 cores): unless --server-cpus says otherwise, every server process is pinned to
CPU 1 and wrk to CPU 0, so each server has the same single core to itself (a 1-vCPU
instance) and the load generator never takes CPU from it. Worker processes and threads are
then a choice of how to use one core; bucketml runs as it ships (the ASGI function, one
uvicorn worker). The peers run as they usually are: Flask
under gunicorn with 1 worker x 8 threads (functions-framework's gunicorn settings); MLServer
with its default parallel_workers=1 (an asyncio HTTP process handing requests to one
inference process).

Needs wrk (Debian: apt-get install wrk; installed when missing and run as root). MLServer,
Flask and gunicorn for the peers are installed into bench/.peers-venv from
bench/peers-requirements.txt on first use (and again when that file changes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import ensure_venv, machine, versions  # bench/common.py: this folder is the first import path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS_VENV = BENCH / ".peers-venv"
PEERS_REQUIREMENTS = BENCH / "peers-requirements.txt"
MODEL = "cancer"
# bucketml configurations: asgi = functions/predict/main.py as shipped (functions-framework's
# ASGI mode: one uvicorn worker). The predict app is Starlette's, so it has no WSGI form to
# compare with any more (docs/benchmarks.md keeps the last such comparison).
CONFIGS = ["asgi"]
# The configuration compared with the peers: how the predict function ships.
BASELINE = "asgi"


# --------------------------------------------------------------------------- setup


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get)", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", "wrk"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
    wrk = shutil.which("wrk")
    if not wrk:
        sys.exit("wrk is needed: apt-get install wrk")
    return wrk


def peers_python() -> Path:
    """The peers' virtualenv, (re)installed when bench/peers-requirements.txt changes."""
    return ensure_venv(PEERS_VENV, PEERS_REQUIREMENTS, "the peers")


@dataclass
class Setup:
    bucket: Path
    version: int
    algorithm: str
    params: dict
    columns: list[str]
    rows: np.ndarray  # every row of the dataset, in schema column order
    model_joblib: Path
    train_rows: int


def prepare(folder: Path, algorithm: str) -> Setup:
    """Train with bucketml's own path into a local bucket, then fit the peers' pickle."""
    import joblib
    import pandas as pd
    from sklearn.datasets import load_breast_cancer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from bucketml.steps.preprocess import handle_finalized
    from bucketml.registry.model_registry import Registry
    from bucketml.storage import LocalStorage
    from bucketml.steps.train import handle_prepared
    from bucketml.training.candidates import estimators

    frame = load_breast_cancer(as_frame=True).frame
    frame["target"] = frame["target"].map({0: "malignant", 1: "benign"})
    storage = LocalStorage(folder / "bucket")
    info = storage.write(f"datasets/{MODEL}/data.csv", frame.to_csv(index=False).encode(),
                         metadata={"target": "target", "algorithms": algorithm})
    prepared = handle_finalized(storage, info.event_data())
    replies = handle_prepared(storage, prepared.data)
    last = replies[-1] if isinstance(replies, list) else replies
    version = last.data["version"]
    card = Registry(storage).card(MODEL, version)
    chosen = next(c for c in card["candidates"] if c["name"] == card["algorithm"])
    columns = [c["name"] for c in card["schema"]["columns"]]

    # The peers' model: bucketml's estimator with the chosen parameters, on the same rows.
    train = pd.read_csv(storage.open(prepared.data["prepared"] + "train.csv"))
    balanced = any(note.startswith("class_weight: balanced") for note in chosen.get("notes", []))
    factory, scale = estimators(card["task"], balanced=balanced)[card["algorithm"]]
    steps = [("impute", SimpleImputer(strategy="median"))]
    if scale:
        steps.append(("scale", StandardScaler()))
    steps.append(("model", factory(**chosen["params"])))
    # Fitted on a plain array: MLServer and the Flask server hand the model arrays, not frames.
    pipeline = Pipeline(steps).fit(train[columns].to_numpy(np.float64), train["target"])
    model_joblib = folder / "model.joblib"
    joblib.dump(pipeline, model_joblib)
    return Setup(folder / "bucket", version, card["algorithm"], chosen["params"], columns,
                 frame[columns].to_numpy(np.float64), model_joblib, len(train))


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Request:
    path: str
    body: bytes


@dataclass
class Server:
    """How to start one server (`command(port)` -> argv, extra env, cwd) and what to send it."""

    name: str
    shape: str  # its processes and threads, for the table
    kind: str  # "gunicorn" or "mlserver": which processes are its workers
    command: Callable[[int], tuple[list[str], dict[str, str], Path]]
    single: Request  # one row
    batch: Request  # --batch-rows rows
    labels: Callable[[dict], list]  # the batch answer -> its labels
    extra: dict[str, Request] = field(default_factory=dict)  # other single-row routes to load


def features_body(rows: np.ndarray, **more) -> bytes:
    return json.dumps({**more, "features": rows.tolist()}).encode()


def bucketml_server(setup: Setup, config: str, one: np.ndarray, batch: np.ndarray, with_v2: bool) -> Server:
    """The predict function under functions-framework, configured only by environment variables."""
    env = {"WORKERS": "1", "BUCKETML_BUCKET": str(setup.bucket), "GUNICORN_LOG_LEVEL": "error"}
    shape = "1 uvicorn worker (ASGI)"

    def command(port: int):
        argv = [sys.executable, "-m", "functions_framework", "--asgi", "--source", "functions/predict/main.py",
                "--target", "predict", "--host", "127.0.0.1", "--port", str(port)]
        return argv, env, REPO

    extra = {"V2": Request(f"/v2/models/{MODEL}/infer", bucketml_v2_body(setup, one))} if with_v2 else {}
    return Server(f"bucketml {config}", shape, "gunicorn", command,
                  Request("/predict", features_body(one, model=MODEL)), Request("/predict", features_body(batch, model=MODEL)),
                  lambda answer: answer["predictions"], extra)


def bucketml_v2_body(setup: Setup, rows: np.ndarray) -> bytes:
    """bucketml's Open Inference request: one [rows, 1] tensor per column, named by the column."""
    inputs = [{"name": name, "datatype": "FP32", "shape": [len(rows), 1], "data": rows[:, i].tolist()}
              for i, name in enumerate(setup.columns)]
    return json.dumps({"inputs": inputs}).encode()


def mlserver_server(setup: Setup, one: np.ndarray, batch: np.ndarray, workers: int, outputs: list[str],
                    folder: Path) -> Server:
    """MLServer's scikit-learn runtime serving the joblib pickle from a model repository.

    Its runtime calls the model once per requested output: labels and probabilities cost it
    two passes (`outputs` chooses; labels are compared only when `predict` is asked for)."""
    repository = folder / "mlserver"
    (repository / MODEL).mkdir(parents=True, exist_ok=True)
    shutil.copy(setup.model_joblib, repository / MODEL / "model.joblib")
    (repository / MODEL / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }))

    def command(port: int):
        (repository / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
            "parallel_workers": workers, "debug": False,
            # Its defaults put these under the working directory: keep them in the temp folder.
            "metrics_dir": str(repository / ".metrics"), "environments_dir": str(repository / ".envs"),
        }))
        return [str(PEERS_VENV / "bin" / "mlserver"), "start", str(repository)], {}, repository

    def body(rows: np.ndarray) -> bytes:
        return json.dumps({
            "inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}],
            "outputs": [{"name": name} for name in outputs],
        }).encode()

    def labels(answer: dict) -> list | None:
        return next((o["data"] for o in answer["outputs"] if o["name"] == "predict"), None)

    shape = f"1 HTTP process + {workers} inference worker{'s' * (workers != 1)}" if workers else "1 process"
    path = f"/v2/models/{MODEL}/infer"
    return Server(f"MLServer pw{workers}" + ("" if "predict" in outputs else " (proba)"), shape, "mlserver", command, Request(path, body(one)), Request(path, body(batch)), labels)


def flask_server(setup: Setup, one: np.ndarray, batch: np.ndarray, workers: int, threads: int) -> Server:
    """bench/flask_sklearn_server.py under gunicorn with functions-framework's gunicorn settings."""

    def command(port: int):
        argv = [str(PEERS_VENV / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
                "--threads", str(threads), "--timeout", "0", "--log-level", "error", "flask_sklearn_server:app"]
        return argv, {"MODEL_PATH": str(setup.model_joblib)}, BENCH

    shape = f"{workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}"
    return Server(f"Flask+sklearn w{workers}t{threads}", shape, "gunicorn", command,
                  Request("/predict", features_body(one)), Request("/predict", features_body(batch)),
                  lambda answer: answer["predictions"])


def split_cpus(server_cpus: str) -> tuple[set[int] | None, set[int] | None]:
    """(the server's CPUs, wrk's) for --server-cpus: a comma-separated list, or 'all' (no pinning)."""
    if server_cpus == "all":
        return None, None
    cpus = {int(c) for c in server_cpus.split(",")}
    wrk_cpus = set(os.sched_getaffinity(0)) - cpus
    if not wrk_cpus:
        raise ValueError("--server-cpus leaves no CPU for wrk; use 'all' for no pinning")
    return cpus, wrk_cpus


def pinned(argv: list[str], cpus: set[int] | None) -> list[str]:
    """`argv` run on `cpus` only (taskset execs it: same pid; its children inherit the mask)."""
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv] if cpus else argv


@dataclass
class Running:
    process: subprocess.Popen
    port: int
    log: Path
    started: float  # perf_counter just before Popen


def start(server: Server, cpus: set[int] | None, log: Path) -> Running:
    """Start in a new session: its own process group, so that stop() reaches every worker."""
    port = free_port()
    argv, env, cwd = server.command(port)
    with open(log, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(pinned(argv, cpus), cwd=cwd, env=dict(os.environ, **env), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Running(process, port, log, started)


def stop(running: Running) -> None:
    group = running.process.pid  # the session leader's pid is its process group id
    if running.process.poll() is None:
        os.killpg(group, signal.SIGTERM)
        try:
            running.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever of the group is left (a worker that ignored SIGTERM)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    running.process.wait()


class ServerFailed(Exception):
    pass


def post(port: int, request: Request, timeout: float) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", request.path, request.body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def first_prediction(running: Running, request: Request, limit: float = 90.0) -> float:
    """Seconds from Popen to the first 200 on the prediction route, polling every 10 ms.

    A refused connection, 503 (bucketml: no model loaded yet) or 404 (MLServer: model not
    registered yet) mean "not yet". A server that exits, answers another error for 5 s, or
    has not predicted after `limit` s cannot run."""
    wrong_since, last = None, "no answer"
    while time.perf_counter() - running.started < limit:
        if running.process.poll() is not None:
            raise ServerFailed(f"exited with {running.process.returncode}: {log_tail(running.log)}")
        try:
            status, body = post(running.port, request, timeout=10)
        except OSError:
            time.sleep(0.01)
            continue
        if status == 200:
            return time.perf_counter() - running.started
        last = f"HTTP {status} {body[:100].decode(errors='replace')!r}"
        if status not in (503, 404):
            wrong_since = wrong_since or time.perf_counter()
            if time.perf_counter() - wrong_since > 5:
                raise ServerFailed(f"{last}; its log ends: {log_tail(running.log)}")
        time.sleep(0.01)
    raise ServerFailed(f"no prediction after {limit:.0f} s ({last}); its log ends: {log_tail(running.log)}")


def log_tail(log: Path) -> str:
    """The last non-empty line of a server's log: usually the exception."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(empty log)"


# --------------------------------------------------------------------------- measurements

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def run_wrk(wrk: str, port: int, request: Request, connections: int, seconds: float, cpus: set[int] | None,
            folder: Path) -> dict:
    """Closed-loop load: `connections` keep-alive connections, each sending its next request as
    soon as its answer arrives. One wrk thread when wrk has a core of its own, else two."""
    script = folder / "post.lua"
    body = request.body.decode()
    assert "]==]" not in body
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = [==[{body}]==]\n")
    threads = 1 if cpus and len(cpus) == 1 else 2
    argv = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
            "--latency", "-s", str(script), f"http://127.0.0.1:{port}{request.path}"]
    done = subprocess.run(pinned(argv, cpus), capture_output=True, text=True, check=False)
    return parse_wrk(done.stdout)


def parse_wrk(output: str) -> dict:
    """Requests/s, p50/p99 latency (ms) and failed requests (non-2xx, socket errors) from wrk --latency."""

    def latency(percent: str) -> float | None:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
        return float(found.group(1)) * UNITS[found.group(2)] if found else None

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    total = re.search(r"(\d+) requests in", output)
    completed = int(total.group(1)) if total else 0
    return {
        "rps": float(rps.group(1)) if rps and completed else None,  # none completed: no figures
        "requests": completed,
        "p50": latency("50"),
        "p99": latency("99"),
        "failed": (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, errors.groups())) if errors else 0),
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of `pids` (from /proc/<pid>/stat)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_idle(root: int, limit: float = 60.0) -> None:
    """Wait until the server has finished what the last wrk run left behind.

    wrk stops with up to `connections` requests in flight; servers still compute those (and
    what is queued behind them), which would otherwise be charged to the next run. Idle: under
    5 % of a core over half a second (background pollers stay below that)."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        pids = process_tree(root)
        before = cpu_seconds(pids)
        time.sleep(0.5)
        if cpu_seconds(pids) - before < 0.025:
            return


def batch_rate(port: int, request: Request, rows: int, repeats: int) -> tuple[float, dict]:
    """Rows per second of one request of `rows` rows (median of `repeats`), and the last answer."""
    seconds, body = [], b""
    for _ in range(repeats):
        started = time.perf_counter()
        status, body = post(port, request, timeout=300)
        seconds.append(time.perf_counter() - started)
        if status != 200:
            raise ServerFailed(f"batch: HTTP {status} {body[:200].decode(errors='replace')!r}")
    return rows / statistics.median(seconds), json.loads(body)


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, from the parent pid in /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        tree += sorted(frontier)
    return tree


def peak_rss(root: int) -> list[tuple[str, float]]:
    """(role, VmHWM in MiB) of a server's first process ('main') and each descendant.

    multiprocessing's resource tracker (MLServer) is a 'helper': it never holds a model."""
    found = []
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
        if hwm:
            role = "main" if pid == root else "helper" if "resource_tracker" in cmdline else "worker"
            found.append((role, int(hwm.group(1)) / 1024))
    return found


@dataclass
class Result:
    server: Server
    cold: float | None = None
    load: dict = field(default_factory=dict)  # (route, connections) -> wrk figures
    batch: float | None = None
    labels: list[str] | None = None
    rss: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def measure(server: Server, args, wrk: str, cpus: set[int] | None, wrk_cpus: set[int] | None, folder: Path) -> Result:
    """Cold starts (the last start stays up), then load at each concurrency, the batch, peak RSS."""
    result, colds, running = Result(server), [], None
    try:
        for attempt in range(args.cold_repeats):
            if running:
                stop(running)
            running = start(server, cpus, folder / "server.log")
            colds.append(first_prediction(running, server.single))
        result.cold = statistics.median(colds)
        for route, request in {"single": server.single, **server.extra}.items():
            for connections in args.connections:
                run_wrk(wrk, running.port, request, connections, args.warmup, wrk_cpus, folder)  # warm-up, discarded
                wait_idle(running.process.pid)
                figures = run_wrk(wrk, running.port, request, connections, args.duration, wrk_cpus, folder)
                wait_idle(running.process.pid)
                result.load[(route, connections)] = figures
                print(f"  {route_label(server, route)} c={connections}: {fmt_load(figures)}", flush=True)
        result.batch, answer = batch_rate(running.port, server.batch, args.batch_rows, args.batch_repeats)
        labels = server.labels(answer)
        result.labels = [str(label) for label in labels] if labels is not None else None
        # Read while the server is up: VmHWM is the peak over its life, the batches included.
        result.rss = peak_rss(running.process.pid)
        print(f"  cold start {result.cold:.2f} s; batch {result.batch:,.0f} rows/s; peak RSS {rss_detail(result.rss)}", flush=True)
    except ServerFailed as exc:
        result.error = str(exc)
        print(f"  cannot run: {exc}", flush=True)
    finally:
        if running:
            stop(running)
    return result


# --------------------------------------------------------------------------- report


def fmt_load(figures: dict) -> str:
    if figures.get("rps") is None:
        return f"no request completed ({figures.get('failed', 0)} failed or timed out)"
    failed = f", {figures['failed']} FAILED" if figures["failed"] else ""
    return f"{figures['rps']:.0f} req/s, p50 {figures['p50']:.2f} ms, p99 {figures['p99']:.2f} ms{failed}"


def route_label(server: Server, route: str) -> str:
    return "V2 infer" if route != "single" or server.single.path.startswith("/v2/") else "/predict"


def rss_detail(rss: list[tuple[str, float]]) -> str:
    return ", ".join(f"{role} {mib:.0f} MiB" for role, mib in rss)


def rss_summary(server: Server, rss: list[tuple[str, float]]) -> str:
    """gunicorn: the largest worker (the master only forks them and serves nothing).
    MLServer: its main process parses HTTP and holds a copy of the model too, so both show."""
    main = next((mib for role, mib in rss if role == "main"), 0.0)
    workers = [mib for role, mib in rss if role == "worker"]
    if server.kind == "mlserver":
        return f"{main:.0f} main" + (f" + {max(workers):.0f}" + (f" x{len(workers)}" if len(workers) > 1 else "") if workers else "")
    if not workers:  # gunicorn always forks; a lone process would be a dev server
        return f"{main:.0f}"
    return f"{max(workers):.0f}" + (f" x{len(workers)}" if len(workers) > 1 else "")


def print_table(results: list[Result], args) -> None:
    head = f"{'server':<22} {'route':<9} {'processes x threads':<36}"
    for c in args.connections:
        head += f" {f'req/s @{c}':>10} {f'p50 @{c}':>8} {f'p99 @{c}':>8}"
    head += f" {'cold s':>6} {f'rows/s @{args.batch_rows:,}':>15}  {'peak RSS MiB/worker':<20}"
    print(head)
    for r in results:
        if r.error:
            print(f"{r.server.name:<22} {route_label(r.server, 'single'):<9} {r.server.shape:<36} cannot run: {r.error}")
            continue
        for route in ["single", *r.server.extra]:
            line = f"{r.server.name:<22} {route_label(r.server, route):<9} {r.server.shape:<36}"
            for c in args.connections:
                f = r.load.get((route, c), {})
                if f.get("rps") is None:
                    line += f" {'-':>10} {'-':>8} {'-':>8}"
                else:
                    line += f" {f['rps']:>9.0f}{'!' if f['failed'] else ' '} {f['p50']:>8.2f} {f['p99']:>8.2f}"
            if route == "single":
                line += f" {r.cold:>6.2f} {r.batch:>15,.0f}  {rss_summary(r.server, r.rss):<20}"
            print(line)


def print_notes(results: list[Result], args) -> None:
    print(f"latencies in ms (wrk); '!' marks a run with failed requests; cold s: Popen to the first 200 "
          f"prediction (median of {args.cold_repeats}, warm page cache); rows/s: one request of {args.batch_rows:,} rows "
          f"(median of {args.batch_repeats}); peak RSS: VmHWM at the end of the run, of each gunicorn worker (the "
          "largest shown, xN workers; the master is not counted), of MLServer's main process and of its inference workers")
    if any(r.server.kind == "mlserver" for r in results):
        print(f"MLServer was asked for {' and '.join(args.mlserver_outputs)}: its runtime runs the model once per output")
    print("bucketml asgi is functions/predict/main.py as shipped")
    bucketml = [r for r in results if r.labels and r.server.name.startswith("bucketml")]
    reference = next((r for r in bucketml if r.server.name == f"bucketml {BASELINE}"), bucketml[0] if bucketml else None)
    for r in results:
        if r.labels and reference and r is not reference and not r.server.name.startswith("bucketml"):
            agree = np.mean(np.array(r.labels) == np.array(reference.labels))
            print(f"labels of {r.server.name} agree with {reference.server.name} on {agree:.2%} of the batch rows")


def other_benchmarks() -> list[str]:
    """Other bench/ scripts running now would distort the figures: name them."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if len(argv) > 1 and "python" in Path(argv[0]).name and re.search(r"bench/\w+\.py$", argv[1]) \
                    and "predict_peers" not in argv[1]:
                found.append(" ".join(argv).strip()[:100])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s loads, 1 s warm-ups, one cold start, two batches")
    parser.add_argument("--configs", nargs="*", default=CONFIGS, choices=CONFIGS,
                        help="bucketml configurations (asgi: the predict function as shipped)")
    parser.add_argument("--no-peers", action="store_true", help="measure bucketml configurations only")
    parser.add_argument("--algorithm", default="random_forest",
                        choices=["logistic_regression", "svm", "gradient_boosting", "random_forest"])
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--duration", type=float, help="seconds of each measured wrk run (12; --quick: 2)")
    parser.add_argument("--warmup", type=float, help="seconds of wrk before each measured run (3; --quick: 1)")
    parser.add_argument("--cold-repeats", type=int, help="cold starts per server, the median is shown (3; --quick: 1)")
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--batch-repeats", type=int, help="batch requests per server, the median is shown (5; --quick: 2)")
    parser.add_argument("--server-cpus", default="1",
                        help="CPUs the servers are pinned to, comma-separated (wrk gets the others), or 'all'")
    parser.add_argument("--flask-workers", type=int, default=1)
    parser.add_argument("--flask-threads", type=int, default=8)
    parser.add_argument("--mlserver-workers", type=int, default=1, help="MLServer's parallel_workers (its default: 1)")
    parser.add_argument("--mlserver-outputs", nargs="+", default=["predict", "predict_proba"],
                        choices=["predict", "predict_proba"], help="the outputs MLServer is asked for (default: both)")
    args = parser.parse_args()
    # Presets; an explicit flag wins over either.
    for name, full, quick in (("duration", 12.0, 2.0), ("warmup", 3.0, 1.0), ("cold_repeats", 3, 1), ("batch_repeats", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    try:
        cpus, wrk_cpus = split_cpus(args.server_cpus)
    except ValueError as exc:
        parser.error(str(exc))

    wrk = ensure_wrk()
    peers = None if args.no_peers else peers_python()
    print(f"$ {shlex.join(['.venv/bin/python', 'bench/predict_peers.py', *sys.argv[1:]])}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    for other in other_benchmarks():
        print(f"WARNING: another benchmark is running, these figures are contended: {other}")
    print(f"bucketml: {versions(Path(sys.executable), ['functions-framework', 'gunicorn', 'Flask', 'onnxruntime', 'orjson'])}")
    if peers:
        print(f"peers:    {versions(peers, ['mlserver', 'mlserver-sklearn', 'uvicorn', 'uvloop', 'Flask', 'gunicorn', 'scikit-learn', 'numpy'])}")
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout.splitlines()[0]
    print(f"wrk:      {wrk_version}")
    if cpus:
        print(f"CPU: every server process pinned to CPU {','.join(map(str, sorted(cpus)))}, wrk (1 thread) to CPU "
              f"{','.join(map(str, sorted(wrk_cpus)))}: each server has the same core to itself and the load generator "
              "never takes CPU from it (a 1-vCPU instance); workers and threads only divide that core")
    else:
        print("CPU: no pinning: servers and wrk (2 threads) share every core")

    with tempfile.TemporaryDirectory(prefix="bucketml-predict-bench-") as tmp:
        folder = Path(tmp)
        began = time.perf_counter()
        setup = prepare(folder, args.algorithm)
        print(f"model: breast_cancer, {len(setup.rows)} rows x {len(setup.columns)} numeric columns; bucketml trained "
              f"{setup.algorithm} {json.dumps(setup.params)} on {setup.train_rows} rows in {time.perf_counter() - began:.1f} s "
              f"(version {setup.version}); the peers serve the same estimator and parameters (bucketml's factory) behind "
              "a median imputer, fitted on the same rows, pickled with joblib")
        batch = np.resize(setup.rows, (args.batch_rows, len(setup.columns)))  # the dataset, repeated
        one = setup.rows[:1]
        print(f"requests: one row (the dataset's first), or {args.batch_rows:,} rows (the {len(setup.rows)} rows repeated) "
              "in one request; every server answers labels and class probabilities")
        print(f"load: wrk, {args.warmup:g} s warm-up then {args.duration:g} s measured at each concurrency", flush=True)

        servers = [bucketml_server(setup, config, one, batch, with_v2=config == BASELINE) for config in args.configs]
        if peers:
            servers.append(mlserver_server(setup, one, batch, args.mlserver_workers, args.mlserver_outputs, folder))
            servers.append(flask_server(setup, one, batch, args.flask_workers, args.flask_threads))

        results = []
        for server in servers:
            print(f"{server.name} ({server.shape})", flush=True)
            results.append(measure(server, args, wrk, cpus, wrk_cpus, folder))
        print()
        print_table(results, args)
        print_notes(results, args)
        print(f"load average {os.getloadavg()[0]:.2f} at the end; {time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
