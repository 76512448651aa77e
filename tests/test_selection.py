"""Model selection: a cross-validated search on the training split picks the model; the
held-out split only reports its metrics; the chosen model's ONNX export agrees with sklearn.

Real LocalStorage under tmp_path, the real preprocess and train handlers, scikit-learn's
bundled datasets written as CSV uploads. Each dataset is trained once per module.
"""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
from bucketml.contracts import events
from bucketml.steps import train as trainer
from bucketml.training import candidates as candidate_models
from bucketml.training import search as candidate_search
from bucketml.training.cross_validation import fold_plan
from bucketml.training.search import CandidateSearch
from bucketml.training.preparation import load_prepared
from bucketml.training.export import PROBABILITY_TOLERANCE, TIE_MARGIN, check_parity, served_columns, to_onnx
from bucketml.steps.preprocess import handle_finalized
from bucketml.registry.model_registry import Registry
from bucketml.encoding import columns_from_records
from bucketml.serving.manager import ModelManager
from bucketml.storage import LocalStorage
from bucketml.steps.train import handle_prepared
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris, load_wine
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, r2_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR
from threadpoolctl import threadpool_limits

# --- helpers ---------------------------------------------------------------------------------


def bundled(name: str) -> pd.DataFrame:
    """A bundled dataset as an upload: its feature columns and 'target'."""
    if name == "digits":  # 1,797 rows; 500 of them keep the test quick (100 held out)
        return load_digits(as_frame=True).frame.sample(500, random_state=0)
    loader = {"breast_cancer": load_breast_cancer, "wine": load_wine, "iris": load_iris, "diabetes": load_diabetes}[name]
    return loader(as_frame=True).frame


def train_upload(storage, model: str, frame: pd.DataFrame, metadata: dict | None = None):
    """Upload, preprocess and train, recording the sklearn pipeline the trainer exported.

    The spy only looks: it returns what export_first_that_agrees returned. (The registry
    keeps no sklearn object, by design; this is how a test gets the pipeline to compare.)"""
    info = storage.write(f"datasets/{model}/data.csv", frame.to_csv(index=False).encode(), metadata=metadata)
    prepared = handle_finalized(storage, info.event_data())
    assert prepared["type"] == events.DATASET_PREPARED, prepared.data
    seen = {}
    real = trainer.export_first_that_agrees

    def spy(candidates, schema, x_test):
        result = real(candidates, schema, x_test)
        seen["chosen"] = result[0]
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "export_first_that_agrees", spy)
        reply = handle_prepared(storage, prepared.data)[-1]
    assert reply["type"] in (events.MODEL_PUBLISHED, events.MODEL_TRAINED), reply.data
    card = Registry(storage).card(model, reply.data["version"])
    schema, train, test = load_prepared(storage, prepared.data["prepared"])
    return {"storage": storage, "model": model, "card": card, "schema": schema, "train": train, "test": test,
            "chosen": seen["chosen"], "reply": reply}


def plain_sklearn(task: str) -> dict:
    """The same candidate types with scikit-learn's default hyperparameters (scaled inputs for
    the SVM and the linear models, as anyone would)."""
    if task == "classification":
        return {
            "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            "svm": make_pipeline(StandardScaler(), SVC()),
            "gradient_boosting": HistGradientBoostingClassifier(random_state=0),
            "random_forest": RandomForestClassifier(random_state=0),
        }
    return {
        "ridge": make_pipeline(StandardScaler(), Ridge()),
        "svm": make_pipeline(StandardScaler(), SVR()),
        "gradient_boosting": HistGradientBoostingRegressor(random_state=0),
        "random_forest": RandomForestRegressor(random_state=0),
    }


def plain_scores(result) -> dict[str, float]:
    """Held-out primary metric of each plain candidate, on the trainer's own split."""
    (x_train, y_train), (x_test, y_test) = result["train"], result["test"]
    task = result["schema"]["task"]
    score = accuracy_score if task == "classification" else r2_score
    out = {}
    for name, estimator in plain_sklearn(task).items():
        estimator.fit(x_train, y_train)
        out[name] = float(score(y_test, estimator.predict(x_test)))
    return out


def onnx_answer(storage, model: str, x: pd.DataFrame) -> dict:
    manager = ModelManager(Registry(storage))
    manager.refresh()
    loaded = manager.get(model)
    return loaded.predict(columns_from_records(loaded.columns, x.to_dict("records")), len(x))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """sklearn in the tests runs with one OpenMP and BLAS thread, like the trainer: on a busy
    2-core box, spinning OpenMP threads made the plain boosting baselines take minutes."""
    with threadpool_limits(limits=1):
        yield


DATASETS = ["breast_cancer", "wine", "iris", "digits", "diabetes"]
PRIMARY = {"classification": "accuracy", "regression": "r2"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    storage = LocalStorage(tmp_path_factory.mktemp("selection") / "bucket")
    return {name: train_upload(storage, name.replace("_", "-"), bundled(name)) for name in DATASETS}


# --- the choice --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_chosen_model_is_as_good_as_the_best_plain_sklearn_candidate(trained, name):
    result = trained[name]
    card, task = result["card"], result["schema"]["task"]
    metric = PRIMARY[task]
    assert card["metric"] == metric
    plain = plain_scores(result)
    chosen = card["metrics"][metric]
    print(f"{name}: bucketml {card['algorithm']} {card['candidates'][0]['params']} {metric}={chosen:.4f}; "
          f"plain sklearn best {max(plain, key=plain.get)} {max(plain.values()):.4f}; {plain}")
    # One held-out row of wine or iris is worth 0.03: a one-row difference there is not a loss.
    test_rows = len(result["test"][0])
    tolerance = max(0.01, 1.0 / test_rows) if task == "classification" else 0.01
    assert chosen >= max(plain.values()) - tolerance, (chosen, plain)

    # Chosen by cross-validation on the training rows: the best-ranked candidate that exported,
    # ranked by its mean fold score less one standard error.
    ranking = card["selection"]["ranking"]
    assert [r["rank_score"] for r in ranking] == sorted((r["rank_score"] for r in ranking), reverse=True)
    assert all(r["rank_score"] <= r["cv_score"] for r in ranking)
    assert card["algorithm"] == ranking[0]["name"]
    assert card["candidate_failures"] == []
    selection = card["selection"]
    folds, repeats = fold_plan(len(result["train"][0]))
    assert selection["metric"] == metric and (selection["folds"], selection["repeats"]) == (folds, repeats)
    assert selection["train_rows"] == selection["cv_rows"] == len(result["train"][0])
    assert selection["test_rows"] == test_rows

    # Every candidate was cross-validated (or dropped early for scoring far worse than the
    # leader); each has its CV score, settings and held-out metrics.
    singles = [c for c in card["candidates"] if c["name"] != "ensemble"]
    assert {c["name"] for c in singles} | {s["name"] for s in card["skipped"]} == set(plain)
    assert all(s["reason"].startswith("dropped after") for s in card["skipped"])
    for candidate in singles:
        search = candidate["search"]
        scored = [t for t in search if t["cv_score"] is not None]
        best = max(t["rank_score"] for t in scored)
        assert candidate["params"] == next(t["params"] for t in scored if t["rank_score"] == best)
        assert all(len(t["fold_scores"]) == folds * repeats and t["rows"] == len(result["train"][0]) for t in search)
        assert candidate["fit_seconds"] > 0 and candidate["search_seconds"] > 0
        assert metric in candidate["metrics"]
    ensemble = selection["ensemble"]
    if ensemble and ensemble["chosen"]:
        (averaged,) = [c for c in card["candidates"] if c["name"] == "ensemble"]
        assert averaged["members"] == ensemble["weights"] and len(ensemble["weights"]) >= 2
        assert ensemble["rank_score"] > ensemble["best_single"]["rank_score"]
    by_name = {c["name"]: c for c in card["candidates"]}
    assert by_name[card["algorithm"]]["metrics"] == card["metrics"]
    assert result["chosen"].name == card["algorithm"] and result["chosen"].params == by_name[card["algorithm"]]["params"]


@pytest.mark.parametrize("name", DATASETS)
def test_onnx_model_agrees_with_sklearn_on_every_test_row(trained, name):
    result = trained[name]
    card, pipeline = result["card"], result["chosen"].pipeline
    x_test, y_test = result["test"]
    parity = card["parity"]
    assert parity["passed"] is True
    assert parity["rows"] == len(x_test) + parity["edge_rows"]

    # Independently: onnxruntime, as predict serves the model, against the sklearn pipeline.
    answer = onnx_answer(result["storage"], result["model"], x_test)
    if result["schema"]["task"] == "classification":
        assert parity["label_mismatches"] == 0
        assert parity["max_probability_difference"] <= PROBABILITY_TOLERANCE
        expected = pipeline.predict_proba(x_test)
        top2 = np.sort(expected, axis=1)[:, -2:]
        ties = (top2[:, 1] - top2[:, 0]) <= TIE_MARGIN
        labels = np.array(answer["predictions"])
        mismatched = (labels != pipeline.predict(x_test).astype(str)) & ~ties
        assert not mismatched.any(), np.flatnonzero(mismatched)
        assert np.abs(np.array(answer["probabilities"]) - expected).max() <= PROBABILITY_TOLERANCE
        # And the card's held-out accuracy is what the served model scores on the test rows.
        assert card["metrics"]["accuracy"] == pytest.approx(float(np.mean(labels == y_test.to_numpy())), abs=1 / len(y_test))
    else:
        values = np.array(answer["predictions"])
        expected = pipeline.predict(x_test)
        assert (np.abs(values - expected) / np.maximum(1.0, np.abs(expected))).max() <= parity["tolerance"]
        assert card["metrics"]["r2"] == pytest.approx(r2_score(y_test, values), abs=1e-3)


# --- metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["breast_cancer", "wine", "digits"])
def test_classification_metrics_and_confusion_matrix_match_the_test_rows(trained, name):
    result = trained[name]
    card = result["card"]
    _, y_test = result["test"]
    classes = result["schema"]["classes"]
    metrics = card["metrics"]
    assert set(metrics) == {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss"}
    assert 0.5 < metrics["roc_auc"] <= 1.0 and metrics["log_loss"] > 0
    confusion = card["confusion_matrix"]
    assert confusion["labels"] == classes and confusion["rows"] == "true class"
    matrix = np.array(confusion["matrix"])
    assert matrix.shape == (len(classes), len(classes))
    assert matrix.sum() == len(y_test)
    counts = y_test.value_counts()
    assert matrix.sum(axis=1).tolist() == [int(counts.get(c, 0)) for c in classes]  # rows: true classes
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["accuracy"])
    for candidate in card["candidates"]:  # every fitted candidate is evaluated the same way
        assert set(candidate["metrics"]) == set(metrics)
        assert np.array(candidate["confusion_matrix"]["matrix"]).sum() == len(y_test)


def test_regression_metrics(trained):
    card = trained["diabetes"]["card"]
    assert set(card["metrics"]) == {"r2", "rmse", "mae"}
    assert 0 < card["metrics"]["mae"] <= card["metrics"]["rmse"]
    assert card["confusion_matrix"] is None


def test_roc_auc_is_null_when_a_class_has_no_test_row(tmp_path):
    rng = np.random.default_rng(5)
    rows = 124
    label = np.array(["a", "b"] * 60 + ["rare"] * 4)  # 4 rows: all of them go to training
    shift = {"a": 0.0, "b": 2.0, "rare": 4.0}
    frame = pd.DataFrame({
        "x1": np.round(rng.normal(0, 1, rows) + [shift[v] for v in label], 3),
        "x2": np.round(rng.normal(0, 1, rows), 3),
        "label": label,
    })
    result = train_upload(LocalStorage(tmp_path / "bucket"), "rare", frame, {"algorithms": "logistic_regression"})
    card = result["card"]
    assert "rare" not in set(result["test"][1]) and card["schema"]["classes"] == ["a", "b", "rare"]
    assert card["metrics"]["roc_auc"] is None
    assert card["metrics"]["log_loss"] > 0  # computed with the model's class list
    matrix = np.array(card["confusion_matrix"]["matrix"])
    assert matrix.shape == (3, 3) and matrix[2].sum() == 0


def test_log_loss_selects_and_compares_versions(tmp_path):
    """log_loss (lower is better) as the spec's metric: it ranks the candidates, and with
    promotion: if_better the current version's ONNX probabilities are scored the same way."""
    storage = LocalStorage(tmp_path / "bucket")
    frame = bundled("breast_cancer")
    metadata = {"metric": "log_loss", "algorithms": "logistic_regression,svm", "promotion": "if_better"}
    first = train_upload(storage, "loss", frame, metadata)
    card = first["card"]
    assert card["metric"] == card["selection"]["metric"] == "log_loss"
    scores = [r["cv_score"] for r in card["selection"]["ranking"]]
    assert scores == sorted(scores) and card["algorithm"] == card["selection"]["ranking"][0]["name"]
    assert 0 < card["metrics"]["log_loss"] < 0.3
    # The same rows again: the same model. Version 1's ONNX probabilities, scored on the new
    # test rows, give the same log_loss (to float32 precision) as the new model's sklearn ones.
    storage.write("datasets/loss/again.csv", frame.to_csv(index=False).encode(), metadata=metadata)
    prepared = handle_finalized(storage, storage.stat("datasets/loss/again.csv").event_data())
    handle_prepared(storage, prepared.data)
    promotion = Registry(storage).card("loss", 2)["promotion"]
    assert promotion["policy"] == "if_better" and promotion["current_version"] == 1
    assert promotion["current_score"] == pytest.approx(promotion["new_score"], abs=1e-5)


# --- large data (the row caps made small, so that it runs in a second) ----------------------


@pytest.mark.parametrize("name", ["iris", "diabetes"])
def test_above_the_svm_row_cap_the_svm_is_linear_or_a_sampled_kernel_by_cross_validation(tmp_path, monkeypatch, name):
    monkeypatch.setattr(candidate_models, "SVM_MAX_ROWS", 50)
    monkeypatch.setattr(candidate_search, "CV_MAX_ROWS", 60)
    monkeypatch.setattr(candidate_search, "SEARCH_SECONDS", 600.0)  # every setting, whatever the machine
    result = train_upload(LocalStorage(tmp_path / "bucket"), "big", bundled(name), {"algorithms": "svm"})
    card = result["card"]
    (svm,) = card["candidates"]
    train_rows = len(result["train"][0])
    assert [t["params"].get("kernel") for t in svm["search"]] == ["linear"] * 3 + ["rbf"]
    linear_rows = {t["rows"] for t in svm["search"][:3]}
    assert len(linear_rows) == 1 and 60 <= linear_rows.pop() <= 63  # the CV sample (every class kept)
    assert 50 <= svm["search"][3]["rows"] <= 53  # the exact kernel: its own sample
    assert card["selection"]["cv_rows"] < train_rows
    if svm["params"]["kernel"] == "linear":
        assert any("linear SVM variant" in n and f"all {train_rows} rows" in n for n in svm["notes"]), svm["notes"]
    else:
        assert any("exact RBF kernel SVM" in n for n in svm["notes"]), svm["notes"]
    assert card["parity"]["passed"] is True

    # Whichever won, the linear variant exports and passes the parity gate too.
    schema, (x_train, y_train), (x_test, _) = result["schema"], result["train"], result["test"]
    factory, scale = candidate_models.estimators(schema["task"])["svm"]
    pipeline = Pipeline([("prepare", candidate_models.preprocessor(schema["columns"], scale)), ("model", factory(kernel="linear"))])
    pipeline.fit(x_train, y_train)
    report = export_parity(pipeline, schema, x_test)
    assert report["passed"] is True


def export_parity(pipeline, schema, x_test) -> dict:
    onnx_bytes, inputs = to_onnx(pipeline, schema)
    return check_parity(onnx_bytes, pipeline, dict(schema, columns=served_columns(schema["columns"], inputs)), x_test)


# --- the held-out split never picks ----------------------------------------------------------


def test_held_out_labels_do_not_change_the_choice(trained):
    result = trained["breast_cancer"]
    schema, train, (x_test, y_test) = result["schema"], result["train"], result["test"]
    spec = dict(schema["spec"], algorithms=["logistic_regression", "svm"])
    first = CandidateSearch.for_spec(schema, spec).fit(*train).evaluate(x_test, y_test)
    flipped = y_test.map({"0": "1", "1": "0"})  # every held-out label wrong
    second = CandidateSearch.for_spec(schema, spec).fit(*train).evaluate(x_test, flipped)
    assert [(c.name, c.params, c.cv_score) for c in first.results_] == [(c.name, c.params, c.cv_score) for c in second.results_]
    assert first.best_.metrics["accuracy"] + second.best_.metrics["accuracy"] == pytest.approx(1.0)


def test_settings_that_build_the_same_models_are_not_fitted_twice(trained, monkeypatch):
    """On small data a forest's trees stay shallower than max_depth=12 and boosting's trees
    have at most 15 leaves: those settings are recorded as the same as the unlimited ones.
    Checked here by fitting both on the same cross-validation folds: identical predictions."""
    monkeypatch.setattr(candidate_search, "SEARCH_SECONDS", 600.0)  # every setting of both candidates
    result = trained["breast_cancer"]
    schema, (x_train, y_train), test = result["schema"], result["train"], result["test"]
    x_train, y_train = x_train.iloc[:300], y_train.iloc[:300]  # 240 rows per fold: at most 12 leaves
    spec = dict(schema["spec"], algorithms=["random_forest", "gradient_boosting"])
    search = CandidateSearch.for_spec(schema, spec).fit(x_train, y_train).evaluate(*test)
    by_name = {c.name: [t.summary() for t in c.trials] for c in search.results_ if c.name != "ensemble"}
    splits = search._rows.for_cap(None).splits
    factories = candidate_models.estimators("classification")
    for name, limited, unlimited in (
        ("random_forest", {"max_depth": 12, "min_samples_leaf": 3}, {"max_depth": None, "min_samples_leaf": 3}),
        ("gradient_boosting", {"learning_rate": 0.1, "max_leaf_nodes": 15}, {"learning_rate": 0.1, "max_leaf_nodes": 31}),
    ):
        trial = next(t for t in by_name[name] if t["params"] == limited)
        assert trial["same_as"] == unlimited and trial["seconds"] == 0
        assert trial["fold_scores"] == next(t for t in by_name[name] if t["params"] == unlimited)["fold_scores"]
        factory, scale = factories[name]
        for fit_rows, validation_rows in splits:
            models = [
                Pipeline([
                    ("prepare", candidate_models.preprocessor(schema["columns"], scale, dense=name in candidate_models.DENSE_INPUT)),
                    ("model", factory(**params)),
                ]).fit(x_train.iloc[fit_rows], y_train.iloc[fit_rows])
                for params in (limited, unlimited)
            ]
            assert candidate_models.tree_size(name, models[1][-1]) <= (11 if name == "random_forest" else 15)
            x_validation = x_train.iloc[validation_rows]
            assert np.array_equal(models[0].predict_proba(x_validation), models[1].predict_proba(x_validation))


# --- a converter disagreement ----------------------------------------------------------------


def perturbed(onnx_bytes: bytes) -> bytes:
    """The same model with its learned weights scaled by 1.25 (linear coefficients, SVM dual
    coefficients, tree leaf values): it no longer computes what sklearn computes."""
    model = onnx.load_from_string(onnx_bytes)
    changed = 0
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name in ("coefficients", "class_weights", "target_weights") and attribute.floats:
                values = [v * 1.25 for v in attribute.floats]
                del attribute.floats[:]
                attribute.floats.extend(values)
                changed += 1
    assert changed, "nothing to perturb"
    return model.SerializeToString()


def test_converter_disagreement_refuses_the_best_candidate_and_takes_the_next(tmp_path, monkeypatch):
    # FAULT INJECTION: skl2onnx converts these models faithfully, so a disagreement cannot be
    # produced with real data. The first export asked for (the best candidate by
    # cross-validation) is replaced by a copy with perturbed weights.
    real = trainer.to_onnx
    calls = []

    def faulty_to_onnx(pipeline, schema):
        onnx_bytes, inputs = real(pipeline, schema)
        calls.append(pipeline)
        return (perturbed(onnx_bytes) if len(calls) == 1 else onnx_bytes), inputs

    monkeypatch.setattr(trainer, "to_onnx", faulty_to_onnx)
    frame = bundled("breast_cancer")
    result = train_upload(LocalStorage(tmp_path / "bucket"), "fault", frame, {"algorithms": "logistic_regression,svm"})
    card = result["card"]
    ranking = [r["name"] for r in card["selection"]["ranking"]]
    assert len(calls) == 2 and len(ranking) == 2
    refused = ranking[0]
    assert card["algorithm"] == ranking[1] != refused
    assert len(card["candidate_failures"]) == 1
    assert card["candidate_failures"][0].startswith(f"{refused}: ONNX disagrees with sklearn")
    assert card["parity"]["passed"] is True
    assert result["chosen"].name == ranking[1]
    # The version serves the next candidate, and it agrees with its sklearn pipeline.
    x_test = result["test"][0]
    answer = onnx_answer(result["storage"], "fault", x_test)
    expected = result["chosen"].pipeline.predict_proba(x_test)
    assert np.abs(np.array(answer["probabilities"]) - expected).max() <= PROBABILITY_TOLERANCE


# --- the budget --------------------------------------------------------------------------------


def test_tiny_budget_stops_the_search_and_still_yields_a_version(tmp_path):
    frame = bundled("wine")
    result = train_upload(LocalStorage(tmp_path / "bucket"), "hurry", frame,
                          {"algorithms": "logistic_regression,svm", "max_training_seconds": "0.01"})
    card = result["card"]
    assert result["reply"].data["version"] == 1
    selection = card["selection"]
    assert selection["search_stopped"] and "max_training_seconds=0.01" in selection["search_stopped"]
    assert selection["settings_tried"] < len(candidate_models.search_space("logistic_regression", 0)) + len(candidate_models.search_space("svm", 0))
    # The first candidate always runs, with at least its first (default) setting.
    first = next(c for c in card["candidates"] if c["name"] == "logistic_regression")
    assert first["params"] == {"C": 1.0} and first["search"][0]["cv_score"] is not None
    assert first["untried"] and first["search_stopped"] == selection["search_stopped"]
    assert [s["name"] for s in card["skipped"]] == ["svm"]
    assert card["parity"]["passed"] is True


def one_second_fits(monkeypatch) -> list[float]:
    """A fake clock on which every fit (fold or refit) takes one second."""
    now = [0.0]
    real_fit = candidate_search.fit_model

    def one_second_fit(*args):
        now[0] += 1.0
        return real_fit(*args)

    monkeypatch.setattr(candidate_search, "fit_model", one_second_fit)
    return now


def iris_halves():
    frame = bundled("iris")
    x = frame.drop(columns="target").astype("float32")
    y = frame["target"].astype(str)
    schema = {"task": "classification", "columns": [{"name": c, "type": "number"} for c in x.columns]}
    return schema, (x.iloc[::2], y.iloc[::2]), (x.iloc[1::2], y.iloc[1::2])


def test_budget_stops_mid_search_with_the_best_setting_so_far(monkeypatch):
    """On a fake clock where every fit takes one second: 75 training rows are cross-validated
    by 5 folds twice, so a setting takes 10 s and refitting is estimated at 1.25 s; with 24 s
    the second setting fits the budget and a third does not. The candidate keeps the best of
    the two it tried."""
    now = one_second_fits(monkeypatch)
    monkeypatch.setattr(candidate_search, "SEARCH_SECONDS", 600.0)  # only max_training_seconds limits
    schema, train, test = iris_halves()
    spec = {"algorithms": ["logistic_regression"], "max_training_seconds": 24}
    search = CandidateSearch.for_spec(schema, spec, clock=lambda: now[0])
    search.fit(*train).evaluate(*test)
    (candidate,) = search.results_
    settings = candidate_models.search_space("logistic_regression", len(train[0]))
    assert [t.params for t in candidate.trials] == settings[:2]
    assert candidate.untried == settings[2:]
    assert "max_training_seconds=24" in candidate.search_stopped
    assert search.summary_["search_stopped"] == candidate.search_stopped
    assert search.summary_["settings_tried"] == 2 and search.summary_["settings_planned"] == 3
    best = max(candidate.trials, key=lambda t: t.rank_score("accuracy"))  # on a tie the earlier one
    assert candidate.params == best.params and candidate.cv_score == best.score
    assert now[0] == 21.0  # 2 settings x 10 fits + the refit


def test_the_search_budget_grows_with_the_rows(monkeypatch):
    """With the spec's default max_training_seconds, the other settings get SEARCH_SECONDS plus
    one second per SEARCH_ROWS_PER_SECOND training rows: a small dataset is served in seconds,
    a larger one is searched longer. Every candidate is still screened."""
    now = one_second_fits(monkeypatch)
    schema, train, test = iris_halves()
    spec = {"algorithms": ["logistic_regression", "random_forest"]}
    for seconds, tried in ((5.0, 2), (45.0, 4)):
        monkeypatch.setattr(candidate_search, "SEARCH_SECONDS", seconds)
        now[0] = 0.0
        search = CandidateSearch.for_spec(schema, spec, clock=lambda: now[0]).fit(*train).evaluate(*test)
        summary = search.summary_
        budget = seconds + len(train[0]) / candidate_search.SEARCH_ROWS_PER_SECOND
        assert summary["search_budget_seconds"] == pytest.approx(budget, abs=1e-3)
        # The screen (10 fits each) always runs; other settings only within the search budget.
        assert summary["settings_tried"] == tried, summary
        assert f"the search budget for {len(train[0])} training rows" in summary["search_stopped"]
