"""The container images' Python contents, checked without a container engine: each image's
requirements are generated from requirements.txt, and the predict image's package set alone
(installed into a fresh virtual environment, as the Dockerfile does) serves a real model with
no scikit-learn, skl2onnx or pandas in it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from bucketml.storage import LocalStorage
from helpers import ROOT, churn_frame, free_port, publish, wait_for_http

RENDER = ROOT / "infra" / "images" / "render_requirements.py"


def test_image_requirements_are_generated_from_requirements_txt():
    done = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    predict = (ROOT / "infra" / "images" / "requirements-predict.txt").read_text().lower()
    for heavy in ("scikit-learn", "skl2onnx", "onnx=", "pandas", "scipy", "matplotlib"):
        assert heavy not in predict, f"the predict image would ship {heavy}"
    assert "onnxruntime==" in predict and "functions-framework==" in predict


@pytest.fixture(scope="module")
def predict_venv(tmp_path_factory) -> Path:
    """requirements-predict.txt and the bucketml package, as the Dockerfile installs them."""
    venv = tmp_path_factory.mktemp("predict-image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "infra" / "images" / "requirements-predict.txt")], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)
    return venv


@contextlib.contextmanager
def image_function(venv: Path, function: str, tmp_path: Path, ready_path: str, ready_status: int, **variables: str):
    """functions/<function> run from `venv` the way the image runs it: functions-framework with
    the target, source and mode in variables (infra/images/Dockerfile); yields its URL once
    `ready_path` answers `ready_status`, and checks its log has no traceback after it stops."""
    port = free_port()
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", FUNCTION_SOURCE=str(ROOT / f"functions/{function}/main.py"),
               FUNCTION_TARGET=function, PORT=str(port), HOST="127.0.0.1", **variables)
    log = tmp_path / f"{function}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(venv / "bin" / "functions-framework")], env=env, cwd=tmp_path,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + ready_path, process, f"{function} on the image's package set to answer", log, timeout=60,
                      statuses=(ready_status,))
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_the_predict_image_set_serves_a_model_without_training_libraries(predict_venv, tmp_path):
    python = str(predict_venv / "bin" / "python")
    missing = subprocess.run([python, "-c", "import sklearn"], capture_output=True, check=False)
    assert missing.returncode != 0, "scikit-learn is importable in the predict image"

    storage = LocalStorage(tmp_path / "bucket")
    version = publish(storage, "churn", churn_frame(seed=0), "data.csv", {"algorithms": "logistic_regression"})
    with image_function(predict_venv, "predict", tmp_path, "/v2/health/ready", 200, FUNCTION_USE_ASGI="true",
                        BUCKETML_BUCKET=str(storage.root), BUCKETML_LOG_FORMAT="json", WORKERS="1") as url:
        record = {"tenure": 3, "monthly": 99.5, "plan": "basic", "region": "north"}
        answer = requests.post(url + "/predict", json={"model": "churn", "records": [record]}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == version and answer.json()["predictions"][0] in ("yes", "no")
        assert requests.get(url + "/openapi.json", timeout=10).status_code == 200  # its YAML is package data


def test_the_dead_letter_sink_runs_on_the_predict_image_set(predict_venv, tmp_path):
    """The deadletter image is the predict package set with functions/deadletter."""
    from cloudevents.conversion import to_binary

    from bucketml.contracts import events

    # The event functions answer a GET with 405: listening.
    with image_function(predict_venv, "deadletter", tmp_path, "/", 405, BUCKETML_BUCKET=str(tmp_path / "bucket")) as url:
        event = events.platform_event(events.MODEL_PUBLISHED, "train", "churn", {"model": "churn", "version": 1})
        event["knativeerrordest"] = "http://notifier.example/"
        headers, body = to_binary(event)
        answer = requests.post(url, headers=dict(headers), data=body, timeout=10)
        assert answer.status_code == 202, answer.text
        assert len(list((tmp_path / "bucket" / "deadletters").glob("*.json"))) == 1
