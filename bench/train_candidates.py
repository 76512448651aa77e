"""Training cost per candidate and data size: bucketml's whole path (preprocess: read, type,
split; train: search, fit, ONNX export, parity gate, register) against a plain scikit-learn
fit of the same estimator with default settings on the same rows.

    .venv/bin/python bench/train_candidates.py [--rows 10000 100000 1000000] [--candidates ...]

Every measurement runs in its own process: wall time and that process's peak RSS
(ru_maxrss). The data is synthetic classification: 8 numeric and 3 categorical columns with
missing values. Rows above BUCKETML_MAX_ROWS (200,000 by default) are sampled by preprocess,
as in production; the table shows how many rows were trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

CANDIDATES = ["logistic_regression", "svm", "gradient_boosting", "random_forest"]

BUCKETML = """
import json, resource, time
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage
from bucketml.steps.train import handle_prepared
storage = LocalStorage(BUCKET)
info = storage.write("datasets/bench/data.csv", open(CSV, "rb").read(),
                     metadata={"target": "label", "algorithms": CANDIDATE, "max_training_seconds": "3600"})
started = time.perf_counter()
prepared = handle_finalized(storage, info.event_data())
prepared_at = time.perf_counter()
reply = handle_prepared(storage, prepared.data)[-1]  # the last event announced
done = time.perf_counter()
card = Registry(storage).card("bench", reply.data["version"])
print(json.dumps({"preprocess": prepared_at - started, "train": done - prepared_at,
                  "rows": card["data"]["rows"]["train"], "score": card["metrics"]["accuracy"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SKLEARN = """
import json, resource, time
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC
frame = pd.read_csv(CSV)
y = frame.pop("label")
x_train, x_test, y_train, y_test = train_test_split(frame, y, test_size=0.2, random_state=42, stratify=y)
numbers = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
strings = [c for c in frame.columns if c not in numbers]
prepare = ColumnTransformer([
    ("n", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numbers),
    ("s", make_pipeline(SimpleImputer(strategy="constant", fill_value=""), OneHotEncoder(handle_unknown="ignore")), strings),
], sparse_threshold=0)
model = {"logistic_regression": LogisticRegression(max_iter=1000), "svm": SVC(),
         "gradient_boosting": HistGradientBoostingClassifier(),
         "random_forest": RandomForestClassifier(n_jobs=1)}[CANDIDATE]
started = time.perf_counter()
pipeline = make_pipeline(prepare, model).fit(x_train, y_train)
done = time.perf_counter()
print(json.dumps({"train": done - started, "rows": len(x_train), "score": pipeline.score(x_test, y_test),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    numbers = rng.normal(size=(rows, 8)).astype(np.float32)
    frame = pd.DataFrame(numbers, columns=[f"x{i}" for i in range(8)])
    for name, values in (("city", ["a", "b", "c", "d", "e"]), ("plan", ["basic", "plus", "pro"]), ("channel", ["web", "app"])):
        frame[name] = rng.choice(values, rows)
    signal = numbers[:, 0] + 0.5 * numbers[:, 1] ** 2 - numbers[:, 2] + (frame["plan"] == "pro") + rng.normal(0, 0.5, rows)
    frame["label"] = np.where(signal > 0.5, "yes", "no")
    frame.loc[rng.random(rows) < 0.05, "x3"] = np.nan
    frame.loc[rng.random(rows) < 0.05, "city"] = None
    frame.to_csv(path, index=False, float_format="%.5g")


def run(code: str, **values) -> dict:
    header = "".join(f"{key} = {value!r}\n" for key, value in values.items())
    done = subprocess.run([sys.executable, "-c", header + code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES, choices=CANDIDATES)
    parser.add_argument("--peer-svm-max-rows", type=int, default=20_000,
                        help="plain SVC is quadratic: skip the peer above this many rows")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'rows':>9} {'candidate':<20} {'who':<9} {'trained on':>10} {'preprocess s':>12} {'train s':>8} "
          f"{'accuracy':>8} {'peak RSS MiB':>12}")
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="bucketml-bench-") as folder:
            csv = Path(folder) / "data.csv"
            generate(csv, rows)
            for candidate in args.candidates:
                results = [("bucketml", run(BUCKETML, BUCKET=str(Path(folder) / f"bucket-{candidate}"), CSV=str(csv), CANDIDATE=candidate))]
                if candidate != "svm" or rows * 0.8 <= args.peer_svm_max_rows:
                    results.append(("sklearn", run(SKLEARN, CSV=str(csv), CANDIDATE=candidate)))
                else:
                    results.append(("sklearn", {"error": f"skipped: exact SVC on {int(rows * 0.8):,} rows is quadratic"}))
                for who, r in results:
                    if "error" in r:
                        print(f"{rows:>9,} {candidate:<20} {who:<9} {r['error']}")
                        continue
                    pre = f"{r['preprocess']:.1f}" if "preprocess" in r else "-"
                    print(f"{rows:>9,} {candidate:<20} {who:<9} {r['rows']:>10,} {pre:>12} {r['train']:>8.1f} "
                          f"{r['score']:>8.3f} {r['peak_rss_mib']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
