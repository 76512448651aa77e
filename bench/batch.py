"""Batch prediction: rows per second on one core, and peak memory for a large file.

    .venv/bin/python bench/batch.py [--rows 1000000 | --gib 1] [--algorithm random_forest] [--train-rows 5000] [--keep]

A numeric random forest is trained through the platform's own steps (preprocess and train,
`algorithms: random_forest`, or the candidate `--algorithm` names) on 5,000 generated rows
(`--train-rows`) of 8 number columns with a few blanks, in a temporary folder bucket. Then a file of generated rows (`--rows`, or `--gib` GiB) is
written under batch/<model>/ and the batch step (`bucketml.steps.batch.handle_finalized`:
read from the bucket in chunks, score, write the temporary file, store it create-only) runs in
a fresh process pinned to core 0 (`taskset -c 0`; onnxruntime runs one thread). The figures
are that process's wall time for the whole step, the scoring time the step reports, and its
peak RSS (VmHWM in /proc/self/status: ru_maxrss would count the parent's memory at the fork).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
FEATURES = [f"x{i}" for i in range(8)]
MODEL = "forest"


def frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, len(FEATURES))).round(4)
    data = pd.DataFrame(values, columns=FEATURES)
    score = values[:, 0] + 0.5 * values[:, 1] * values[:, 2] - values[:, 3] ** 2 + 0.3 * rng.normal(size=rows)
    data["label"] = np.where(score > -0.5, "yes", "no")
    data = data.mask(rng.random(data.shape) < 0.02)  # a few missing values
    data["label"] = data["label"].fillna("no")
    return data


def train(storage, algorithm: str, rows: int) -> int:
    from bucketml.steps import preprocess, train as trainer

    info = storage.write(f"datasets/{MODEL}/train.csv", frame(rows, 0).to_csv(index=False).encode(),
                         content_type="text/csv", metadata={"algorithms": algorithm})
    prepared = preprocess.handle_finalized(storage, info.event_data())
    reply = trainer.handle_prepared(storage, prepared.data)[-1]
    assert reply["type"] == "bucketml.model.published.v1", reply.data
    return reply.data["version"]


def generate(path: Path, rows: int | None, gib: float | None) -> int:
    """A header and generated rows (no label), by repeating a 100,000-row block; rows written."""
    block = frame(100_000, 1)[FEATURES].to_csv(index=False)
    header, body = block.split("\n", 1)
    data = body.encode()
    per_block = body.count("\n")
    written = 0
    with open(path, "wb") as f:
        f.write((header + "\n").encode())
        if gib is not None:
            target = int(gib * (1 << 30))
            while f.tell() < target:
                f.write(data)
                written += per_block
        else:
            while written + per_block <= rows:
                f.write(data)
                written += per_block
            rest = rows - written
            if rest:
                f.write(b"".join(line + b"\n" for line in data.split(b"\n")[:rest]))
                written += rest
    return written


STEP = """
import json, re, sys, time
from bucketml.storage.local import LocalStorage
from bucketml.steps import batch
storage = LocalStorage(sys.argv[1])
info = storage.stat(sys.argv[2])
started = time.perf_counter()
reply = batch.handle_finalized(storage, info.event_data())
wall = time.perf_counter() - started
print(json.dumps({"type": reply["type"], "data": reply.data, "wall": wall,
                  "peak_rss_mib": int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read())[1]) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, default=1_000_000, help="rows to score (default 1,000,000)")
    size.add_argument("--gib", type=float, help="score a generated file of this many GiB instead")
    parser.add_argument("--algorithm", default="random_forest",
                        help="the candidate to train (default random_forest; logistic_regression shows what reading and "
                             "writing cost beside a model that costs almost nothing)")
    parser.add_argument("--train-rows", type=int, default=5_000,
                        help="rows to train on (default 5,000): a forest's trees, and so its cost per row, grow with them")
    parser.add_argument("--keep", action="store_true", help="keep the temporary bucket")
    args = parser.parse_args()

    from bucketml.storage.local import LocalStorage

    folder = Path(tempfile.mkdtemp(prefix="bucketml-bench-batch-"))
    storage = LocalStorage(folder / "bucket")
    import onnxruntime

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}; load average {os.getloadavg()[0]:.2f} at start")
    started = time.perf_counter()
    version = train(storage, args.algorithm, args.train_rows)
    card = json.loads(storage.read(f"models/{MODEL}/versions/{version}/card.json"))
    params = next((c.get("params") for c in card.get("candidates", []) if c.get("name") == card["algorithm"]), None)
    print(f"model: {MODEL} version {version}, {card['algorithm']} {params or ''} on {args.train_rows:,} rows "
          f"(ONNX {len(storage.read(f'models/{MODEL}/versions/{version}/model.onnx')) / (1 << 20):.1f} MiB), "
          f"trained in {time.perf_counter() - started:.1f}s")

    name = f"batch/{MODEL}/big.csv"
    path = Path(storage.root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = generate(path, None if args.gib else args.rows, args.gib)
    print(f"file: {rows:,} rows, {path.stat().st_size / (1 << 20):,.0f} MiB, generated in {time.perf_counter() - started:.1f}s")

    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    done = subprocess.run([*pin, sys.executable, "-c", STEP, str(storage.root), name], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    data = result["data"]
    assert result["type"] == "bucketml.batch.completed.v1", data
    output = Path(storage.root) / data["output"]
    print(f"pinned: {'core 0 (taskset -c 0)' if pin else 'no (taskset missing)'}, onnxruntime intra-op threads 1")
    print(f"{'rows':>12}{'scoring s':>11}{'rows/s':>12}{'step s':>9}{'rows/s':>12}{'peak RSS MiB':>14}{'output MiB':>12}")
    print(f"{data['rows']:>12,}{data['seconds']:>11.1f}{data['rows'] / data['seconds']:>12,.0f}{result['wall']:>9.1f}"
          f"{data['rows'] / result['wall']:>12,.0f}{result['peak_rss_mib']:>14.0f}{output.stat().st_size / (1 << 20):>12,.0f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other work on the machine slows the figures)")
    if args.keep:
        print(f"kept: {folder}")
    else:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
