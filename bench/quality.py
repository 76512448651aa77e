"""Model quality: what bucketml serves after an upload, scored on held-out rows, beside
scikit-learn's HistGradientBoosting with default settings and FLAML's AutoML given the same
wall-clock time, on real public tabular datasets, in one run on this machine.

    .venv/bin/python bench/quality.py                                   # every dataset (about 15 minutes on 2 cores)
    .venv/bin/python bench/quality.py --datasets wine,penguins --no-flaml   # a smoke run
    .venv/bin/python bench/quality.py --no-flaml                        # bucketml and HGB only
    .venv/bin/python bench/quality.py --list                            # the datasets and their sources
    .venv/bin/python bench/quality.py --json results.json --keep        # keep the files, write the results
    .venv/bin/python bench/quality.py --splits 3                        # each dataset on 3 splits, scores averaged

Datasets: 21 real datasets that Python packages ship inside their wheels (scikit-learn,
palmerpenguins, ISLP, statsmodels, vega_datasets), nothing downloaded at run time. They are
read by this same file run under bench/.quality-venv's Python (`quality.py _load`), which
writes each one as a CSV plus a manifest; columns that give the answer away (Weekly's Today,
Wage's logwage, Bikeshare's casual and registered, fair's affairs) are dropped, as a user who
knows the data would. The venv is created and filled from bench/quality-requirements.txt on
first use (and again when that file changes).

Per dataset: one seeded split (random_state=0), 80% to train and 20% held out, stratified for
classification; with --splits N, N splits (random_state 0..N-1), each uploaded as its own model
and scored the same way, and the table shows each contestant's mean over them (a held-out 20%
of a few hundred rows moves a score by a few rows, and a class with 5 held-out rows moves
balanced accuracy by 0.04 a row). The 80% is uploaded as a CSV through a running platform (`bucketml dev` with
its own temporary bucket, state folder and free ports) with `bucketml upload FILE --model NAME
--target COL --task TASK`; upload->served is the wall clock around that command, which returns
once predict serves the new version. The held-out rows are then sent to POST /predict as they
are in their file (every column, the target included: predict ignores the columns it does not
take) in requests of 1,000 records. The peers train on the same 80% file and predict the same
20% file:
  - HGB: HistGradientBoostingClassifier/Regressor(random_state=0), class_weight="balanced" when
    the classes are imbalanced; string columns become pandas categories (native categorical
    support), or ordinal codes past HGB's 255-category limit, ISO date strings become day
    numbers; missing numbers stay missing (native). Run in the project's venv, one OpenMP thread.
  - FLAML: AutoML(time_budget = bucketml's upload->served seconds for that dataset, at least
    5 s; seed=0; n_jobs=1, the one thread bucketml's training search uses; verbose=0; default
    estimator list; metric as below), run in bench/.quality-venv. ISO date strings are passed as
    datetimes (FLAML derives its own date features); other strings as they are.

Scoring rule, the same for every contestant: classification -> accuracy, except when the
training rows (the 80% split) are imbalanced, largest class count / smallest class count >= 3,
then balanced accuracy; regression -> R^2 (FLAML is asked to optimise that same metric).
A dataset whose upload is rejected or fails shows the reason in its row and counts as not
served; one whose predictions cannot be had counts as served but not answered; the run goes on.
The summary's means are over the datasets bucketml answered (and, for a peer, that it scored).
"""

from __future__ import annotations

import argparse
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
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import ensure_venv, machine, versions  # bench/common.py: this folder is the first import path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
QUALITY_VENV = BENCH / ".quality-venv"
QUALITY_REQUIREMENTS = BENCH / "quality-requirements.txt"
BUCKETML = REPO / ".venv" / "bin" / "bucketml"
SEED = 0
TEST_SIZE = 0.2
IMBALANCE_RATIO = 3.0  # largest / smallest class count in the training rows
MIN_FLAML_BUDGET = 5.0
FLAML_JOBS = 1
PREDICT_BATCH = 1_000  # rows per /predict request (the function takes up to 10,000)
SMALL_ROWS = 5_000  # the summary's upload->served median is over datasets up to this many rows
HGB_MAX_CATEGORIES = 255  # HistGradientBoosting's limit for a native categorical column
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?$")


# --------------------------------------------------------------------------- datasets
# Every loader runs in bench/.quality-venv (it imports the dataset packages) and returns the
# frame exactly as it is uploaded: the target column and the feature columns, nothing else.


@dataclass(frozen=True)
class Dataset:
    name: str  # also the bucketml model name
    source: str  # the package that ships it (its version goes into the manifest)
    target: str
    task: str  # "classification" or "regression"
    note: str  # what it is, and what was dropped


def islp_csv(name: str):
    """A CSV of ISLP/data/, found without importing ISLP (its __init__ needs scikit-learn, and
    its declared dependencies, torch among them, are not installed)."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("ISLP")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return pd.read_csv(folder / f"{name}.csv")


def statsmodels_frame(name: str):
    import importlib

    return importlib.import_module(f"statsmodels.datasets.{name}").load_pandas().data


def load_breast_cancer():
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame["target"] = frame["target"].map({0: "malignant", 1: "benign"})
    return frame


def load_wine():
    from sklearn.datasets import load_wine

    return load_wine(as_frame=True).frame


def load_digits():
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame


def load_diabetes():
    from sklearn.datasets import load_diabetes

    return load_diabetes(as_frame=True, scaled=False).frame  # the measurements, not standardised


def load_penguins():
    import palmerpenguins

    return palmerpenguins.load_penguins()


def load_weekly():
    return islp_csv("Weekly").drop(columns=["Today"])  # Direction is the sign of Today's return


def load_hitters():
    # 59 players have no Salary: a row without its target can be neither learned nor scored.
    return islp_csv("Hitters").dropna(subset=["Salary"])


def load_wage():
    return islp_csv("Wage").drop(columns=["logwage"])  # log(wage), the target itself


def load_bikeshare():
    return islp_csv("Bikeshare").drop(columns=["casual", "registered"])  # bikers = casual + registered


def load_fair():
    frame = statsmodels_frame("fair")
    frame["affair"] = (frame["affairs"] > 0).map({True: "yes", False: "no"})
    return frame.drop(columns=["affairs"])  # the time spent in affairs defines the label


def load_anes96():
    frame = statsmodels_frame("anes96")
    frame["vote"] = frame["vote"].map({0: "Clinton", 1: "Dole"})  # statsmodels' coding of the 1996 vote
    return frame


def load_seattle_weather():
    from vega_datasets import local_data

    frame = local_data.seattle_weather()
    frame["date"] = frame["date"].dt.strftime("%Y-%m-%d")  # kept, as the date string a user's CSV has
    return frame


DATASETS: list[tuple[Dataset, Callable[[], Any]]] = [
    (Dataset("breast_cancer", "scikit-learn", "target", "classification", "Wisconsin diagnostic, 30 measurements"), load_breast_cancer),
    (Dataset("wine", "scikit-learn", "target", "classification", "3 cultivars, 13 chemical measurements"), load_wine),
    (Dataset("digits", "scikit-learn", "target", "classification", "8x8 handwritten digits, 10 classes, 64 pixel columns"), load_digits),
    (Dataset("diabetes", "scikit-learn", "target", "regression", "disease progression after a year, unscaled"), load_diabetes),
    (Dataset("penguins", "palmerpenguins", "species", "classification", "Palmer penguins, strings and missing values"), load_penguins),
    (Dataset("default", "ISLP", "default", "classification", "credit card default, about 3% positive"), lambda: islp_csv("Default")),
    (Dataset("caravan", "ISLP", "Purchase", "classification", "insurance purchase, 85 columns, about 6% positive"), lambda: islp_csv("Caravan")),
    (Dataset("oj", "ISLP", "Purchase", "classification", "orange juice brand purchased"), lambda: islp_csv("OJ")),
    (Dataset("college", "ISLP", "Private", "classification", "US colleges, private or public"), lambda: islp_csv("College")),
    (Dataset("weekly", "ISLP", "Direction", "classification", "S&P 500 weekly direction; Today dropped"), load_weekly),
    (Dataset("hitters", "ISLP", "Salary", "regression", "baseball salaries, skewed; rows without Salary dropped"), load_hitters),
    (Dataset("wage", "ISLP", "wage", "regression", "Mid-Atlantic wages; logwage dropped"), load_wage),
    (Dataset("bikeshare", "ISLP", "bikers", "regression", "hourly bike rentals; casual and registered dropped"), load_bikeshare),
    (Dataset("auto", "ISLP", "mpg", "regression", "car fuel economy, with the car's name"), lambda: islp_csv("Auto")),
    (Dataset("carseats", "ISLP", "Sales", "regression", "child car seat sales (simulated by the book)"), lambda: islp_csv("Carseats")),
    (Dataset("boston", "ISLP", "medv", "regression", "Boston median house value"), lambda: islp_csv("Boston")),
    (Dataset("fair", "statsmodels", "affair", "classification", "had an affair (affairs > 0); affairs dropped"), load_fair),
    (Dataset("anes96", "statsmodels", "vote", "classification", "1996 US presidential vote"), load_anes96),
    (Dataset("grunfeld", "statsmodels", "invest", "regression", "gross investment of 11 US firms, 1935-1954"), lambda: statsmodels_frame("grunfeld")),
    (Dataset("randhie", "statsmodels", "mdvis", "regression", "RAND health insurance experiment, doctor visits"), lambda: statsmodels_frame("randhie")),
    (Dataset("seattle_weather", "vega_datasets", "weather", "classification", "daily weather type, 5 imbalanced classes, date column"), load_seattle_weather),
]
BY_NAME = {dataset.name: (dataset, loader) for dataset, loader in DATASETS}


def load_datasets(folder: Path, names: list[str]) -> None:
    """`quality.py _load FOLDER NAMES` (in the quality venv): each dataset as FOLDER/<name>.csv,
    and FOLDER/manifest.json describing them."""
    import importlib.metadata

    manifest = []
    for name in names:
        dataset, loader = BY_NAME[name]
        frame = loader().reset_index(drop=True)
        path = folder / f"{name}.csv"
        frame.to_csv(path, index=False)
        manifest.append({**asdict(dataset), "rows": len(frame), "columns": frame.shape[1] - 1, "csv": str(path),
                         "source_version": importlib.metadata.version(dataset.source)})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------- shared helpers


def label(value: Any) -> str:
    """One spelling for a class label, whoever wrote it: 3, 3.0 and "3" are all "3"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def date_columns(frame) -> list[str]:
    """String columns whose every value is an ISO 8601 date (or date and time)."""
    import pandas as pd

    found = []
    for column in frame.columns:
        values = frame[column].dropna()
        if (pd.api.types.is_string_dtype(frame[column]) and len(values)
                and values.astype(str).str.match(ISO_DATE).all()):
            found.append(column)
    return found


def balanced_accuracy_loss(X_val, y_val, estimator, labels, X_train, y_train, *_, **__):
    """FLAML's custom metric signature: (X_val, y_val, estimator, labels, X_train, y_train,
    weight_val, weight_train, config, groups_val, groups_train) -> (loss to minimise, logged)."""
    from sklearn.metrics import balanced_accuracy_score

    score = balanced_accuracy_score(y_val, estimator.predict(X_val))
    return 1.0 - score, {"balanced_accuracy": score}


def run_flaml(job_path: Path) -> None:
    """`quality.py _flaml JOB.json` (in the quality venv): fit AutoML on the training file,
    write the predictions for the held-out file."""
    import warnings

    import pandas as pd
    from flaml import AutoML

    warnings.filterwarnings("ignore")
    job = json.loads(job_path.read_text())
    train, test = pd.read_csv(job["train"]), pd.read_csv(job["test"])
    target = job["target"]
    X_train, X_test = train.drop(columns=[target]), test.drop(columns=[target])
    for column in date_columns(X_train):
        X_train[column], X_test[column] = pd.to_datetime(X_train[column]), pd.to_datetime(X_test[column], errors="coerce")
    classification = job["task"] == "classification"
    y_train = train[target].map(label) if classification else train[target].astype(float)
    metric = {"accuracy": "accuracy", "r2": "r2", "balanced_accuracy": balanced_accuracy_loss}[job["metric"]]
    automl = AutoML()
    started = time.perf_counter()
    automl.fit(X_train, y_train, task=job["task"], metric=metric, time_budget=job["time_budget"], seed=SEED,
               n_jobs=job["n_jobs"], verbose=0)
    predictions = automl.predict(X_test)
    seconds = time.perf_counter() - started
    predictions = [label(p) for p in predictions] if classification else [float(p) for p in predictions]
    Path(job["out"]).write_text(json.dumps({"predictions": predictions, "seconds": seconds,
                                            "best_estimator": automl.best_estimator}))


# --------------------------------------------------------------------------- the quality venv


def quality_python() -> Path:
    """The quality venv, (re)installed when bench/quality-requirements.txt changes."""
    return ensure_venv(QUALITY_VENV, QUALITY_REQUIREMENTS, "FLAML and the dataset packages")


# --------------------------------------------------------------------------- the platform


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open while choosing, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def platform_env() -> dict[str, str]:
    """The environment without BUCKETML_* settings: the platform runs as it ships (no token on
    loopback, default limits), whatever the shell that starts the benchmark has set."""
    return {key: value for key, value in os.environ.items() if not key.startswith("BUCKETML_")}


@dataclass
class Platform:
    process: subprocess.Popen
    bucket: Path
    state: Path
    log: Path
    predict_url: str
    broker_url: str


def start_platform(folder: Path) -> Platform:
    """`bucketml dev` on its own bucket, state folder and ports, once it says it is ready."""
    predict, broker, preprocess, train, deadletter, batch = free_ports(6)
    bucket, state, log = folder / "bucket", folder / "state", folder / "dev.log"
    argv = [str(BUCKETML), "dev", "--bucket", str(bucket), "--state-dir", str(state),
            "--predict-port", str(predict), "--broker-port", str(broker), "--preprocess-port", str(preprocess),
            "--train-port", str(train), "--deadletter-port", str(deadletter), "--batch-port", str(batch)]
    with log.open("w") as out:
        # Own session: its process group is ours to signal, and Ctrl-C in this terminal reaches
        # only this script, which then stops the platform in order.
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=folder, env=platform_env(), start_new_session=True)
    running = Platform(process, bucket, state, log, f"http://127.0.0.1:{predict}", f"http://127.0.0.1:{broker}")
    deadline = time.monotonic() + 180
    while "ready; press Ctrl-C" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_platform(running)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"bucketml dev did not become ready; the end of its log:\n{tail}")
        time.sleep(0.2)
    return running


def stop_platform(running: Platform) -> None:
    """SIGTERM to `bucketml dev` (it stops its parts in order), then SIGKILL to whatever is
    left: its own process group and each part's (every part leads its own session)."""
    try:
        parts = list(json.loads((running.state / "dev.pids.json").read_text())["parts"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        parts = []
    if running.process.poll() is None:
        try:
            os.killpg(running.process.pid, signal.SIGTERM)
            running.process.wait(45)  # three stages of at most 10 s each
            return  # it stopped its parts itself
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    for group in [running.process.pid, *parts]:  # only when it did not stop, or died early
        try:
            os.killpg(int(group), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass
    try:
        running.process.wait(5)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Upload:
    served: bool
    seconds: float
    version: int | None = None
    algorithm: str | None = None  # the candidate bucketml published, and its own validation score
    reason: str | None = None
    output: str = ""


def dead_letter(running: Platform, model: str) -> str | None:
    """Why the broker gave up delivering one of `model`'s events, if it did: `bucketml upload`
    would otherwise wait out its whole --timeout for an outcome that never comes."""
    try:
        with urllib.request.urlopen(running.broker_url + "/deadletters", timeout=5) as answer:
            dead = json.loads(answer.read())["deadletters"]
    except (OSError, ValueError, KeyError):
        return None
    for record in dead:
        if (record.get("event") or {}).get("model") == model:
            error = (record.get("last_error") or "").strip()
            return f"dead letter: {record.get('trigger')} after {record.get('attempts')} attempt(s): {error[:160]}"
    return None


def upload(running: Platform, csv: Path, model: str, target: str, task: str, timeout: float) -> Upload:
    """`bucketml upload` timed with the wall clock; served once it prints `served <model> version <n>`."""
    argv = [str(BUCKETML), "upload", str(csv), "--model", model, "--target", target, "--task", task,
            "--timeout", str(timeout), "--bucket", str(running.bucket), "--broker", running.broker_url,
            "--predict-url", running.predict_url]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=platform_env())
    dead, checked = None, started
    try:
        while process.poll() is None:
            time.sleep(0.05)  # the wall clock is read within 50 ms of the command's end
            if time.perf_counter() - checked >= 2:
                checked = time.perf_counter()
                dead = dead_letter(running, model)
                if dead:
                    process.terminate()
                    break
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0].strip()
    seconds = time.perf_counter() - started
    served = re.search(rf"served\s+{re.escape(model)} version (\d+)", output)
    published = re.search(rf"published\s+{re.escape(model)} version \d+: (.+)", output)
    if process.returncode == 0 and served:
        return Upload(True, seconds, int(served.group(1)), published.group(1).strip() if published else None, output=output)
    # The outcome line (`failed ...`, `rejected ...`, `error: ...`), squeezed onto one line.
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    outcome = next((line for line in lines if re.match(r"(failed|rejected|error:)", line)), lines[-1] if lines else "no output")
    reason = dead or f"upload exit {process.returncode}: {' '.join(outcome.split())}"
    return Upload(False, seconds, reason=reason, output=output)


def predict(running: Platform, model: str, test_csv: Path) -> list:
    """The held-out rows, every column as read from their file, to POST /predict in batches."""
    import pandas as pd

    frame = pd.read_csv(test_csv)
    # NaN -> null (a missing value to predict); numpy scalars -> Python numbers for JSON.
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    predictions: list = []
    for start in range(0, len(records), PREDICT_BATCH):
        body = json.dumps({"model": model, "records": records[start:start + PREDICT_BATCH]},
                          default=lambda value: value.item()).encode()
        request = urllib.request.Request(running.predict_url + "/predict", body,
                                         {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                predictions += json.loads(answer.read())["predictions"]
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:200]
            raise RuntimeError(f"predict: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(f"predict: {exc}") from None
    return predictions


# --------------------------------------------------------------------------- the peers and scoring


def imbalance(y) -> float:
    counts = y.value_counts()
    return float(counts.max() / counts.min())


def metric_for(task: str, y_train) -> str:
    if task == "regression":
        return "r2"
    return "balanced_accuracy" if imbalance(y_train) >= IMBALANCE_RATIO else "accuracy"


def score(metric: str, truth: list, predictions: list) -> float:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, r2_score

    if metric == "r2":
        return float(r2_score([float(t) for t in truth], [float(p) for p in predictions]))
    truth, predictions = [label(t) for t in truth], [label(p) for p in predictions]
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(truth, predictions))
    return float(accuracy_score(truth, predictions))


def hgb_frames(X_train, X_test):
    """The least encoding HGB needs: strings -> categories (codes past its 255-category limit),
    ISO dates -> day numbers; numbers as they are, missing ones included."""
    import numpy as np
    import pandas as pd

    X_train, X_test = X_train.copy(), X_test.copy()
    dates = set(date_columns(X_train))
    for column in X_train.columns:
        if column in dates:
            for frame in (X_train, X_test):
                days = pd.to_datetime(frame[column], errors="coerce")
                frame[column] = (days - pd.Timestamp("1970-01-01")) / pd.Timedelta(days=1)
        elif pd.api.types.is_bool_dtype(X_train[column]):
            X_train[column], X_test[column] = X_train[column].astype(float), X_test[column].astype(float)
        elif not pd.api.types.is_numeric_dtype(X_train[column]):
            known = sorted(X_train[column].dropna().astype(str).unique())
            kind = pd.CategoricalDtype(known)
            train_values = X_train[column].astype(str).where(X_train[column].notna())
            test_values = X_test[column].astype(str).where(X_test[column].notna())
            test_values = test_values.where(test_values.isin(known))  # a category unseen in training: missing
            X_train[column], X_test[column] = train_values.astype(kind), test_values.astype(kind)
            if len(known) > HGB_MAX_CATEGORIES:
                for frame in (X_train, X_test):
                    codes = frame[column].cat.codes.astype(float)
                    frame[column] = codes.where(codes >= 0, np.nan)
    return X_train, X_test


def run_hgb(train, test, target: str, task: str, metric: str) -> list:
    """Default HGB on one OpenMP thread: the same one thread bucketml's search and FLAML get,
    and with another process busy on one of the 2 cores, OpenMP's spinning threads made a
    1,168-row fit take minutes. The thread count does not change HGB's predictions."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    X_train, X_test = hgb_frames(train.drop(columns=[target]), test.drop(columns=[target]))
    with threadpool_limits(limits=1, user_api="openmp"):
        if task == "regression":
            model = HistGradientBoostingRegressor(categorical_features="from_dtype", random_state=SEED)
            return model.fit(X_train, train[target].astype(float)).predict(X_test).tolist()
        weight = "balanced" if metric == "balanced_accuracy" else None
        model = HistGradientBoostingClassifier(categorical_features="from_dtype", class_weight=weight, random_state=SEED)
        return model.fit(X_train, train[target].map(label)).predict(X_test).tolist()


def flaml_predict(python: Path, folder: Path, target: str, task: str, metric: str, budget: float) -> tuple[list, float, str]:
    """FLAML in the quality venv (this file's `_flaml` mode): predictions, seconds, best estimator."""
    job = {"train": str(folder / "train.csv"), "test": str(folder / "test.csv"), "target": target, "task": task,
           "metric": metric, "time_budget": budget, "n_jobs": FLAML_JOBS, "out": str(folder / "flaml.json")}
    (folder / "flaml-job.json").write_text(json.dumps(job))
    with (folder / "flaml.log").open("w") as log:
        done = subprocess.run([str(python), str(Path(__file__).resolve()), "_flaml", str(folder / "flaml-job.json")],
                              stdout=log, stderr=subprocess.STDOUT, check=False, timeout=budget * 3 + 300)
    if done.returncode != 0:
        lines = (folder / "flaml.log").read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"FLAML exit {done.returncode}: {lines[-1] if lines else 'no output'}")
    answer = json.loads((folder / "flaml.json").read_text())
    return answer["predictions"], answer["seconds"], answer["best_estimator"]


# --------------------------------------------------------------------------- one dataset


@dataclass
class Result:
    name: str
    source: str
    rows: int
    columns: int
    task: str
    target: str
    classes: int | None = None
    imbalance: float | None = None
    metric: str = ""
    train_rows: int = 0
    test_rows: int = 0
    served: bool = False
    answered: bool = False
    upload_seconds: float | None = None
    bucketml_version: int | None = None
    bucketml_algorithm: str | None = None
    bucketml: float | None = None
    hgb: float | None = None
    flaml: float | None = None
    flaml_seconds: float | None = None
    flaml_budget: float | None = None
    flaml_estimator: str | None = None
    errors: list[str] = field(default_factory=list)


def split(entry: dict, folder: Path, seed: int = SEED):
    """The seeded 80/20 split, written as train.csv and test.csv, read back as every
    contestant reads them."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    frame = pd.read_csv(entry["csv"])
    strata = frame[entry["target"]].map(label) if entry["task"] == "classification" else None
    train, test = train_test_split(frame, test_size=TEST_SIZE, random_state=seed, stratify=strata)
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return pd.read_csv(folder / "train.csv"), pd.read_csv(folder / "test.csv")


def run_dataset(entry: dict, running: Platform, flaml_python: Path | None, folder: Path, upload_timeout: float,
                seed: int = SEED, model: str | None = None) -> Result:
    """One split of one dataset (`seed`), uploaded as model `model` (default: the dataset's name)."""
    target, task = entry["target"], entry["task"]
    model = model or entry["name"]
    result = Result(entry["name"], f"{entry['source']} {entry['source_version']}", entry["rows"], entry["columns"], task, target)
    train, test = split(entry, folder, seed)
    result.train_rows, result.test_rows = len(train), len(test)
    result.metric = metric_for(task, train[target].map(label) if task == "classification" else train[target])
    if task == "classification":
        result.classes = train[target].map(label).nunique()
        result.imbalance = round(imbalance(train[target].map(label)), 2)
    truth = test[target].tolist()

    # bucketml: the training file as a user uploads it (named after the dataset).
    upload_csv = folder / f"{entry['name']}.csv"
    upload_csv.write_bytes((folder / "train.csv").read_bytes())
    outcome = upload(running, upload_csv, model, target, task, upload_timeout)
    (folder / "upload.log").write_text(outcome.output)
    result.upload_seconds, result.served = round(outcome.seconds, 2), outcome.served
    result.bucketml_version, result.bucketml_algorithm = outcome.version, outcome.algorithm
    if outcome.served:
        try:
            predictions = predict(running, model, folder / "test.csv")
            if len(predictions) != len(truth):
                raise RuntimeError(f"predict answered {len(predictions)} predictions for {len(truth)} rows")
            result.bucketml, result.answered = score(result.metric, truth, predictions), True
        except RuntimeError as exc:
            result.errors.append(str(exc))
    else:
        result.errors.append(outcome.reason or "not served")

    try:
        result.hgb = score(result.metric, truth, run_hgb(train, test, target, task, result.metric))
    except Exception as exc:  # a peer's failure is reported in its row, not the end of the run
        result.errors.append(f"HGB: {type(exc).__name__}: {exc}")

    if flaml_python:
        # The same wall clock bucketml took from upload to serving (a failed upload's too).
        result.flaml_budget = round(max(MIN_FLAML_BUDGET, outcome.seconds), 1)
        try:
            predictions, seconds, estimator = flaml_predict(flaml_python, folder, target, task, result.metric, result.flaml_budget)
            result.flaml, result.flaml_seconds, result.flaml_estimator = score(result.metric, truth, predictions), round(seconds, 2), estimator
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
            result.errors.append(f"FLAML: {exc}")
    return result


def averaged(splits: list[Result]) -> Result:
    """One dataset's row over its splits: the mean of each contestant's scores (over the splits
    it scored), the median upload->served seconds; served and answered only if every split was."""
    first = splits[0]
    if len(splits) == 1:
        return first

    def mean_of(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    merged = Result(first.name, first.source, first.rows, first.columns, first.task, first.target, first.classes,
                    first.imbalance, first.metric, first.train_rows, first.test_rows)
    merged.served = all(r.served for r in splits)
    merged.answered = all(r.answered for r in splits)
    seconds = [r.upload_seconds for r in splits if r.upload_seconds is not None]
    merged.upload_seconds = round(statistics.median(seconds), 2) if seconds else None
    merged.bucketml_version = first.bucketml_version
    merged.bucketml_algorithm = "/".join(dict.fromkeys(r.bucketml_algorithm or "-" for r in splits))
    merged.bucketml = mean_of([r.bucketml for r in splits]) if merged.answered else None
    merged.hgb, merged.flaml = mean_of([r.hgb for r in splits]), mean_of([r.flaml for r in splits])
    flaml_seconds = [r.flaml_seconds for r in splits if r.flaml_seconds is not None]
    merged.flaml_seconds = round(statistics.median(flaml_seconds), 2) if flaml_seconds else None
    merged.flaml_estimator = "/".join(dict.fromkeys(r.flaml_estimator for r in splits if r.flaml_estimator)) or None
    merged.errors = [f"split {i + 1}: {e}" for i, r in enumerate(splits) for e in r.errors]
    return merged


# --------------------------------------------------------------------------- report


ERROR_WIDTH = 160  # characters of each failure reason shown in the table
METRIC_SHORT = {"accuracy": "acc", "balanced_accuracy": "bal_acc", "r2": "r2"}


def task_label(r: Result) -> str:
    if r.task == "regression":
        return "regression"
    kind = "binary" if r.classes == 2 else f"{r.classes}-class"
    return kind + (" imb" if r.metric == "balanced_accuracy" else "")


def fmt(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def print_table(results: list[Result]) -> None:
    head = (f"{'dataset':<16} {'rows':>6} {'cols':>4} {'task':<14} {'metric':<7} {'bucketml':>8} {'HGB':>8} "
            f"{'FLAML':>8} {'bml-HGB':>8} {'up>srv s':>8} {'FLAML s':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        diff = r.bucketml - r.hgb if r.bucketml is not None and r.hgb is not None else None
        line = (f"{r.name:<16} {r.rows:>6} {r.columns:>4} {task_label(r):<14} {METRIC_SHORT[r.metric]:<7} "
                f"{fmt(r.bucketml):>8} {fmt(r.hgb):>8} {fmt(r.flaml):>8} {fmt(diff, signed=True):>8} "
                f"{fmt(r.upload_seconds, 1):>8} {fmt(r.flaml_seconds, 1):>7}")
        if r.errors:  # in full in the --json file
            line += "  " + "; ".join(error if len(error) <= ERROR_WIDTH else error[:ERROR_WIDTH - 3] + "..." for error in r.errors)
        print(line)


def print_notes() -> None:
    print("rows: the whole dataset (80% uploaded, 20% held out); cols: its columns besides the target; task: "
          "'imb' = imbalanced training classes, scored by balanced accuracy; bml-HGB: bucketml's score minus HGB's; "
          "up>srv s: wall clock of `bucketml upload` until predict serves the version (FLAML's time_budget); "
          "FLAML s: its fit and predict wall clock")


def summary(results: list[Result], with_flaml: bool) -> dict:
    answered = [r for r in results if r.answered]
    with_hgb = [r for r in answered if r.hgb is not None]
    with_flaml_score = [r for r in answered if r.flaml is not None]
    vs_hgb = [(r.bucketml - r.hgb, r.name) for r in with_hgb]
    small = [r.upload_seconds for r in results if r.served and r.rows <= SMALL_ROWS]
    large = [(r.upload_seconds, r.name) for r in results if r.served and r.rows > SMALL_ROWS]
    mean = lambda values: statistics.fmean(values) if values else None  # noqa: E731
    return {
        "datasets": len(results),
        "served": sum(r.served for r in results),
        "answered": len(answered),
        "mean_bucketml": mean([r.bucketml for r in answered]),
        "mean_hgb_on_answered": mean([r.hgb for r in with_hgb]),
        "mean_hgb_all": mean([r.hgb for r in results if r.hgb is not None]),
        "mean_flaml_on_answered": mean([r.flaml for r in with_flaml_score]) if with_flaml else None,
        "mean_flaml_all": mean([r.flaml for r in results if r.flaml is not None]) if with_flaml else None,
        "mean_diff_vs_hgb": mean([d for d, _ in vs_hgb]),
        "worst_diff_vs_hgb": min(vs_hgb) if vs_hgb else None,
        "best_diff_vs_hgb": max(vs_hgb) if vs_hgb else None,
        "mean_diff_vs_flaml": mean([r.bucketml - r.flaml for r in with_flaml_score]) if with_flaml else None,
        "median_upload_served_small": statistics.median(small) if small else None,
        "small_count": len(small),
        "max_upload_served_large": max(large) if large else None,
        "large_count": len(large),
    }


def print_summary(s: dict, with_flaml: bool) -> None:
    n = s["answered"]
    print(f"datasets: {s['datasets']}; served by bucketml: {s['served']}; answered on every held-out row: {n}")
    print(f"mean score over the {n} answered (accuracy, balanced accuracy and R^2 alike): bucketml {fmt(s['mean_bucketml'])}, "
          f"HGB {fmt(s['mean_hgb_on_answered'])}" + (f", FLAML {fmt(s['mean_flaml_on_answered'])}" if with_flaml else ""))
    if n != s["datasets"]:
        print(f"mean over every dataset a peer scored: HGB {fmt(s['mean_hgb_all'])}"
              + (f", FLAML {fmt(s['mean_flaml_all'])}" if with_flaml else ""))
    worst, best = s["worst_diff_vs_hgb"], s["best_diff_vs_hgb"]
    print(f"bucketml - HGB: mean {fmt(s['mean_diff_vs_hgb'], signed=True)}; worst "
          + (f"{worst[0]:+.4f} ({worst[1]})" if worst else "-") + "; best " + (f"{best[0]:+.4f} ({best[1]})" if best else "-"))
    if with_flaml:
        print(f"bucketml - FLAML (same wall clock): mean {fmt(s['mean_diff_vs_flaml'], signed=True)}")
    large = s["max_upload_served_large"]
    print(f"upload->served: median {fmt(s['median_upload_served_small'], 1)} s over the {s['small_count']} served datasets "
          f"of up to {SMALL_ROWS:,} rows; max " + (f"{large[0]:.1f} s ({large[1]})" if large else "-")
          + f" over the {s['large_count']} larger ones")


# --------------------------------------------------------------------------- main


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop the platform."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    # Internal modes, run by the quality venv's Python (they import its packages).
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        load_datasets(Path(sys.argv[2]), sys.argv[3].split(","))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_flaml":
        run_flaml(Path(sys.argv[2]))
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", help="comma-separated subset of the datasets (default: all; see --list)")
    parser.add_argument("--no-flaml", action="store_true", help="skip FLAML (bucketml and HGB only)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, bucket, logs)")
    parser.add_argument("--list", action="store_true", help="list the datasets and exit")
    parser.add_argument("--upload-timeout", type=float, default=900.0,
                        help="seconds `bucketml upload` may wait for the outcome and for serving (its --timeout)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the full results as JSON to PATH")
    parser.add_argument("--splits", type=int, default=1, metavar="N",
                        help="score each dataset on N seeded 80/20 splits (random_state 0..N-1, each uploaded as its "
                        "own model) and report the means: a 20%% held-out set of a few hundred rows moves a score by "
                        "a few rows")
    args = parser.parse_args()

    if args.list:
        for dataset, _ in DATASETS:
            print(f"{dataset.name:<16} {dataset.source:<14} {dataset.task:<15} target {dataset.target:<10} {dataset.note}")
        return
    names = [name for name, _ in BY_NAME.items()] if not args.datasets else [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    interrupt_on_sigterm()

    python = quality_python()
    print(f"$ {shlex.join(['.venv/bin/python', 'bench/quality.py', *sys.argv[1:]])}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"bucketml: {versions(Path(sys.executable), ['bucketml', 'scikit-learn', 'skl2onnx', 'onnxruntime', 'pandas', 'numpy'])}"
          " (HGB runs here too)")
    print(f"quality venv: {versions(python, ['flaml', 'lightgbm', 'xgboost', 'scikit-learn', 'pandas', 'numpy'])}")
    seeds = f"random_state={SEED}" if args.splits == 1 else f"{args.splits} splits, random_state {SEED}..{SEED + args.splits - 1}, scores averaged"
    print(f"split: {int((1 - TEST_SIZE) * 100)}/{int(TEST_SIZE * 100)}, {seeds}, stratified for classification; "
          f"metric: accuracy, balanced accuracy when the training classes' max/min count >= {IMBALANCE_RATIO:g} (imb), R^2 for regression")
    print(f"FLAML: time_budget = bucketml's upload->served seconds (at least {MIN_FLAML_BUDGET:g}), n_jobs={FLAML_JOBS}, seed={SEED}"
          if not args.no_flaml else "FLAML: skipped (--no-flaml)", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="bucketml-quality-"))
    began = time.perf_counter()
    results: list[Result] = []
    running: Platform | None = None
    try:
        data = folder / "data"
        data.mkdir()
        loaded = subprocess.run([str(python), str(Path(__file__).resolve()), "_load", str(data), ",".join(names)], check=False)
        if loaded.returncode != 0:
            sys.exit("loading the datasets failed (the traceback is above)")
        manifest = json.loads((data / "manifest.json").read_text())
        running = start_platform(folder)
        print(f"platform: bucketml dev, predict {running.predict_url}, broker {running.broker_url}, log {running.log}", flush=True)
        for number, entry in enumerate(manifest, 1):
            print(f"[{number}/{len(manifest)}] {entry['name']} ({entry['rows']} rows, {entry['columns']} columns, "
                  f"{entry['source']} {entry['source_version']})", end=" ", flush=True)
            splits = []
            for index in range(args.splits):
                model = entry["name"] if index == 0 else f"{entry['name']}-split{index}"
                result = run_dataset(entry, running, None if args.no_flaml else python,
                                     folder / "runs" / entry["name"] / f"split{index}", args.upload_timeout,
                                     seed=SEED + index, model=model)
                splits.append(result)
                prefix = f"\n    split {index + 1}: " if args.splits > 1 else ""
                print(f"{prefix}bucketml {fmt(result.bucketml)} ({fmt(result.upload_seconds, 1)} s, "
                      f"{result.bucketml_algorithm or '-'}), HGB {fmt(result.hgb)}, FLAML {fmt(result.flaml)}"
                      + (f" ({result.flaml_estimator}, {fmt(result.flaml_seconds, 1)} s)" if result.flaml_estimator else "")
                      + (f"; {'; '.join(error[:ERROR_WIDTH] for error in result.errors)}" if result.errors else ""),
                      end="" if args.splits > 1 else "\n", flush=True)
            if args.splits > 1:
                print(flush=True)
            results.append(averaged(splits))
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the platform", flush=True)
    except RuntimeError as exc:  # the platform did not start
        print(f"\n{exc}", flush=True)
    finally:
        if running:
            stop_platform(running)
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    if not results:
        sys.exit(1)
    print()
    print_table(results)
    print_notes()
    print()
    figures = summary(results, not args.no_flaml)
    print_summary(figures, not args.no_flaml)
    print(f"load average {os.getloadavg()[0]:.2f} at the end; {time.perf_counter() - began:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({
            "command": ["bench/quality.py", *sys.argv[1:]], "machine": machine(),
            "bucketml_env": versions(Path(sys.executable), ["bucketml", "scikit-learn", "skl2onnx", "onnxruntime"]),
            "quality_env": versions(python, ["flaml", "lightgbm", "xgboost", "scikit-learn"]),
            "seed": SEED, "splits": args.splits, "test_size": TEST_SIZE, "imbalance_ratio": IMBALANCE_RATIO, "flaml_n_jobs": FLAML_JOBS,
            "flaml": not args.no_flaml, "results": [asdict(r) for r in results], "summary": figures,
        }, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
