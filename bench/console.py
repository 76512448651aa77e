"""The console's server time per page with 50 models of 20 versions each, on this machine.

    PYTHONPATH=shared .venv/bin/python bench/console.py                # 50 x 20, 20,000 events, 30 requests a page
    PYTHONPATH=shared .venv/bin/python bench/console.py --models 5 --versions 3 --requests 5   # a smoke run

The bucket is a temporary local folder filled through the registry (Registry.register): every
version is a real one, the same small ONNX model (a logistic regression on iris, exported with
skl2onnx) with a generated card (metrics, a 12-column schema, row counts, lineage, promotion)
and a small report.html; each model also has 3 rejected uploads. The console is the app the
console function serves (bucketml.console.app.Console), called in-process over ASGI with
httpx's transport, so the figure is the server's time for a page (routing, bucket reads,
rendering) without a network or a browser. The events page reads a real local broker
(`python -m bucketml.local.broker`) whose log holds --events events (written into its SQLite
store before it starts, with no deliveries); the page walks the whole log, a page of 1000 at a
time, to show the newest 200. The upload page's form is static.

Prints the time of each page's first request (cold: every card it shows is read and parsed, then
kept, see bucketml.console.views.Cards), then the median and p95 of --requests sequential
requests per page after 2 more warm-up requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODEL_PAGE_OF = "model-007"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def onnx_bytes() -> bytes:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    fitted = LogisticRegression(max_iter=500).fit(features, labels)
    return to_onnx(fitted, features[:1].astype("float32")).SerializeToString()


def card(model: str, version: int) -> dict:
    columns = [{"name": f"feature_{i}", "type": "number" if i % 3 else "string",
                **({} if i % 3 else {"categories": ["a", "b", "c"]})} for i in range(12)]
    return {
        "task": "classification", "target": "label", "algorithm": ["svm", "random_forest", "ensemble"][version % 3],
        "metric": "balanced_accuracy",
        "metrics": {"balanced_accuracy": 0.80 + version / 200, "accuracy": 0.82, "f1_macro": 0.79, "roc_auc": 0.9},
        "schema": {"task": "classification", "target": "label", "columns": columns, "classes": ["no", "yes"]},
        "data": {"rows": {"uploaded": 1000, "used": 1000, "train": 800, "test": 200}},
        "lineage": {"upload": {"bucket": "bench", "name": f"datasets/{model}/upload-{version}.csv", "generation": version}},
        "promotion": {"policy": "always", "promoted": True, "reason": f"policy always: version {version} promoted"},
    }


def fill_events(db: Path, count: int, models: int) -> None:
    from bucketml.local.broker.store import NewEvent, Store

    store = Store(db)
    for i in range(count):
        model = f"model-{i % models:03d}"
        attributes = {"specversion": "1.0", "id": f"bench-{i}", "source": "//bench", "type": "bucketml.model.published.v1",
                      "subject": model, "time": "2026-12-06T10:00:00Z", "datacontenttype": "application/json",
                      "bucketmlmodel": model}
        data = {"model": model, "version": 1 + i % 20, "current_version": 1 + i % 20, "algorithm": "svm",
                "metric": "accuracy", "metrics": {"accuracy": 0.9}, "upload": {"bucket": "bench", "name": "x", "generation": i}}
        store.add_event(NewEvent(attributes, json.dumps(data).encode(), []))
    store.close()


def start_broker(db: Path, port: int):
    import subprocess
    import urllib.request

    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "bucketml.local.broker", "--manifests", str(root / "infra" / "knative"), "--db", str(db),
            "--host", "127.0.0.1", "--port", str(port)]
    for name in ("preprocess", "train", "predict", "deadletter", "monitor"):
        argv += ["--subscriber", f"{name}=http://127.0.0.1:9"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the local broker did not start")


def fill(bucket: Path, models: int, versions: int) -> None:
    from bucketml.contracts.rejections import outcome_object
    from bucketml.registry.model_registry import Registry
    from bucketml.storage import LocalStorage

    storage = LocalStorage(bucket)
    registry = Registry(storage)
    model_bytes = onnx_bytes()
    report = b"<!doctype html><title>report</title><p>bench</p>"
    for m in range(models):
        name = f"model-{m:03d}"
        for v in range(1, versions + 1):
            written = card(name, v)

            def build_report(n: int, written: dict = written, name: str = name) -> bytes:
                written["report"] = Registry.version_prefix(name, n) + "report.html"  # as training records it
                return report

            registry.register(name, lambda n: model_bytes, written, artifacts={"report.html": build_report})
        registry.move_pointer(name, versions, reason="bench")
        for r in range(3):
            record = {"model": name, "upload": {"bucket": "bench", "name": f"datasets/{name}/bad-{r}.csv", "generation": r},
                      "reason": "no_target", "message": "no target column found", "time": f"2026-12-06T10:00:0{r}Z",
                      "report": outcome_object("rejected", name, f"bad-{r}.csv", r)}
            storage.write(outcome_object("rejected", name, f"bad-{r}.csv", r), json.dumps(record).encode())


async def measure(app, pages: dict[str, str], requests: int) -> dict[str, list[float]]:
    import httpx

    timings: dict[str, list[float]] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for label, path in pages.items():
            started = time.perf_counter()
            await client.get(path)  # the first request reads and parses every card it shows: the cold figure
            timings[f"{label}, first request"] = [(time.perf_counter() - started) * 1000]
            for _ in range(2):
                await client.get(path)
            found = []
            for _ in range(requests):
                started = time.perf_counter()
                response = await client.get(path)
                found.append((time.perf_counter() - started) * 1000)
                assert response.status_code in (200,), f"{path}: HTTP {response.status_code}"
            timings[label] = found
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--events", type=int, default=20000, help="events in the broker's log")
    args = parser.parse_args()

    import os

    from bucketml.auth import Policy
    from bucketml.console.access import Sessions
    from bucketml.console.app import Console
    from bucketml.storage import LocalStorage

    with tempfile.TemporaryDirectory(prefix="bucketml-console-bench-") as folder:
        bucket = Path(folder) / "bucket"
        started = time.perf_counter()
        fill(bucket, args.models, args.versions)
        print(f"filled {args.models} models x {args.versions} versions in {time.perf_counter() - started:.1f} s")
        os.environ["BUCKETML_BUCKET"] = str(bucket)
        db = Path(folder) / "broker.sqlite"
        fill_events(db, args.events, args.models)
        port = free_port()
        broker = start_broker(db, port)
        console = Console(LocalStorage(bucket), Sessions(Policy(None), None), f"http://127.0.0.1:{port}",
                          "http://127.0.0.1:9", secure_cookie=False)
        model = MODEL_PAGE_OF if args.models > 7 else "model-000"
        pages = {
            "models (/)": "/",
            f"model (/models/{model})": f"/models/{model}",
            "report": f"/models/{model}/versions/1/report",
            f"events (/events, {args.events} in the log)": "/events",
            "events (/events?model=model-001)": "/events?model=model-001",
            "upload": "/upload",
        }
        try:
            timings = asyncio.run(measure(console, pages, args.requests))
        finally:
            broker.terminate()
            broker.wait(10)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'page':<44}{'median ms':>10}{'p95 ms':>10}")
    for label, values in timings.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
        print(f"{label:<44}{statistics.median(values):>10.1f}{p95:>10.1f}")


if __name__ == "__main__":
    main()
