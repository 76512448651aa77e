"""Upload -> preprocess -> train -> serve, in process, with the real parts.

A folder bucket (LocalStorage) under tmp_path, the real handlers of the preprocess and train
functions, real scikit-learn training, real ONNX export and onnxruntime serving. Datasets are
generated with numpy or come bundled with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math

import numpy as np
import onnx
import pandas as pd
import pytest
from bucketml.contracts import events
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.encoding import columns_from_records
from bucketml.serving.manager import ModelManager
from bucketml.storage import LocalStorage, ObjectInfo
from bucketml.steps.train import handle_prepared
from sklearn.datasets import load_diabetes, load_iris

# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "bucket")


def upload(storage, model: str, data, filename: str = "data.csv", metadata: dict | None = None) -> ObjectInfo:
    """Write an upload the way `bucketml upload` / gsutil does: one object under datasets/."""
    raw = data.to_csv(index=False).encode("utf-8") if isinstance(data, pd.DataFrame) else data
    return storage.write(f"datasets/{model}/{filename}", raw, content_type="text/csv", metadata=metadata)


def preprocess(storage, info: ObjectInfo):
    """What the preprocess function does with the finalized event GCS sends for `info`."""
    return handle_finalized(storage, info.event_data())


def train(storage, prepared):
    """The train step's reply (the last of the events it announces)."""
    return handle_prepared(storage, prepared.data)[-1]


def publish(storage, model: str, data, **kwargs):
    """Upload, preprocess and train; both steps must succeed. Returns (prepared, reply)."""
    info = upload(storage, model, data, **kwargs)
    prepared = preprocess(storage, info)
    assert prepared is not None
    assert prepared["type"] == events.DATASET_PREPARED, prepared.data
    reply = train(storage, prepared)
    assert reply["type"] == events.MODEL_PUBLISHED, reply.data
    return prepared, reply


def serve(storage, model: str):
    manager = ModelManager(Registry(storage))
    manager.refresh()
    assert manager.errors() == {}
    return manager.get(model)


def predict(loaded, records: list[dict]) -> dict:
    return loaded.predict(columns_from_records(loaded.columns, records), len(records))


def read_json(storage, name: str) -> dict:
    return json.loads(storage.read(name))


def names_under(storage, prefix: str) -> list[str]:
    return [info.name for info in storage.list(prefix)]


def iris_frame() -> pd.DataFrame:
    """Iris with its real column names ('petal width (cm)') and species names as labels."""
    bunch = load_iris(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["species"] = [str(bunch.target_names[i]) for i in bunch.target]
    return frame


def mixed_frame(rows: int = 200, seed: int = 7) -> pd.DataFrame:
    """Numbers and strings with gaps in both; the label depends on a string and a number."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, rows).astype(float),
            "income": rng.normal(50, 15, rows).round(1),
            "color": rng.choice(["red", "green", "blue"], rows),
            "size": rng.choice(["S", "M", "L"], rows),
        }
    )
    frame["label"] = np.where((frame["color"] == "red") | (frame["income"] > 65), "buy", "skip")
    frame.loc[rng.random(rows) < 0.1, "age"] = np.nan
    frame.loc[rng.random(rows) < 0.1, "income"] = np.nan
    frame.loc[rng.random(rows) < 0.1, "color"] = None
    frame.loc[rng.random(rows) < 0.1, "size"] = None
    return frame


# --- iris: string labels, column names with spaces and parentheses ---------------------------


@pytest.fixture(scope="module")
def iris(tmp_path_factory):
    storage = LocalStorage(tmp_path_factory.mktemp("iris") / "bucket")
    frame = iris_frame()
    info = upload(storage, "iris", frame, filename="iris.csv", metadata={"target": "species"})
    prepared = preprocess(storage, info)
    assert prepared["type"] == events.DATASET_PREPARED, prepared.data
    reply = train(storage, prepared)
    return {"storage": storage, "frame": frame, "info": info, "prepared": prepared, "reply": reply}


def test_iris_upload_is_published_as_version_1(iris):
    reply = iris["reply"]
    assert reply["type"] == events.MODEL_PUBLISHED
    assert reply["source"] == "/bucketml/train"
    assert reply["subject"] == "iris"
    assert reply[events.MODEL_ATTRIBUTE] == "iris"
    assert reply.data["version"] == 1
    assert reply.data["current_version"] == 1
    assert reply.data["model_object"] == "models/iris/versions/1/model.onnx"
    assert read_json(iris["storage"], "models/iris/current.json")["version"] == 1
    prepared = iris["prepared"]
    assert prepared.data["target"] == "species"
    assert prepared.data["task"] == "classification"


def test_iris_served_model_predicts_species_names(iris):
    loaded = serve(iris["storage"], "iris")
    frame = iris["frame"]
    features = [c for c in frame.columns if c != "species"]
    # The average flower of each species is an unmistakable example of it.
    centroids = frame.groupby("species")[features].mean()
    records = [dict(row) for _, row in centroids.iterrows()]
    answer = predict(loaded, records)
    assert answer["model"] == "iris" and answer["version"] == 1
    assert answer["predictions"] == ["setosa", "versicolor", "virginica"]
    assert answer["classes"] == ["setosa", "versicolor", "virginica"]
    for probabilities, expected in zip(answer["probabilities"], range(3)):
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-4)
        assert int(np.argmax(probabilities)) == expected

    # A textbook setosa (short, narrow petals), sent with the column names as they are.
    setosa = {"sepal length (cm)": 5.0, "sepal width (cm)": 3.4, "petal length (cm)": 1.4, "petal width (cm)": 0.2}
    assert predict(loaded, [setosa])["predictions"] == ["setosa"]

    # And on the whole dataset it is right nearly everywhere.
    all_rows = predict(loaded, frame[features].to_dict("records"))["predictions"]
    assert np.mean(np.array(all_rows) == frame["species"].to_numpy()) >= 0.9


def test_iris_card_describes_the_version(iris):
    storage, info = iris["storage"], iris["info"]
    card = read_json(storage, "models/iris/versions/1/card.json")
    onnx_bytes = storage.read("models/iris/versions/1/model.onnx")
    model = onnx.load_from_string(onnx_bytes)

    assert card["task"] == "classification"
    assert card["target"] == "species"
    assert card["version"] == 1 and card["model"] == "iris"

    schema = card["schema"]
    assert [c["name"] for c in schema["columns"]] == [c for c in iris["frame"].columns if c != "species"]
    assert all(c["type"] == "number" for c in schema["columns"])
    # Every column says which ONNX input takes it; the converter renames 'petal width (cm)'.
    onnx_inputs = [i.name for i in model.graph.input]
    assert [c["input"] for c in schema["columns"]] == onnx_inputs
    assert all(" " not in name and "(" not in name for name in onnx_inputs)
    assert schema["classes"] == ["setosa", "versicolor", "virginica"]

    assert card["metric"] == "accuracy"
    assert card["metrics"]["accuracy"] >= 0.85
    assert {"accuracy", "balanced_accuracy", "f1_macro"} <= set(card["metrics"])
    candidates = {c["name"]: c for c in card["candidates"]}
    assert {"svm", "random_forest"} <= set(candidates)
    assert card["algorithm"] in candidates
    assert candidates[card["algorithm"]]["metrics"] == card["metrics"]
    assert all("accuracy" in c["metrics"] for c in candidates.values())

    assert card["parity"]["passed"] is True
    assert card["parity"]["label_mismatches"] == 0
    assert card["parity"]["max_probability_difference"] <= card["parity"]["tolerance"]

    lineage = card["lineage"]["upload"]
    assert lineage["name"] == "datasets/iris/iris.csv"
    assert lineage["bucket"] == storage.bucket_name
    assert str(lineage["generation"]) == str(info.generation)
    assert lineage["md5Hash"] == info.md5_hash
    assert lineage["md5Hash"] == storage.stat("datasets/iris/iris.csv").md5_hash

    for library in ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy", "pandas", "python"):
        assert card["libraries"].get(library), library

    # The checksum in the card is the checksum of the file that is served.
    assert card["artifact"]["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert card["artifact"]["bytes"] == len(onnx_bytes)


def test_iris_onnx_model_carries_its_identity(iris):
    storage = iris["storage"]
    model = onnx.load_from_string(storage.read("models/iris/versions/1/model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["bucketml.model"] == "iris"
    assert props["bucketml.version"] == "1"
    card = read_json(storage, "models/iris/versions/1/card.json")
    assert json.loads(props["bucketml.schema"]) == card["schema"]
    # Served from bytes alone: no external data files next to the model.
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


# --- regression and mixed data ---------------------------------------------------------------


def test_diabetes_regression_with_conventional_target_column(storage):
    frame = load_diabetes(as_frame=True).frame  # ten numeric columns and 'target'
    prepared, reply = publish(storage, "diabetes", frame)
    assert prepared.data["target"] == "target"
    assert prepared.data["task"] == "regression"

    card = read_json(storage, "models/diabetes/versions/1/card.json")
    assert card["task"] == "regression"
    assert card["data"]["target_origin"] == "convention"
    assert card["metric"] == "r2"
    assert set(card["metrics"]) == {"r2", "rmse", "mae"}
    assert card["metrics"]["r2"] > 0.2
    assert 0 < card["metrics"]["mae"] <= card["metrics"]["rmse"]
    assert card["schema"]["classes"] == []
    assert card["parity"]["passed"] is True
    assert set(reply.data["metrics"]) == {"r2", "rmse", "mae"}

    loaded = serve(storage, "diabetes")
    rows = frame.drop(columns="target").head(20)
    answer = predict(loaded, rows.to_dict("records"))
    assert len(answer["predictions"]) == 20
    assert all(isinstance(v, float) and math.isfinite(v) for v in answer["predictions"])
    assert "probabilities" not in answer and "classes" not in answer
    # Predictions live on the target's scale and are not just one constant.
    low, high = frame["target"].min(), frame["target"].max()
    assert all(low - 100 <= v <= high + 100 for v in answer["predictions"])
    assert len(set(round(v, 3) for v in answer["predictions"])) > 5


def test_mixed_numbers_strings_and_gaps_serve_missing_and_unseen_values(storage):
    frame = mixed_frame()
    prepared, _ = publish(storage, "shop", frame)
    schema = read_json(storage, prepared.data["prepared"] + "schema.json")
    assert {c["name"]: c["type"] for c in schema["columns"]} == {
        "age": "number", "income": "number", "color": "string", "size": "string",
    }
    assert schema["classes"] == ["buy", "skip"]

    loaded = serve(storage, "shop")
    records = [
        {"age": None, "income": None, "color": None, "size": None},  # nothing known
        {"age": 30, "income": 40.0, "color": "purple", "size": "XXL"},  # categories never seen
        {"age": None, "income": 45.0, "color": "red", "size": None},
        {"age": "41", "income": "", "color": "green", "size": "M"},  # numbers as text, '' as missing
    ]
    answer = predict(loaded, records)
    assert len(answer["predictions"]) == len(records)
    assert set(answer["predictions"]) <= {"buy", "skip"}
    for probabilities in answer["probabilities"]:
        assert all(math.isfinite(p) for p in probabilities)
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-4)
    # What it learned from the string column still shows: red buys.
    assert answer["predictions"][2] == "buy"

    # On fresh, complete rows of the same process the served model is mostly right.
    fresh = mixed_frame(rows=100, seed=99).dropna()
    got = predict(loaded, fresh.drop(columns="label").to_dict("records"))["predictions"]
    assert np.mean(np.array(got) == fresh["label"].to_numpy()) >= 0.8


# --- idempotency and new uploads -------------------------------------------------------------


def test_same_finalized_event_twice_answers_the_same_prepared_event(storage):
    info = upload(storage, "shop", mixed_frame(rows=60))
    first = preprocess(storage, info)
    files = {i.name: i.generation for i in storage.list("prepared/")}
    second = preprocess(storage, info)
    assert first["type"] == second["type"] == events.DATASET_PREPARED
    assert second["id"] == first["id"]
    assert second.data == first.data
    # The duplicate did not prepare anything again.
    assert {i.name: i.generation for i in storage.list("prepared/")} == files


def test_same_prepared_event_twice_makes_one_version(storage):
    info = upload(storage, "shop", mixed_frame(rows=60))
    prepared = preprocess(storage, info)
    first = handle_prepared(storage, prepared.data)
    second = handle_prepared(storage, prepared.data)
    # model.trained always, then model.published because the pointer moved; the duplicate
    # announces the same two events with the same ids, so consumers can drop it.
    assert [e["type"] for e in first] == [e["type"] for e in second] == [events.MODEL_TRAINED, events.MODEL_PUBLISHED]
    assert [e["id"] for e in second] == [e["id"] for e in first]
    assert {e.data["version"] for e in first + second} == {1}
    assert first[0].data["current_version"] == 1
    assert Registry(storage).versions("shop") == [1]
    assert names_under(storage, "models/shop/versions/") == [
        "models/shop/versions/1/card.json", "models/shop/versions/1/model.onnx", "models/shop/versions/1/reference.json",
        "models/shop/versions/1/report.html",
    ]


def test_new_upload_of_the_same_file_becomes_version_2_and_current(storage):
    _, first = publish(storage, "shop", mixed_frame(rows=80, seed=1))
    manager = ModelManager(Registry(storage))
    manager.refresh()
    assert manager.get("shop").version == 1

    prepared, second = publish(storage, "shop", mixed_frame(rows=80, seed=2))  # same object name
    assert prepared["id"] != first["id"]
    assert second.data["version"] == 2
    assert second.data["previous_version"] == 1
    assert second["id"] != first["id"]
    pointer = read_json(storage, "models/shop/current.json")
    assert pointer["version"] == 2 and pointer["previous"] == 1
    assert Registry(storage).versions("shop") == [1, 2]
    live = storage.stat("datasets/shop/data.csv")
    lineage = read_json(storage, "models/shop/versions/2/card.json")["lineage"]["upload"]
    assert str(lineage["generation"]) == str(live.generation)

    # A replica that was serving version 1 follows the pointer without a restart.
    manager.refresh()
    assert manager.get("shop").version == 2

    # A late duplicate of the first upload's prepared event makes no third version.
    replay = handle_prepared(storage, preprocess_like_first(storage, first).data)
    assert [(e["type"], e.data["version"], e.data["current_version"]) for e in replay] == [(events.MODEL_TRAINED, 1, 2)]
    assert Registry(storage).versions("shop") == [1, 2]
    assert read_json(storage, "models/shop/current.json")["version"] == 2


def preprocess_like_first(storage, published):
    """The prepared event of the upload a published event was made from, as stored."""
    run = read_json(storage, "models/shop/versions/1/card.json")["lineage"]["prepared"]
    summary = read_json(storage, run + "prepared.json")
    assert summary["upload"]["generation"] == published.data["upload"]["generation"]
    return events.platform_event(events.DATASET_PREPARED, "preprocess", "shop", summary)


def test_event_for_a_replaced_generation_is_ignored(storage):
    old = upload(storage, "shop", mixed_frame(rows=60, seed=1))
    new = upload(storage, "shop", mixed_frame(rows=60, seed=2))
    assert new.generation > old.generation
    assert preprocess(storage, old) is None
    assert names_under(storage, "prepared/") == [] and names_under(storage, "rejected/") == []
    # The live generation is still processed normally.
    assert preprocess(storage, new)["type"] == events.DATASET_PREPARED

    # Deleted since the event was sent: nothing to do either.
    gone = upload(storage, "other", mixed_frame(rows=60))
    storage.delete("datasets/other/data.csv")
    assert preprocess(storage, gone) is None


@pytest.mark.parametrize(
    "name",
    [
        "models/x/y.csv",
        "datasets/m/bucketml.yaml",
        "datasets/m/notes.txt",
        "datasets/m/nested/data.csv",
        "prepared/m/run/train.csv",
        "rejected/m/data.csv",
        "data.csv",
    ],
)
def test_objects_outside_datasets_are_ignored(storage, name):
    info = storage.write(name, mixed_frame(rows=30).to_csv(index=False).encode())
    assert preprocess(storage, info) is None
    # Nothing was written besides the object itself.
    assert [n for n in names_under(storage, "") if n != name] == []


def test_event_for_another_bucket_is_refused(storage):
    """A misrouted Trigger: refused as malformed (400, dead-lettered), so an operator sees it."""
    info = upload(storage, "shop", mixed_frame(rows=60))
    data = dict(info.event_data(), bucket="someone-elses-bucket")
    with pytest.raises(events.MalformedEvent, match="someone-elses-bucket.*serves bucket"):
        handle_finalized(storage, data)
    assert names_under(storage, "prepared/") == [] and names_under(storage, "rejected/") == []


# --- rejections ------------------------------------------------------------------------------


def _rows(n: int, label=lambda i: "ab"[i % 2], header: str = "x1,x2,target") -> bytes:
    lines = [header] + [f"{i},{(i * 7) % 5},{label(i)}" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


REJECTIONS = [
    # id, file bytes, object metadata, spec file, reason, things the message must say
    ("empty", b"", None, None, "empty_file", ["empty", "header row"]),
    ("header_only", b"x1,x2,target\n", None, None, "header_only", ["no data rows"]),
    ("binary", bytes(range(256)) * 8, None, None, "not_csv", ["not a CSV"]),
    ("single_column", b"target\na\nb\na\nb\na\nb\na\nb\na\nb\na\nb\n", None, None, "not_csv", ["single column"]),
    ("no_target", _rows(30, header="x1,x2,outcome"), None, None, "no_target",
     ["--target", "bucketml.yaml", "target, label"]),
    ("target_missing", _rows(30, label=lambda i: "", header="x1,x2,label"), None, None, "target_missing", ["'label'"]),
    ("one_class", _rows(30, label=lambda i: "yes"), None, None, "one_class", ["'target'", "at least two"]),
    ("too_few_rows", _rows(6), None, None, "too_few_rows", ["6", "at least 10"]),
    ("metadata_target_absent", _rows(30), {"target": "price"}, None, "no_target", ["'price'", "x1, x2, target"]),
    ("spec_invalid_yaml", _rows(30), None, b"target: [unclosed\n", "spec_invalid", ["bucketml.yaml", "YAML"]),
    ("spec_not_a_mapping", _rows(30), None, b"- target\n- label\n", "spec_invalid", ["bucketml.yaml", "target:"]),
    ("spec_target_absent", _rows(30), None, b"target: price\n", "no_target", ["'price'", "spec"]),
]


@pytest.mark.parametrize("raw, metadata, spec, reason, hints", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_bad_upload_is_rejected_with_a_reason_and_a_report(storage, raw, metadata, spec, reason, hints):
    model = "bad"
    if spec is not None:
        storage.write(f"datasets/{model}/bucketml.yaml", spec, content_type="application/yaml")
    info = upload(storage, model, raw, filename="upload.csv", metadata=metadata)
    reply = preprocess(storage, info)

    assert reply is not None
    assert reply["type"] == events.DATASET_REJECTED
    assert reply["source"] == "/bucketml/preprocess"
    assert reply["subject"] == model and reply[events.MODEL_ATTRIBUTE] == model
    assert reply.data["reason"] == reason
    message = reply.data["message"]
    for hint in hints:
        assert hint.lower() in message.lower(), f"{hint!r} not in {message!r}"
    assert reply.data["upload"]["name"] == f"datasets/{model}/upload.csv"
    assert str(reply.data["upload"]["generation"]) == str(info.generation)

    report_name = f"rejected/{model}/upload.csv.{info.generation}.json"
    assert reply.data["report"] == report_name
    report = read_json(storage, report_name)
    assert report["reason"] == reason and report["message"] == message

    # Nothing was prepared or trained, and a redelivery answers the same rejection.
    assert names_under(storage, "prepared/") == [] and names_under(storage, "models/") == []
    again = preprocess(storage, info)
    assert again["id"] == reply["id"] and again.data["reason"] == reason


# --- CSV as people export it -----------------------------------------------------------------

CITIES = ["Zürich", "Genève", "Köln"]


def _weather(rows: int = 60, seed: int = 3):
    rng = np.random.default_rng(seed)
    city = rng.choice(CITIES, rows)
    temp = rng.normal(15, 5, rows).round(1)
    humidity = rng.integers(30, 90, rows)
    label = np.where(temp > 15, "warm", "cold")
    return list(zip(city, temp, humidity, label))


def weather_csv(sep=",", newline="\n", decimal=".", quote_city=False, missing=False) -> str:
    lines = [sep.join(["city", "temp", "humidity", "label"])]
    for i, (city, temp, humidity, label) in enumerate(_weather()):
        city = f'"{city}, CH"' if quote_city else city
        temp = str(temp).replace(".", decimal)
        humidity = str(humidity)
        if missing and i < 3:
            # The three spellings of 'unknown' found most often in exports.
            city, temp, humidity = [("?", temp, humidity), (city, "NA", humidity), (city, temp, "null")][i]
        lines.append(sep.join([city, temp, humidity, label]))
    return newline.join(lines) + newline


QUIRKS = {
    "semicolon": lambda: weather_csv(sep=";").encode("utf-8"),
    "tab": lambda: weather_csv(sep="\t").encode("utf-8"),
    "utf8_bom": lambda: ("\ufeff" + weather_csv()).encode("utf-8"),
    "latin1": lambda: weather_csv().encode("latin-1"),
    "crlf": lambda: weather_csv(newline="\r\n").encode("utf-8"),
    "quoted_commas": lambda: weather_csv(quote_city=True).encode("utf-8"),
    "missing_tokens": lambda: weather_csv(missing=True).encode("utf-8"),
}


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_csv_quirks_are_prepared_and_trained(storage, quirk):
    prepared, reply = publish(storage, "weather", QUIRKS[quirk]())
    schema = read_json(storage, prepared.data["prepared"] + "schema.json")
    assert schema["target"] == "label"
    # Same columns, same types, whatever the file looked like: 'NA' does not make temp a string.
    assert [(c["name"], c["type"]) for c in schema["columns"]] == [
        ("city", "string"), ("temp", "number"), ("humidity", "number"),
    ]
    assert schema["rows"]["uploaded"] == 60
    assert schema["classes"] == ["cold", "warm"]

    train_csv = storage.read(prepared.data["prepared"] + "train.csv").decode("utf-8")
    test_csv = storage.read(prepared.data["prepared"] + "test.csv").decode("utf-8")
    data = pd.concat([pd.read_csv(io.StringIO(t), keep_default_na=False) for t in (train_csv, test_csv)])
    cities = set(data["city"])
    suffix = ", CH" if quirk == "quoted_commas" else ""
    assert {c + suffix for c in CITIES} <= cities  # accents decoded, quoted commas kept inside
    if quirk == "missing_tokens":
        assert "?" not in cities and "" in cities
        assert pd.to_numeric(data["temp"], errors="coerce").isna().sum() == 1
        assert pd.to_numeric(data["humidity"], errors="coerce").isna().sum() == 1

    assert reply.data["version"] == 1
    loaded = serve(storage, "weather")
    answer = predict(loaded, [{"city": "Zürich" + suffix, "temp": 30.0, "humidity": 50}])
    assert answer["predictions"] == ["warm"]


def test_semicolon_csv_with_decimal_commas_keeps_numbers_numeric(storage):
    info = upload(storage, "weather", weather_csv(sep=";", decimal=",").encode("utf-8"))
    prepared = preprocess(storage, info)
    schema = read_json(storage, prepared.data["prepared"] + "schema.json")
    assert {c["name"]: c["type"] for c in schema["columns"]}["temp"] == "number"


def adult_like_bytes(rows: int = 300, seed: int = 11) -> bytes:
    """Like the UCI Adult export: no header row, a space after each comma, ' ?' for missing,
    CRLF line ends, a category with only 5 rows, and a column that relabels the target."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        age = int(rng.integers(18, 80))
        hours = int(rng.integers(10, 70))
        work = "?" if i % 17 == 0 else str(rng.choice(["Private", "Self-emp", "State-gov"]))
        country = "Holand-Netherlands" if i < 5 else str(rng.choice(["United-States", "Mexico"]))
        income = ">50K" if age / 80 + hours / 70 + rng.normal(0, 0.2) > 1.0 else "<=50K"
        flag = "rich" if income == ">50K" else "not-rich"  # a relabelling of the target: a leak
        lines.append(f"{age}, {work}, {hours}, {country}, {flag}, {income}")
    return ("\r\n".join(lines) + "\r\n").encode()


def test_headerless_adult_like_export_trains_with_a_named_target(storage):
    prepared, reply = publish(storage, "adult", adult_like_bytes(), metadata={"target": "column_6"})
    card = Registry(storage).card("adult", reply.data["version"])
    assert card["target"] == "column_6" and card["schema"]["classes"] == ["<=50K", ">50K"]
    dropped = {d["column"]: d["reason"] for d in card["data"]["dropped"]}
    assert "column_5" in dropped and "target" in dropped["column_5"]  # the leak, with why
    assert any("column_5" in w for w in card["data"]["warnings"])
    assert any("no header row" in note for note in card["profile"]["notes"])
    workclass = next(c for c in card["profile"]["columns"] if c["name"] == "column_2")
    assert workclass["missing_share"] > 0 and "?" not in {t["value"] for t in workclass["top"]}
    loaded = serve(storage, "adult")
    answer = predict(loaded, [{"column_1": 60, "column_2": None, "column_3": 65, "column_4": "Holand-Netherlands"}])
    assert answer["predictions"] == [">50K"]


def test_gzip_upload_trains_like_the_plain_file(storage):
    raw = gzip.compress(iris_frame().to_csv(index=False).encode())
    _, reply = publish(storage, "irisgz", raw, filename="iris.csv.gz", metadata={"target": "species"})
    card = Registry(storage).card("irisgz", reply.data["version"])
    assert card["data"]["rows"]["uploaded"] == 150 and card["metrics"]["accuracy"] > 0.85
