"""The `bucketml` command as a user types it: outcomes and one-line errors, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bucketml.storage import LocalStorage
from helpers import free_port

BUCKETML = str(Path(sys.executable).parent / "bucketml")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"PATH": str(Path(sys.executable).parent), "BUCKETML_BROKER_URL": nobody, "BUCKETML_PREDICT_URL": nobody}
    return subprocess.run([BUCKETML, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0]


def test_upload_while_the_platform_is_down_keeps_the_file_and_says_so(tmp_path):
    (tmp_path / "prices.csv").write_text("size,price\n1,2\n")
    result = run("upload", "prices.csv", "--model", "houses", "--target", "price", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "uploaded   datasets/houses/prices.csv" in result.stdout
    assert "not running" in result.stdout and "bucketml dev" in result.stdout
    info = LocalStorage(tmp_path / "bucket").stat("datasets/houses/prices.csv")
    assert info.metadata == {"target": "price"} and info.content_type == "text/csv"


def test_invalid_model_name_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    assert_one_line_error(run("upload", "a.csv", "--model", "../etc", cwd=tmp_path), "invalid model name")
    assert not (tmp_path / "bucket").exists() or not list(LocalStorage(tmp_path / "bucket").list())


def test_models_on_an_empty_bucket_and_an_unknown_model(tmp_path):
    result = run("models", cwd=tmp_path)
    assert result.returncode == 0 and "no models yet" in result.stdout
    assert_one_line_error(run("models", "nosuch", cwd=tmp_path), "nosuch")


def test_predict_errors_are_one_line(tmp_path):
    assert_one_line_error(run("predict", "m", "{bad", cwd=tmp_path), "not valid JSON")
    assert_one_line_error(run("predict", "m", json.dumps({"a": 1}), cwd=tmp_path), "not running", "bucketml dev")
    assert_one_line_error(run("events", cwd=tmp_path), "not running")


def test_upload_says_where_it_asks_predict(tmp_path):
    result = run("upload", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--predict-url" in result.stdout and "BUCKETML_PREDICT_URL" in result.stdout, result


def test_models_lines_up_a_balanced_accuracy_score(tmp_path):
    """An imbalanced target is scored by balanced accuracy, whose score is wider than the
    others: the rows column still starts after it, under its header."""
    from helpers import publish
    from test_model_quality import rare_churn

    publish(LocalStorage(tmp_path / "bucket"), "churn", rare_churn(300, seed=4), "data.csv", {"target": "churned"})
    result = run("models", "churn", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    score = row.split()[4]
    assert score.startswith("balanced_accuracy=")
    assert row.index(score) == header.index("score")
    assert row[header.index("rows"):].split()[0] == "240"  # the training rows, in their own column
