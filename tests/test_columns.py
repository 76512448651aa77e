"""Column typing, target handling and the profile, through the real parts.

A folder bucket (LocalStorage) under tmp_path, the real preprocess and train handlers, real
scikit-learn training, ONNX export and onnxruntime serving through `ModelManager`. Data is
generated with numpy; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from bucketml.contracts import events
from bucketml.training.column_types import MAX_LISTED_CATEGORIES, normalise, with_categories, with_datetime_parts
from bucketml.training.preparation import load_prepared
from bucketml.serving.service import PredictService
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.encoding import InvalidInput, boolean_label, columns_from_records, datetime_parts
from bucketml.serving.manager import ModelManager
from bucketml.storage import LocalStorage
from bucketml.steps.train import handle_prepared
from bucketml.training.search import CandidateSearch

BUCKETML = str(Path(sys.executable).parent / "bucketml")
DROPPED_KINDS = {
    "customer_id": "identifier",
    "comment": "free_text",
    "channel": "constant",
    "referrer": "all_missing",
    "label_copy": "target_leak",
    "label_code": "target_leak",
}
WORDS = ["the", "customer", "called", "about", "billing", "again", "and", "was", "happy", "angry", "late", "support"]


def rich_frame(rows: int = 200, seed: int = 11) -> pd.DataFrame:
    """Booleans, ISO dates (some with a time), numbers, and one of every column that must be
    dropped; the label depends on the boolean and the date; one class has only 3 rows."""
    rng = np.random.default_rng(seed)
    days = np.datetime64("2023-01-01") + rng.integers(0, 730, rows).astype("timedelta64[D]")
    minutes = rng.integers(0, 24 * 60, rows).astype("timedelta64[m]")
    with_time = rng.random(rows) < 0.5
    signup = [str(d + m).replace("T", " ") if t else str(d) for d, m, t in zip(days, minutes, with_time)]
    member = rng.choice(["yes", "no", "Yes", "NO"], rows)
    frame = pd.DataFrame(
        {
            "income": rng.normal(50, 15, rows).round(1),
            "member": member,
            "signup": signup,
            "customer_id": [f"CUST-{i:05d}" for i in rng.permutation(rows)],
            "comment": [" ".join(rng.choice(WORDS, 14)) for _ in range(rows)],
            "channel": "web",
            "referrer": np.nan,
        }
    )
    recent = days >= np.datetime64("2024-01-01")
    loyal = np.char.lower(member.astype(str)) == "yes"
    frame["label"] = np.where(recent ^ loyal, "stay", "churn")
    frame.loc[[5, 50, 150], "label"] = "fraud"  # a class of 3 rows
    frame["label_copy"] = frame["label"]
    frame["label_code"] = frame["label"].map({"stay": "S", "churn": "C", "fraud": "F"})
    frame.loc[rng.random(rows) < 0.05, "signup"] = None
    frame.loc[rng.random(rows) < 0.05, "member"] = None
    return frame


def publish(storage: LocalStorage, model: str, frame: pd.DataFrame):
    info = storage.write(f"datasets/{model}/data.csv", frame.to_csv(index=False).encode(), content_type="text/csv")
    prepared = handle_finalized(storage, info.event_data())
    assert prepared is not None and prepared["type"] == events.DATASET_PREPARED, prepared and prepared.data
    return prepared


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    bucket = tmp_path_factory.mktemp("columns") / "bucket"
    storage = LocalStorage(bucket)
    frame = rich_frame()
    prepared = publish(storage, "rich", frame)
    reply = handle_prepared(storage, prepared.data)[-1]
    assert reply["type"] == events.MODEL_PUBLISHED, reply.data
    manager = ModelManager(Registry(storage))
    manager.refresh()
    assert manager.errors() == {}
    card = Registry(storage).card("rich", 1)
    return {"bucket": bucket, "storage": storage, "frame": frame, "prepared": prepared, "card": card,
            "loaded": manager.get("rich"), "manager": manager}


def by_name(items: list[dict], key: str = "name") -> dict[str, dict]:
    return {item[key]: item for item in items}


# --- typing ------------------------------------------------------------------------------------


def test_booleans_and_iso_dates_are_typed(rich):
    schema = json.loads(rich["storage"].read(rich["prepared"].data["prepared"] + "schema.json"))
    columns = by_name(schema["columns"])
    assert list(columns) == ["income", "member", "signup"]
    assert columns["income"]["type"] == "number"
    assert columns["member"]["type"] == "boolean"
    # Some values have a time, so the hour is a part too.
    assert columns["signup"] == {"name": "signup", "type": "datetime", "parts": ["year", "month", "day", "dayofweek", "hour"]}
    assert schema["spec"] is not None  # the effective spec is kept with the schema

    # Prepared data keeps the client-facing text: booleans as true/false, dates as uploaded.
    train = pd.read_csv(io.BytesIO(rich["storage"].read(rich["prepared"].data["prepared"] + "train.csv")),
                        keep_default_na=False, dtype=str)
    assert set(train["member"]) <= {"true", "false", ""} and {"true", "false"} <= set(train["member"])
    assert list(train.columns) == ["income", "member", "signup", "label"]
    dated = train["signup"][train["signup"] != ""]
    assert dated.str.match(r"^\d{4}-\d{2}-\d{2}").all()


def test_every_useless_column_is_dropped_with_its_reason(rich):
    schema = json.loads(rich["storage"].read(rich["prepared"].data["prepared"] + "schema.json"))
    dropped = by_name(schema["dropped"], "column")
    assert {name: d["kind"] for name, d in dropped.items()} == DROPPED_KINDS
    assert "identifier-like" in dropped["customer_id"]["reason"]
    assert "free text" in dropped["comment"]["reason"]
    assert "constant" in dropped["channel"]["reason"]
    assert dropped["referrer"]["reason"] == "all values missing"
    assert "identical to the target 'label'" in dropped["label_copy"]["reason"]
    assert "one-to-one relabelling of the target 'label'" in dropped["label_code"]["reason"]
    # The event summarises what was dropped and warned about.
    data = rich["prepared"].data
    assert {d["column"] for d in data["dropped"]} == set(DROPPED_KINDS)
    assert data["profile"] == data["prepared"] + "profile.json"

    # Target leaks are warnings naming the column, in the profile and in the model card.
    card = rich["card"]
    for place in (card["profile"]["warnings"], card["data"]["warnings"], data["warnings"]):
        assert any("'label_copy'" in w and "leak" in w for w in place)
        assert any("'label_code'" in w and "leak" in w for w in place)


def test_datetime_parts_are_onnx_inputs_and_clients_send_one_column(rich):
    storage, card = rich["storage"], rich["card"]
    model = onnx.load_from_string(storage.read("models/rich/versions/1/model.onnx"))
    inputs = [i.name for i in model.graph.input]
    parts = ["year", "month", "day", "dayofweek", "hour"]
    assert [f"signup__{p}" for p in parts] == [n for n in inputs if n.startswith("signup")]
    assert "signup" not in inputs
    signup = by_name(card["schema"]["columns"])["signup"]
    assert signup["inputs"] == {p: f"signup__{p}" for p in parts}
    assert by_name(card["schema"]["columns"])["member"]["input"] == "member"
    # The card lists the values a category column was trained on; numbers and dates have none.
    assert by_name(card["schema"]["columns"])["member"]["categories"] == ["false", "true"]
    assert "categories" not in by_name(card["schema"]["columns"])["income"] and "categories" not in signup

    # V2 metadata: the date is one BYTES input named after the column.
    response = PredictService(rich["manager"]).v2_model(None, b"", "rich")
    assert response.status_code == 200
    v2_inputs = {i["name"]: i["datatype"] for i in json.loads(response.body)["inputs"]}
    assert v2_inputs == {"income": "FP32", "member": "BYTES", "signup": "BYTES"}


RECORDS = [
    {"income": 50.0, "member": "yes", "signup": "2024-05-01", "ignored": None},
    {"income": 40.0, "member": True, "signup": "2023-03-15T08:30:00", "ignored": None},
    {"income": None, "member": "no", "signup": None, "ignored": None},  # no date at all
    {"income": 62.5, "member": None, "signup": "2024-11-30 23:10", "ignored": None},
    {"income": 55.0, "member": "N", "signup": "2030-01-01", "ignored": None},  # a date never seen
]


def test_served_model_takes_raw_dates_and_matches_sklearn(rich):
    loaded = rich["loaded"]
    records = [{k: v for k, v in r.items() if k != "ignored"} for r in RECORDS]
    answer = loaded.predict(columns_from_records(loaded.columns, records), len(records))
    assert answer["version"] == 1 and len(answer["predictions"]) == len(records)
    assert answer["classes"] == ["churn", "fraud", "stay"]  # the 3-row class is a class of the model

    # Refit the chosen candidate exactly as the trainer did (fixed seeds) and run sklearn on
    # the same rows, prepared as training prepares them.
    schema, train, test = load_prepared(rich["storage"], rich["prepared"].data["prepared"])
    fitted = CandidateSearch.for_spec(schema).fit(*train).evaluate(*test).results_
    pipeline = by_name([{"name": c.name, "c": c} for c in fitted])[rich["card"]["algorithm"]]["c"].pipeline
    raw = pd.DataFrame(records)
    x = with_datetime_parts(normalise(raw, schema["columns"]), schema["columns"])[list(train[0].columns)]
    assert x["signup__year"].tolist()[:2] == [2024.0, 2023.0] and math.isnan(x["signup__year"][2])
    assert list(pipeline.predict(x)) == answer["predictions"]
    assert np.allclose(pipeline.predict_proba(x), answer["probabilities"], atol=1e-3)

    # And the model learned from the date: members churn once they are past their first year,
    # non-members the other way round.
    assert answer["predictions"][:2] == ["churn", "stay"]


def test_bad_dates_and_booleans_are_input_errors(rich):
    loaded = rich["loaded"]
    for field, value in (("signup", "yesterday"), ("signup", "2024-13-01"), ("signup", 20240501), ("member", "maybe")):
        record = {"income": 1.0, "member": "yes", "signup": "2024-01-01", field: value}
        with pytest.raises(InvalidInput, match=f"column '{field}'") as error:
            loaded.predict(columns_from_records(loaded.columns, [record]), 1)
        assert type(error.value) is InvalidInput  # answered 422 (bucketml.serving.app.STATUS_OF)


def test_regression_on_dates_with_times_and_zones(tmp_path):
    """A price that rises with the year and at night: parts reach scaled linear models too."""
    rng = np.random.default_rng(3)
    rows = 150
    stamps = np.datetime64("2020-01-01T00:00") + rng.integers(0, 4 * 365 * 24 * 60, rows).astype("timedelta64[m]")
    hours = (stamps - stamps.astype("datetime64[D]")).astype("timedelta64[h]").astype(int)
    years = stamps.astype("datetime64[Y]").astype(int) + 1970
    frame = pd.DataFrame({
        "at": [str(s) + ("Z" if i % 3 == 0 else "") for i, s in enumerate(stamps)],
        "size": rng.normal(10, 2, rows).round(2),
    })
    frame["target"] = (years - 2020) * 10.0 + (hours >= 18) * 5.0 + frame["size"] + rng.normal(0, 0.5, rows)
    storage = LocalStorage(tmp_path / "bucket")
    prepared = publish(storage, "prices", frame)
    reply = handle_prepared(storage, prepared.data)[-1]
    assert reply["type"] == events.MODEL_PUBLISHED, reply.data
    card = Registry(storage).card("prices", 1)
    assert by_name(card["schema"]["columns"])["at"]["parts"] == ["year", "month", "day", "dayofweek", "hour"]
    assert card["metrics"]["r2"] > 0.8 and card["parity"]["passed"]
    assert card["profile"]["target"]["task"] == "regression" and card["profile"]["target"]["mean"] is not None
    manager = ModelManager(Registry(storage))
    manager.refresh()
    loaded = manager.get("prices")
    records = [{"at": "2020-06-01T12:00:00Z", "size": 10}, {"at": "2023-06-01 12:00", "size": 10}, {"at": None, "size": 10}]
    low, high, unknown = loaded.predict(columns_from_records(loaded.columns, records), 3)["predictions"]
    assert high - low > 20 and math.isfinite(unknown)


# --- target handling -------------------------------------------------------------------------


def test_a_three_row_class_is_trained_on_and_never_tested(rich):
    storage, prefix = rich["storage"], rich["prepared"].data["prepared"]
    train = pd.read_csv(io.BytesIO(storage.read(prefix + "train.csv")), keep_default_na=False, dtype=str)
    test = pd.read_csv(io.BytesIO(storage.read(prefix + "test.csv")), keep_default_na=False, dtype=str)
    assert (train["label"] == "fraud").sum() == 3
    assert (test["label"] == "fraud").sum() == 0
    assert len(train) + len(test) == 200
    card = rich["card"]
    assert card["schema"]["classes"] == ["churn", "fraud", "stay"]
    target = card["profile"]["target"]
    assert target["training_only_classes"] == ["fraud"]
    assert any("fraud (3 rows)" in n for n in card["profile"]["notes"])
    # Imbalance: the largest class over the 3-row class, and a warning about it.
    counts = target["classes"]
    assert counts["fraud"] == 3 and sum(counts.values()) == 200
    assert target["imbalance_ratio"] == pytest.approx(max(counts.values()) / 3, rel=1e-3)
    assert any("imbalanced" in w for w in card["profile"]["warnings"])


def test_the_split_is_deterministic(rich, tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    again = publish(storage, "rich", rich["frame"])
    for name in ("train.csv", "test.csv"):
        assert storage.read(again.data["prepared"] + name) == rich["storage"].read(rich["prepared"].data["prepared"] + name)


# --- profile -----------------------------------------------------------------------------------


def known_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "size": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, None, None],
            "color": ["red"] * 5 + ["blue"] * 4 + [None] * 3,
            "flag": ["yes", "no"] * 6,
            "when": [f"2024-01-{d:02d}" for d in range(1, 12)] + [None],
            "label": ["b"] + ["a"] * 5 + ["b"] + ["a"] * 5,
        }
    )


def test_profile_numbers_of_a_known_frame(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    prepared = publish(storage, "known", known_frame())
    profile = json.loads(storage.read(prepared.data["prepared"] + "profile.json"))
    assert profile["rows"] == {"uploaded": 12, "used": 12, "train": profile["rows"]["train"], "test": profile["rows"]["test"]}
    assert profile["rows"]["train"] + profile["rows"]["test"] == 12
    columns = by_name(profile["columns"])
    size = columns["size"]
    assert size["type"] == "number"
    assert size["missing_share"] == pytest.approx(2 / 12)
    assert size["distinct"] == 10
    assert size["mean"] == pytest.approx(5.5)
    assert size["std"] == pytest.approx(np.std(np.arange(1, 11), ddof=1))
    assert (size["min"], size["p50"], size["max"]) == (1.0, 5.5, 10.0)
    assert size["p25"] == pytest.approx(3.25) and size["p75"] == pytest.approx(7.75)

    color = columns["color"]
    assert color["type"] == "string" and color["missing_share"] == pytest.approx(0.25) and color["distinct"] == 2
    assert color["top"] == [{"value": "red", "count": 5}, {"value": "blue", "count": 4}]

    flag = columns["flag"]
    assert flag["type"] == "boolean" and flag["distinct"] == 2 and flag["missing_share"] == 0
    assert {t["value"]: t["count"] for t in flag["top"]} == {"true": 6, "false": 6}

    when = columns["when"]
    assert when["type"] == "datetime" and when["parts"] == ["year", "month", "day", "dayofweek"]
    assert when["missing_share"] == pytest.approx(1 / 12) and when["distinct"] == 11
    assert (when["min"], when["max"]) == ("2024-01-01T00:00:00", "2024-01-11T00:00:00")

    target = profile["target"]
    assert target["classes"] == {"a": 10, "b": 2}
    assert target["imbalance_ratio"] == 5.0
    assert target["training_only_classes"] == ["b"]
    assert profile["dropped"] == [] and profile["warnings"] == []


def test_spec_drop_and_id_columns_are_dropped(tmp_path):
    from bucketml.training.preparation import Upload, prepare

    frame = known_frame()
    spec = {"drop": ["color"], "id": ["flag"], "task": "classification", "test_size": 0.25}
    result = prepare(frame, Upload("b", "datasets/known/data.csv", 1), spec)
    dropped = by_name(result["schema"]["dropped"], "column")
    assert dropped["color"]["reason"] == "dropped by the spec" and dropped["color"]["kind"] == "spec_drop"
    assert dropped["flag"]["kind"] == "spec_id"
    assert [c["name"] for c in result["schema"]["columns"]] == ["size", "when"]
    assert result["schema"]["spec"] == spec
    assert result["schema"]["rows"]["test"] == 3  # 25% of the 10 rows of the common class, rounded up


# --- the shared numpy code ---------------------------------------------------------------------


def test_datetime_parts_agree_with_pandas():
    rng = np.random.default_rng(0)
    stamps = np.datetime64("1950-01-01T00:00") + rng.integers(0, 120 * 365 * 24 * 60, 500).astype("timedelta64[m]")
    texts = [str(s) for s in stamps]
    parts = datetime_parts(texts + [None, "", "soon"])
    index = pd.DatetimeIndex(stamps)
    assert np.array_equal(parts["year"][:500], index.year)
    assert np.array_equal(parts["month"][:500], index.month)
    assert np.array_equal(parts["day"][:500], index.day)
    assert np.array_equal(parts["dayofweek"][:500], index.day_of_week)
    assert np.array_equal(parts["hour"][:500], index.hour)
    assert all(np.isnan(parts[p][500:]).all() for p in parts)
    assert all(parts[p].dtype == np.float32 for p in parts)
    # A zone is converted to UTC; numpy-parseable ISO forms without one are taken as they are.
    zoned = datetime_parts(["2024-05-01T01:30:00+02:00", "2024-05-01T10:30:00Z", "2024-05-01 10:30"])
    assert zoned["day"].tolist() == [30, 1, 1] and zoned["hour"].tolist() == [23, 10, 10]


def test_boolean_spellings():
    assert [boolean_label(v) for v in (True, "YES", " y ", "t", "True", 1)] == ["true"] * 6
    assert [boolean_label(v) for v in (False, "no", "N", "f", "FALSE", 0)] == ["false"] * 6
    assert [boolean_label(v) for v in (None, "", float("nan"))] == [""] * 3
    assert [boolean_label(v) for v in ("maybe", 2, "yess")] == [None] * 3


def test_serving_imports_neither_pandas_nor_sklearn():
    code = ("import sys, bucketml.encoding, bucketml.serving.app; "
            "print(sorted(m for m in ('pandas', 'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- CLI ---------------------------------------------------------------------------------------


def run_cli(*args: str, bucket: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "BUCKETML_BUCKET": str(bucket)}
    return subprocess.run([BUCKETML, *args], check=False, capture_output=True, text=True, env=env, timeout=60)


def test_profile_command_prints_columns_dropped_reasons_and_target(rich):
    result = run_cli("profile", "rich", bucket=rich["bucket"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    table = out.split("dropped columns:")[0]
    for name, kind in (("income", "number"), ("member", "boolean"), ("signup", "datetime"), ("customer_id", "dropped")):
        assert any(line.split()[:2] == [name, kind] for line in table.splitlines()), (name, out)
    dropped = out.split("dropped columns:")[1]
    for text in ("identifier-like", "free text", "constant", "all values missing", "target leak", "relabelling"):
        assert text in dropped
    assert "warnings:" in out and "'label_copy'" in out
    assert "largest/smallest class ratio" in out and "fraud" in out
    assert run_cli("profile", "rich", "--version", "1", bucket=rich["bucket"]).stdout == out


def test_profile_command_errors_are_one_line(rich):
    for args, expected in ((("profile", "nosuch"), "'nosuch' has no versions"),
                           (("profile", "rich", "--version", "9"), "no version 9"),
                           (("profile", "../x"), "invalid model name")):
        result = run_cli(*args, bucket=rich["bucket"])
        assert result.returncode == 1 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_category_lists_are_bounded_and_say_so():
    frame = pd.DataFrame({"city": [f"c{i:04d}" for i in range(1500)] + [""] * 10, "n": 1.0})
    columns = with_categories([{"name": "city", "type": "string"}, {"name": "n", "type": "number"}], frame)
    city = columns[0]
    assert city["categories"] == sorted(f"c{i:04d}" for i in range(1500))[:MAX_LISTED_CATEGORIES]
    assert city["categories_truncated"] is True and city["distinct"] == 1500  # missing '' is not a category
    assert columns[1] == {"name": "n", "type": "number"}
