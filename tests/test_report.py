"""report.html: the human report of each version, and `bucketml report`.

Real training in process (the preprocess and train handlers on a folder bucket), then the
report is checked as a file (self-contained, sections, plots, escaping), through the CLI
(local and gs:// buckets), and as a page in headless Chromium (screenshot, DOM, console).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from bucketml.contracts import events
from bucketml.contracts.card import ModelCard, SchemaColumn
from bucketml.training.preparation import load_prepared
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.training.analysis import feature_importance
from bucketml.storage import LocalStorage
from bucketml.steps.train import handle_prepared
from bucketml.training.candidates import preprocessor
from helpers import churn_frame

ROOT = Path(__file__).resolve().parents[1]
BUCKETML = str(Path(sys.executable).parent / "bucketml")
HOSTILE = "<script>alert(1)</script>"
REPORT = "models/{model}/versions/{version}/report.html"


def train(storage: LocalStorage, model: str, frame: pd.DataFrame, metadata: dict | None = None):
    info = storage.write(f"datasets/{model}/data.csv", frame.to_csv(index=False).encode(), content_type="text/csv",
                         metadata=metadata)
    prepared = handle_finalized(storage, info.event_data())
    assert prepared["type"] == events.DATASET_PREPARED, prepared.data
    reply = handle_prepared(storage, prepared.data)[-1]
    assert reply["type"] == events.MODEL_PUBLISHED, reply.data
    return prepared, reply


def classification_frame() -> pd.DataFrame:
    """Churn with a column whose name is HTML, values that are HTML, and a date column."""
    frame = churn_frame(240, seed=3)
    rng = np.random.default_rng(3)
    frame.insert(2, HOSTILE, rng.choice(["<b>bold</b>", "a&b", "plain"], len(frame)))
    days = rng.integers(0, 700, len(frame))
    frame.insert(3, "signup", [str(np.datetime64("2023-01-01") + int(d)) for d in days])
    return frame


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """One folder bucket with a classification and a regression version."""
    storage = LocalStorage(tmp_path_factory.mktemp("report") / "bucket")
    churn_prepared, churn_reply = train(storage, "churn", classification_frame())
    diabetes_prepared, diabetes_reply = train(storage, "diabetes", load_diabetes(as_frame=True).frame)
    return {
        "storage": storage,
        "churn": (churn_prepared, churn_reply),
        "diabetes": (diabetes_prepared, diabetes_reply),
    }


def report_text(storage: LocalStorage, model: str, version: int = 1) -> str:
    return storage.read(REPORT.format(model=model, version=version)).decode("utf-8")


SVG_IMAGE = re.compile(r'<img src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)" alt="[^"<>]+">')


def svg_images(page: str) -> list[str]:
    """The report's plots: SVG documents inside <img> data URIs, each one parsed as SVG."""
    images = [base64.b64decode(data).decode("utf-8") for data in SVG_IMAGE.findall(page)]
    assert len(images) == page.count("<img"), "an <img> that is not an SVG data URI"
    for svg in images:
        assert ElementTree.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
    return images


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()  # no JavaScript at all, and HOSTILE came through escaped
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE), "loads something from a URL"
    assert not re.search(r"<link\b|@import|<iframe|<object|<embed", page, re.IGNORECASE)
    assert not re.search(r"url\((?!#)", page), "CSS url() other than an in-document reference"
    assert "http://" not in page and "https://" not in page


# --- the file ------------------------------------------------------------------------------------


def test_classification_report(bucket):
    storage = bucket["storage"]
    page = report_text(storage, "churn")
    assert_self_contained(page)
    for anchor in ("profile", "candidates", "evaluation", "importance", "parity", "libraries"):
        assert f'id="{anchor}"' in page
    for text in ("Confusion matrix", "ROC and precision–recall curves", "Columns",
                 "churn", "version 1", "data.csv", "passed", "scikit-learn", "matplotlib"):
        assert text in page, text
    # class distribution, candidates, confusion matrix, ROC + PR, feature importance
    images = svg_images(page)
    assert len(images) >= 5
    assert sum(svg.count("<path") for svg in images) > 100  # bars, curves, cells
    # every candidate of the card is in the comparison
    card = Registry(storage).card("churn", 1)
    for candidate in card["candidates"]:
        assert f"<td>{candidate['name']}</td>" in page
    # ids are unique in the document (each plot's own ids live in its own SVG document)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_regression_report(bucket):
    page = report_text(bucket["storage"], "diabetes")
    assert_self_contained(page)
    for text in ("Predicted vs actual, and residuals", "Feature importance", "max relative difference", "regression"):
        assert text in page, text
    assert "Confusion matrix" not in page
    # candidates, predicted-vs-actual + residuals, residual histogram, feature importance
    images = svg_images(page)
    assert len(images) >= 4
    assert any("distribution of the errors" in svg for svg in images)  # the histogram's title


def test_user_strings_are_escaped(bucket):
    page = report_text(bucket["storage"], "churn")
    assert HOSTILE not in page and "<b>bold</b>" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert page.count(escaped) >= 2  # the profile table and the feature importance table
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # a value, in the profile's most frequent values
    images = svg_images(page)
    assert any(escaped in svg for svg in images)  # the feature importance plot's label, escaped by matplotlib
    assert not any("<script" in svg.lower() for svg in images)


def test_cards_written_by_training_round_trip_through_the_typed_card(bucket):
    """card.json is a public contract: the typed card reads every key and writes back the same JSON."""
    storage = bucket["storage"]
    for model in ("churn", "diabetes"):
        stored = storage.read(f"models/{model}/versions/1/card.json")
        raw = json.loads(stored)
        card = ModelCard.model_validate(raw)
        assert card.to_json_dict() == raw
        assert json.dumps(card.to_json_dict(), indent=2, sort_keys=True).encode() == stored
        assert Registry(storage).model_card(model, 1) == card
        assert card.chosen is not None and card.chosen.name == card.algorithm
        assert [c.name for c in card.schema_columns] == [c["name"] for c in raw["schema"]["columns"]]


def test_card_and_event_name_the_report(bucket):
    storage = bucket["storage"]
    _, reply = bucket["churn"]
    card = Registry(storage).card("churn", 1)
    assert card["report"] == "models/churn/versions/1/report.html" and "report_error" not in card
    assert reply.data["report_object"] == card["report"]
    assert storage.stat(card["report"]).content_type.startswith("text/html")


def test_feature_importance_maps_back_to_the_uploaded_columns(bucket):
    """Forest and linear importances summed over one-hot and date parts; permutation for
    gradient boosting; always keyed by the columns a client sends. The pipelines are built with
    the trainer's own ColumnTransformer (`training.preprocessor`), as its candidates are."""
    prepared, _ = bucket["churn"]
    schema, (x_train, y_train), test_split = load_prepared(bucket["storage"], prepared.data["prepared"])
    columns = {c["name"] for c in schema["columns"]}
    typed_columns = [SchemaColumn.model_validate(c) for c in schema["columns"]]
    assert {HOSTILE, "signup", "plan"} <= columns
    estimators = {
        "random_forest": (RandomForestClassifier(n_estimators=30, random_state=0), False, False),
        "logistic_regression": (LogisticRegression(max_iter=500), True, False),
        "gradient_boosting": (HistGradientBoostingClassifier(max_iter=30, random_state=0), False, True),
    }
    methods = {}
    for name, (estimator, scale, dense) in estimators.items():
        pipeline = Pipeline([("prepare", preprocessor(schema["columns"], scale, dense=dense)), ("model", estimator)])
        pipeline.fit(x_train, y_train)
        importance = feature_importance(pipeline, "classification", typed_columns, *test_split)
        methods[name] = importance.method
        assert set(importance.values) == columns, name
        assert all(np.isfinite(v) for v in importance.values.values())
        if name == "random_forest":
            assert sum(importance.values.values()) == pytest.approx(1.0)
    assert methods == {"random_forest": "model", "logistic_regression": "model", "gradient_boosting": "permutation"}


def test_a_report_that_fails_to_render_does_not_block_the_version(tmp_path, monkeypatch):
    import bucketml.training.report

    def broken(*args, **kwargs):
        raise RuntimeError("plotting exploded")

    monkeypatch.setattr(bucketml.training.report, "render_report", broken)
    storage = LocalStorage(tmp_path / "bucket")
    _, reply = train(storage, "churn", churn_frame(120), {"algorithms": "logistic_regression"})
    card = Registry(storage).card("churn", reply.data["version"])
    assert card["report_error"] == "RuntimeError: plotting exploded"
    assert "report" not in card and "report_object" not in reply.data
    assert not storage.exists(REPORT.format(model="churn", version=1))
    result = run_cli("report", "churn", bucket=storage.root)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: version 1 of 'churn' has no report (it could not be rendered: RuntimeError: plotting exploded)"
    )


def test_the_predict_process_never_imports_matplotlib(tmp_path):
    code = "import sys; sys.path.insert(0, 'functions/predict'); import main; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                            env=dict(os.environ, BUCKETML_BUCKET=str(tmp_path / "bucket"), HOST="127.0.0.1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- bucketml report -------------------------------------------------------------------------------


def run_cli(*args: str, bucket, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, BUCKETML_BUCKET=str(bucket), **(env or {}))
    return subprocess.run([BUCKETML, *args], capture_output=True, text=True, env=environment, timeout=60, check=False)


def test_cli_prints_the_path_of_the_report(bucket, tmp_path):
    storage = bucket["storage"]
    expected = str(storage.root / REPORT.format(model="churn", version=1))
    for args in (("report", "churn"), ("report", "churn", "1")):
        result = run_cli(*args, bucket=storage.root)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
    for args, message in ((("report", "churn", "7"), "error: model 'churn' has no version 7"),
                          (("report", "nosuch"), "error: model 'nosuch' has no versions"),
                          (("report", "../x"), "error: invalid model name")):
        result = run_cli(*args, bucket=storage.root)
        assert result.returncode == 1 and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr


def test_cli_open_hands_the_file_to_the_desktop(bucket, tmp_path):
    """--open goes through click.launch, which runs xdg-open on Linux: a stand-in records it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    opened = tmp_path / "opened.txt"
    stub = bin_dir / "xdg-open"
    stub.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    stub.chmod(0o755)
    result = run_cli("report", "diabetes", "--open", bucket=bucket["storage"].root,
                     env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert opened.read_text().strip() == result.stdout.strip()


def test_cli_downloads_the_report_from_a_gcs_bucket(bucket, fake_gcs, tmp_path):
    from bucketml.storage.gcs import GCSStorage

    name = f"report-{uuid.uuid4().hex[:12]}"
    gcs = GCSStorage(name, endpoint=fake_gcs)
    gcs.client.create_bucket(name)
    local = bucket["storage"]
    for info in local.list("models/churn/"):
        gcs.write(info.name, local.read(info.name), content_type=info.content_type)
    result = run_cli("report", "churn", bucket=f"gs://{name}", env={"STORAGE_EMULATOR_HOST": fake_gcs,
                                                                  "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == tmp_path and path.suffix == ".html"
    assert path.read_bytes() == local.read(REPORT.format(model="churn", version=1))


# --- in a browser ----------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str | None:
    explicit = os.environ.get("BUCKETML_CHROMIUM")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with nothing of its own going to the network."""
    command = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to its console (Chromium logs each message as INFO:CONSOLE)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_in_headless_chromium(bucket, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $BUCKETML_CHROMIUM); "
                    "`make test` installs Debian's chromium when run as root")
    # The console check must be able to see an error, or it proves nothing.
    probe = tmp_path / "probe.html"
    probe.write_text('<!DOCTYPE html><p>probe</p><script>console.error("bucketml-probe")</script>')
    result = chromium(binary, tmp_path / "profile-probe", "--dump-dom", probe.as_uri())
    assert any("bucketml-probe" in line for line in console_lines(result.stderr)), result.stderr[-3000:]

    path = bucket["storage"].root / REPORT.format(model="churn", version=1)
    source = path.read_text()
    # The DOM the browser built: every plot an SVG image, nothing written to the console.
    result = chromium(binary, tmp_path / "profile-dom", "--dump-dom", path.as_uri())
    assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    assert dom.count("data:image/svg+xml;base64,") == source.count("data:image/svg+xml;base64,") >= 5
    assert "Confusion matrix" in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script" not in dom.lower()
    assert console_lines(result.stderr) == [], console_lines(result.stderr)

    # What a person sees: a screenshot with the plots in it.
    screenshot = tmp_path / "report.png"
    result = chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1280,4000",
                      path.as_uri())
    assert result.returncode == 0 and screenshot.exists(), result.stderr[-3000:]
    assert console_lines(result.stderr) == [], console_lines(result.stderr)
    from PIL import Image  # installed with matplotlib

    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 4000)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    chosen_blue = np.all(np.abs(pixels - (0x1F, 0x6F, 0xEB)) <= 6, axis=1).sum()  # bars of the chosen model
    assert chosen_blue > 20_000, f"only {chosen_blue} pixels of the plots' blue: were the SVGs drawn?"
    assert len(np.unique(pixels[::7], axis=0)) > 200  # text, plots and tables, not a blank page
    print(f"screenshot: {screenshot}")
