"""The dataset spec (bucketml.yaml and object metadata) and the training knobs it controls.

Real LocalStorage under tmp_path, the real preprocess and train handlers, real scikit-learn
training and ONNX export. Data is generated with numpy or bundled with scikit-learn.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bucketml.contracts import events
from bucketml.contracts import spec
from bucketml.steps.preprocess import effective_spec, handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.contracts.rejections import Rejection
from bucketml.storage import LocalStorage
from bucketml.steps.train import handle_prepared
from bucketml.training.candidates import estimators
from bucketml.training.search import CandidateSearch
from helpers import free_port
from sklearn.datasets import load_diabetes

BUCKETML = str(Path(sys.executable).parent / "bucketml")


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "bucket")


def put_spec(storage, model: str, text: str) -> None:
    storage.write(f"datasets/{model}/bucketml.yaml", text.encode(), content_type="application/yaml")


def preprocess(storage, model: str, frame: pd.DataFrame, metadata: dict | None = None, filename: str = "data.csv"):
    info = storage.write(f"datasets/{model}/{filename}", frame.to_csv(index=False).encode(), metadata=metadata)
    reply = handle_finalized(storage, info.event_data())
    assert reply is not None
    return reply


def publish(storage, model: str, frame: pd.DataFrame, metadata: dict | None = None, filename: str = "data.csv"):
    """Preprocess and train; returns (train reply, card of the version it made)."""
    prepared = preprocess(storage, model, frame, metadata, filename)
    assert prepared["type"] == events.DATASET_PREPARED, prepared.data
    reply = handle_prepared(storage, prepared.data)[-1]
    assert reply["type"] in (events.MODEL_PUBLISHED, events.MODEL_TRAINED), reply.data
    return reply, Registry(storage).card(model, reply.data["version"])


def prepared_schema(storage, reply) -> dict:
    return json.loads(storage.read(reply.data["prepared"] + "schema.json"))


def blobs(rows: int = 200, seed: int = 0, minority: float = 0.5) -> pd.DataFrame:
    """Two numeric features; 'yes' rows sit apart from 'no' rows (easy, with some overlap)."""
    rng = np.random.default_rng(seed)
    label = np.where(rng.random(rows) < minority, "yes", "no")
    shift = np.where(label == "yes", 1.5, -1.5)
    return pd.DataFrame({
        "x1": (rng.normal(0, 1, rows) + shift).round(3),
        "x2": (rng.normal(0, 1, rows) - shift).round(3),
        "label": label,
    })


def circle(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    """Inside or outside a circle: a forest learns it, a linear model cannot."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.uniform(-1, 1, rows), rng.uniform(-1, 1, rows)
    return pd.DataFrame({"x1": x1.round(4), "x2": x2.round(4), "label": np.where(x1**2 + x2**2 < 0.5, "in", "out")})


# --- the spec's own constants ----------------------------------------------------------------


def test_schema_defaults_and_training_agree():
    assert tuple(spec.DEFAULTS) == spec.FIELDS
    for task in ("classification", "regression"):
        assert set(estimators(task)) == set(spec.ALGORITHMS[task])
        assert spec.DEFAULT_METRIC[task] in spec.METRICS[task]
    assert set(spec.ALL_ALGORITHMS) == set(spec.ALGORITHMS["classification"]) | set(spec.ALGORITHMS["regression"])
    # The defaults that have a value are valid spec values themselves.
    spec.validate({k: v for k, v in spec.DEFAULTS.items() if v is not None}, "defaults")


def test_metadata_values_are_parsed_per_field():
    parsed = spec.spec_from_metadata({
        "drop": "a, b,", "ID": "row_id", "test-size": "0.3", "max_training_seconds": "90", "header": "False",
        "columns": '["a,b", "c"]', "algorithms": "svm,ridge", "owner": "alice", "target": "",
    })
    assert parsed == {
        "drop": ["a", "b"], "id": ["row_id"], "test_size": 0.3, "max_training_seconds": 90.0, "header": False,
        "columns": ["a,b", "c"], "algorithms": ["svm", "ridge"],
    }


# --- precedence --------------------------------------------------------------------------------


def frame_with_three_targets(rows: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "x1": rng.normal(0, 1, rows).round(3),
        "target": np.tile(["t1", "t2"], rows // 2),
        "y_spec": np.tile(["s1", "s2", "s3"], rows // 3),
        "y_meta": np.tile(["m1", "m2", "m3", "m4"], rows // 4),
    })


@pytest.mark.parametrize("spec_file, metadata, target, origin", [
    ("target: y_spec\ntest_size: 0.4\n", {"target": "y_meta", "test_size": "0.3"}, "y_meta", "object metadata"),
    ("target: y_spec\ntest_size: 0.4\n", None, "y_spec", "spec"),
    (None, None, "target", "convention"),
], ids=["metadata_beats_spec", "spec_beats_convention", "convention"])
def test_target_precedence(storage, spec_file, metadata, target, origin):
    if spec_file:
        put_spec(storage, "prec", spec_file)
    reply = preprocess(storage, "prec", frame_with_three_targets(), metadata)
    assert reply["type"] == events.DATASET_PREPARED, reply.data
    assert reply.data["target"] == target
    schema = prepared_schema(storage, reply)
    assert schema["target_origin"] == origin
    effective = schema["spec"]
    assert set(spec.FIELDS) <= set(effective)
    assert effective["target_origin"] == (None if origin == "convention" else origin)
    # Per field, not per source: metadata's test_size wins over the file's, the file's over the default.
    expected_test_size = {"y_meta": 0.3, "y_spec": 0.4, "target": 0.2}[target]
    assert effective["test_size"] == expected_test_size
    assert effective["task"] == "auto" and effective["promotion"] == "always"


def test_unknown_metadata_keys_are_ignored(storage):
    metadata = {"target": "label", "owner": "alice", "goog-reserved-file-mtime": "1700000000", "Cache-Policy": "x"}
    reply = preprocess(storage, "meta", blobs(60), metadata)
    assert reply["type"] == events.DATASET_PREPARED, reply.data
    assert prepared_schema(storage, reply)["spec"]["origins"]["target"] == "object metadata"


# --- invalid specs -----------------------------------------------------------------------------

INVALID = [
    # id, spec file, object metadata, things the message must name
    ("yaml_unknown_key", "target: label\ntets_size: 0.3\n", None, ["bucketml.yaml", "'tets_size'", "did you mean 'test_size'"]),
    ("yaml_bad_task", "task: classify\n", None, ["bucketml.yaml", "'task'", "classify", "regression"]),
    ("yaml_test_size_too_big", "test_size: 0.9\n", None, ["datasets/bad/bucketml.yaml: 'test_size' must be at most 0.5 (got 0.9)"]),
    ("yaml_test_size_too_small", "test_size: 0.01\n", None, ["'test_size' must be at least 0.05"]),
    ("yaml_algorithm_unknown", "algorithms: [random_forest, xgboost]\n", None, ["bucketml.yaml", "'algorithms': 'xgboost' is not one of svm"]),
    ("yaml_algorithms_empty", "algorithms: []\n", None, ["'algorithms'", "at least one"]),
    ("yaml_drop_not_a_list", "drop: notes\n", None, ["'drop' must be a list"]),
    ("yaml_target_not_a_string", "target: 5\n", None, ["'target' must be a string"]),
    ("yaml_budget_not_a_number", "max_training_seconds: fast\n", None, ["'max_training_seconds' must be a number"]),
    ("yaml_budget_zero", "max_training_seconds: 0\n", None, ["'max_training_seconds' must be greater than 0"]),
    ("yaml_promotion", "promotion: sometimes\n", None, ["'promotion'", "if_better"]),
    ("yaml_header", "header: maybe\n", None, ["'header'", "auto, true, false"]),
    ("yaml_columns_repeated", "columns: [a, b, a]\n", None, ["'columns'", "'a' more than once"]),
    ("yaml_key_twice", "target: label\ntarget: x1\n", None, ["bucketml.yaml", "'target' appears more than once"]),
    ("yaml_nan", "test_size: .nan\n", None, ["'test_size' must be a finite number"]),
    ("metadata_bad_number", None, {"test_size": "abc"}, ["object metadata 'test_size': 'abc' is not a number"]),
    ("metadata_algorithm_unknown", None, {"algorithms": "svm,xgboost"}, ["object metadata 'algorithms': 'xgboost' is not one of"]),
    ("metadata_bad_header", None, {"header": "sometimes"}, ["object metadata", "'header'"]),
    ("metadata_budget_negative", None, {"max_training_seconds": "-5"}, ["object metadata", "'max_training_seconds'"]),
    # Known only once the task is detected (the label is yes/no: classification).
    ("metric_of_the_other_task", "metric: rmse\n", None, ["bucketml.yaml", "'metric'", "regression metric", "accuracy"]),
    ("algorithm_of_the_other_task", None, {"algorithms": "ridge"}, ["object metadata", "'algorithms'", "'ridge'", "logistic_regression"]),
]


@pytest.mark.parametrize("spec_file, metadata, hints", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_source_and_field(storage, spec_file, metadata, hints):
    if spec_file is not None:
        put_spec(storage, "bad", spec_file)
    reply = preprocess(storage, "bad", blobs(40), metadata)
    assert reply["type"] == events.DATASET_REJECTED
    assert reply.data["reason"] == "spec_invalid", reply.data
    message = reply.data["message"]
    assert "\n" not in message
    for hint in hints:
        assert hint in message, f"{hint!r} not in {message!r}"
    assert not list(storage.list("prepared/"))


def test_valid_metadata_does_not_excuse_an_invalid_spec_file(storage):
    put_spec(storage, "bad", "test_size: 0.9\n")
    with pytest.raises(Rejection) as caught:
        effective_spec(storage, "bad", {"test_size": "0.3"})
    assert caught.value.reason == "spec_invalid" and "bucketml.yaml: 'test_size'" in caught.value.message


# --- training knobs ----------------------------------------------------------------------------


def test_algorithms_narrow_the_candidates(storage):
    put_spec(storage, "only-rf", "algorithms: [random_forest]\n")
    reply, card = publish(storage, "only-rf", blobs(120))
    assert reply["type"] == events.MODEL_PUBLISHED
    assert [c["name"] for c in card["candidates"]] == ["random_forest"]
    assert card["algorithm"] == "random_forest"
    assert card["spec"]["algorithms"] == ["random_forest"]
    assert card["spec"]["origins"]["algorithms"] == "datasets/only-rf/bucketml.yaml"
    assert card["skipped"] == []
    assert not any("class_weight" in note for c in card["candidates"] for note in c["notes"])  # balanced classes


def test_metric_chooses_the_candidate_and_is_recorded(storage):
    reply, card = publish(storage, "f1", blobs(160, minority=0.3),
                          {"metric": "f1_macro", "algorithms": "logistic_regression,random_forest"})
    assert card["metric"] == "f1_macro" and reply.data["metric"] == "f1_macro"
    assert card["spec"]["metric"] == "f1_macro"
    # Chosen by its cross-validated f1_macro on the training rows; reported on the held-out rows.
    assert card["selection"]["metric"] == "f1_macro"
    best = max(card["candidates"], key=lambda c: c["cv_score"])
    assert card["algorithm"] == best["name"] and card["metrics"] == best["metrics"]
    assert card["promotion"]["metric"] == "f1_macro"
    assert card["promotion"]["new_score"] == card["metrics"]["f1_macro"]


def test_lower_is_better_metrics_sort_ascending():
    frame = load_diabetes(as_frame=True).frame
    x = frame.drop(columns="target").astype("float32")
    y = frame["target"].astype("float64")
    schema = {"task": "regression", "columns": [{"name": c, "type": "number"} for c in x.columns]}
    train, test = (x.iloc[:350], y.iloc[:350]), (x.iloc[350:], y.iloc[350:])
    for metric, descending in (("mae", False), ("rmse", False), ("r2", True)):
        chosen = dict(spec.DEFAULTS, metric=metric, algorithms=["ridge", "svm", "gradient_boosting"])
        search = CandidateSearch.for_spec(schema, chosen).fit(*train).evaluate(*test)
        fitted, failures, skipped = search.results_, search.failures_, search.skipped_
        # The ranking is by the cross-validation score moved one standard error towards worse.
        scores = [c.rank_score for c in fitted]
        assert scores == sorted(scores, reverse=descending), (metric, scores)
        for candidate in fitted:
            mean = candidate.cv_score
            assert (candidate.rank_score >= mean) if not descending else (candidate.rank_score <= mean)
            assert all(t.rank_score(metric) is None or not spec.better(metric, t.rank_score(metric), candidate.rank_score)
                       for t in candidate.trials)
        # Every candidate is either fitted or dropped early for scoring far worse than the leader.
        names = {c.name for c in fitted} | {s["name"] for s in skipped}
        assert {"ridge", "svm", "gradient_boosting"} <= names and not failures
        assert all(s["reason"].startswith("dropped after") for s in skipped), skipped


def test_tiny_training_budget_runs_only_the_first_candidate(storage):
    _, card = publish(storage, "budget", blobs(120), {"max_training_seconds": "0.001"})
    order = list(estimators("classification"))
    assert [c["name"] for c in card["candidates"]] == order[:1]
    assert [s["name"] for s in card["skipped"]] == order[1:]
    assert all("max_training_seconds=0.001" in s["reason"] for s in card["skipped"])
    assert card["spec"]["max_training_seconds"] == 0.001


def test_imbalanced_classes_are_weighted(storage):
    frame = blobs(330, seed=3, minority=0.0)
    frame.loc[frame.index[:30], "label"] = "yes"  # 300 'no' to 30 'yes'
    frame.loc[frame.index[:30], ["x1", "x2"]] += [3.0, -3.0]
    reply, card = publish(storage, "rare", frame, {"algorithms": "logistic_regression,random_forest"})
    assert reply["type"] == events.MODEL_PUBLISHED
    # Imbalanced: chosen by balanced accuracy, and the candidates weight classes for it.
    assert card["metric"] == "balanced_accuracy" and card["selection"]["imbalance"]["imbalanced"] is True
    singles = [c for c in card["candidates"] if c["name"] != "ensemble"]
    assert len(singles) == 2
    for candidate in singles:
        assert any(note.startswith("class_weight: balanced") for note in candidate["notes"]), candidate

    # ... and the estimators really got it.
    x = frame[["x1", "x2"]].astype("float32")
    schema = {"task": "classification", "columns": [{"name": "x1", "type": "number"}, {"name": "x2", "type": "number"}]}
    fitted = CandidateSearch.for_spec(schema, dict(spec.DEFAULTS)).fit(x, frame["label"]).evaluate(x, frame["label"]).results_
    for candidate in fitted:
        if candidate.name == "ensemble":
            continue
        model = candidate.base.named_steps["model"]
        weight = model.estimator.class_weight if candidate.name == "svm" else model.class_weight
        # Boosting of a binary target is balanced by its tuned threshold instead (candidates.estimators).
        assert weight == (None if candidate.name == "gradient_boosting" else "balanced"), candidate.name

    # The spec's metric wins: accuracy counts rows, so nothing is weighted.
    _, card = publish(storage, "rare-accuracy", frame, {"algorithms": "logistic_regression", "metric": "accuracy"})
    assert card["metric"] == "accuracy" and card["selection"]["metric_origin"] == "spec"
    assert not any(n.startswith("class_weight") for c in card["candidates"] for n in c["notes"])


def test_gradient_boosting_exports_and_passes_the_parity_gate(storage):
    _, card = publish(storage, "gbt", blobs(150), {"algorithms": "gradient_boosting"})
    assert card["algorithm"] == "gradient_boosting" and card["parity"]["passed"]
    diabetes = load_diabetes(as_frame=True).frame
    _, card = publish(storage, "gbt-reg", diabetes, {"algorithms": "gradient_boosting", "metric": "mae"})
    assert card["algorithm"] == "gradient_boosting" and card["parity"]["passed"] and card["metric"] == "mae"


# --- promotion: if_better ----------------------------------------------------------------------


def test_promotion_if_better_keeps_the_better_current_version(storage):
    model = "ring"
    registry = Registry(storage)
    put_spec(storage, model, "promotion: if_better\n")
    # v1: a linear model cannot learn a circle. Nothing is current yet: published.
    reply, card = publish(storage, model, circle(seed=1), {"algorithms": "logistic_regression"}, "a.csv")
    assert reply["type"] == events.MODEL_PUBLISHED
    assert card["promotion"]["promoted"] is True and card["promotion"]["current_version"] is None

    # v2: a forest on new data. Version 1 is scored on v2's test rows and loses: published.
    reply, card = publish(storage, model, circle(seed=2), {"algorithms": "random_forest"}, "b.csv")
    assert reply["type"] == events.MODEL_PUBLISHED and reply.data["version"] == 2
    promotion = card["promotion"]
    assert promotion["policy"] == "if_better" and promotion["promoted"] is True
    assert promotion["current_version"] == 1 and promotion["new_score"] > promotion["current_score"]
    assert registry.current(model).version == 2

    # v3: a linear model again; version 2 is better on v3's own test rows: not promoted.
    reply, card = publish(storage, model, circle(seed=3), {"algorithms": "logistic_regression"}, "c.csv")
    assert reply["type"] == events.MODEL_TRAINED
    assert reply.data["version"] == 3 and reply.data["current_version"] == 2
    promotion = card["promotion"]
    assert promotion == {**promotion, "policy": "if_better", "current_version": 2, "promoted": False}
    assert promotion["current_score"] > promotion["new_score"]
    assert promotion["new_score"] == card["metrics"]["accuracy"]
    assert registry.current(model).version == 2
    assert registry.versions(model) == [1, 2, 3]

    # v4: another column: the versions cannot be compared, so the new one is promoted.
    wider = circle(seed=4).assign(x3=lambda f: f["x1"] * 2 + 1)
    reply, card = publish(storage, model, wider, {"algorithms": "logistic_regression"}, "d.csv")
    assert reply["type"] == events.MODEL_PUBLISHED and reply.data["version"] == 4
    assert card["promotion"]["promoted"] is True and "x3" in card["promotion"]["reason"]


# --- CLI ---------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: upload does not wait
    env = {"PATH": str(Path(sys.executable).parent), "BUCKETML_BROKER_URL": nobody, "BUCKETML_PREDICT_URL": nobody}
    return subprocess.run([BUCKETML, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def nothing_uploaded(root: Path) -> bool:
    return not (root / "bucket").exists() or not list(LocalStorage(root / "bucket").list())


def test_cli_invalid_setting_fails_fast_and_uploads_nothing(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,y\n1,2,3\n")
    result = run_cli("upload", "d.csv", "-m", "m", "--set", "test_size=2", cwd=tmp_path)
    assert_one_line_error(result, "'test_size' must be at most 0.5")
    assert nothing_uploaded(tmp_path)
    result = run_cli("upload", "d.csv", "-m", "m", "--set", "tets_size=0.3", cwd=tmp_path)
    assert_one_line_error(result, "tets_size", "did you mean 'test_size'")
    result = run_cli("upload", "d.csv", "-m", "m", "--set", "drop", cwd=tmp_path)
    assert_one_line_error(result, "KEY=VALUE")
    assert nothing_uploaded(tmp_path)


def test_cli_task_and_settings_become_object_metadata(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,c,y\n1,2,3,4\n")
    result = run_cli("upload", "d.csv", "-m", "m", "--target", "y", "--task", "regression",
                     "--set", "drop=a,b", "--set", "metric=mae", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = LocalStorage(tmp_path / "bucket").stat("datasets/m/d.csv")
    assert info.metadata == {"target": "y", "task": "regression", "drop": "a,b", "metric": "mae"}


@pytest.mark.parametrize("document", [
    {"target": "price", "task": "regression", "drop": ["id"], "metric": "r2", "test_size": 0.25},
    {"algorithms": ["svm", "random_forest"], "promotion": "if_better"},
    {"colour": "blue"},  # an unknown key
    {"task": "clustering"},
    {"test_size": 0.9},
    {"algorithms": []},
    {"drop": [""]},
])
def test_the_published_json_schema_agrees_with_the_validator(document):
    """Editors validate bucketml.yaml with `spec.SCHEMA`: it must accept exactly what the platform accepts."""
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(spec.SCHEMA)
    schema_accepts = jsonschema.Draft202012Validator(spec.SCHEMA).is_valid(document)
    try:
        spec.validate(document, "bucketml.yaml")
        platform_accepts = True
    except Rejection:
        platform_accepts = False
    assert schema_accepts == platform_accepts, document
