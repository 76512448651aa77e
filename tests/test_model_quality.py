"""What the selection does for a user's own data (docs/architecture.md, "Selection"): an
imbalanced target is chosen by balanced accuracy and served at its tuned decision threshold, an
ensemble is exported whole and served as scikit-learn computes it, a skewed price is fitted on
a log scale and answered in its own units, a hopeless candidate is dropped early.

Data is generated here; preprocess and train run in-process on a folder bucket, and the served
answers come from a real predict process (functions-framework), as a client would get them.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, mean_absolute_error, r2_score

from bucketml.registry.model_registry import Registry
from bucketml.storage.local import LocalStorage
from bucketml.training import out_of_fold
from bucketml.training.export import check_parity, served_columns, to_onnx
from bucketml.training.search import CandidateSearch
from helpers import predict_server, publish


def records_of(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def rare_churn(rows: int, seed: int) -> pd.DataFrame:
    """About one row in eight churns; the label depends on numbers and a category, with noise."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "tenure": rng.integers(1, 72, rows).astype(float),
        "monthly": rng.normal(70, 20, rows).round(2),
        "plan": rng.choice(["basic", "plus", "pro"], rows),
    })
    score = (frame["monthly"] - 70) / 20 - frame["tenure"] / 24 + (frame["plan"] == "basic") * 0.8
    frame["churned"] = np.where(score + rng.normal(0, 0.9, rows) > 1.3, "yes", "no")
    return frame


def wave(rows: int, seed: int) -> pd.DataFrame:
    """A linear part that trees approximate in steps and a wave that a linear model cannot
    follow: no single candidate is best at both, their average is better than either."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.uniform(-3, 3, rows)
    group = rng.choice(["a", "b", "c"], rows)
    y = 3 * x1 + 2 * np.sin(2 * x2) + (group == "a") * 1.5 + rng.normal(0, 0.8, rows)
    return pd.DataFrame({"x1": x1.round(4), "x2": x2.round(4), "group": group, "target": y.round(4)})


def prices(rows: int, seed: int) -> pd.DataFrame:
    """Prices spread over two orders of magnitude: multiplicative effects, like real prices."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(30, 200, rows).round(1)
    rooms = rng.integers(1, 7, rows)
    area = rng.choice(["centre", "suburb", "village"], rows, p=[0.2, 0.5, 0.3])
    log_price = 10 + 0.012 * size + 0.08 * rooms + np.select([area == "centre", area == "suburb"], [0.6, 0.2], 0.0)
    price = np.exp(log_price + rng.normal(0, 0.35, rows)).round(0)
    return pd.DataFrame({"size": size, "rooms": rooms, "area": area, "price": price})


def served_answer(tmp_path, model: str, rows: pd.DataFrame) -> dict:
    """What a real predict process over the test's bucket answers for `rows`, sent as they are
    (the target column included)."""
    with predict_server(tmp_path / "bucket", tmp_path) as server:
        response = server.predict({"model": model, "records": records_of(rows)})
    assert response.status_code == 200, response.text
    return response.json()


def current_card(storage, model: str) -> dict:
    registry = Registry(storage)
    return registry.card(model, registry.current(model).version)


def chosen_candidate(card: dict) -> dict:
    return next(c for c in card["candidates"] if c["name"] == card["algorithm"])


# --- an imbalanced binary target ----------------------------------------------------------------


def test_imbalanced_binary_target_is_served_at_its_tuned_threshold(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    frame = rare_churn(1200, seed=4)
    train, held_out = frame.iloc[:1000], frame.iloc[1000:]
    # Gradient boosting alone: its probabilities of the rare class run low, so the threshold
    # that balances the two classes' recall is well below 0.5.
    publish(storage, "churn", train, "data.csv", {"target": "churned", "algorithms": "gradient_boosting"})
    card = current_card(storage, "churn")
    assert card["metric"] == "balanced_accuracy"
    imbalance = card["selection"]["imbalance"]
    assert imbalance["imbalanced"] is True and imbalance["largest_to_smallest"] >= 3
    threshold = chosen_candidate(card)["threshold"]
    assert 0.0 < threshold < 0.5
    assert any(note.startswith("decision threshold") for note in chosen_candidate(card)["notes"])

    answer = served_answer(tmp_path, "churn", held_out)
    classes, labels = answer["classes"], np.array(answer["predictions"])
    positive = np.array(answer["probabilities"])[:, classes.index("yes")]
    assert classes == ["no", "yes"]
    # Every served label is the tuned threshold's, not the most probable class's ...
    assert np.array_equal(labels == "yes", positive >= threshold)
    moved = (positive >= threshold) & (positive < 0.5)
    assert moved.sum() >= 5, "the threshold changed no served answer"
    # ... and it serves the metric it was tuned for: the rare class is found far more often.
    truth = held_out["churned"].to_numpy()
    at_half = np.where(positive >= 0.5, "yes", "no")
    assert balanced_accuracy_score(truth, labels) > balanced_accuracy_score(truth, at_half)


def three_plans(rows: int, seed: int) -> pd.DataFrame:
    """Three classes in shares of about 75, 18 and 7 %, overlapping in two numbers."""
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "plus", "pro"], rows, p=[0.75, 0.18, 0.07])
    centre = pd.Series(plan).map({"basic": 0.0, "plus": 1.2, "pro": 2.2}).to_numpy()
    return pd.DataFrame({"usage": (centre + rng.normal(0, 0.9, rows)).round(3),
                         "seats": (centre + rng.normal(0, 1.2, rows)).round(3), "plan": plan})


def test_imbalanced_classes_are_answered_by_weighted_probabilities(tmp_path):
    """More than two classes: the answer is the class whose probability divided by its share of
    the training rows is largest, when that scores better out of fold; served so."""
    storage = LocalStorage(tmp_path / "bucket")
    frame = three_plans(1300, seed=2)
    train, held_out = frame.iloc[:1100], frame.iloc[1100:]
    publish(storage, "plans", train, "data.csv", {"target": "plan", "algorithms": "gradient_boosting"})
    card = current_card(storage, "plans")
    assert card["metric"] == "balanced_accuracy"
    weights = chosen_candidate(card)["class_weights"]
    assert list(weights) == ["basic", "plus", "pro"] and weights["basic"] < weights["plus"] < weights["pro"]

    answer = served_answer(tmp_path, "plans", held_out)
    probabilities = np.array(answer["probabilities"])
    classes = np.array(answer["classes"])
    weighted = classes[np.argmax(probabilities * np.array([weights[c] for c in classes]), axis=1)]
    assert list(answer["predictions"]) == list(weighted)
    most_probable = classes[np.argmax(probabilities, axis=1)]
    assert (weighted != most_probable).sum() >= 5, "the weights changed no served answer"
    truth = held_out["plan"].to_numpy()
    assert balanced_accuracy_score(truth, weighted) > balanced_accuracy_score(truth, most_probable)


def test_the_spec_metric_wins_and_accuracy_is_not_tuned(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    publish(storage, "churn", rare_churn(600, seed=5), "data.csv",
            {"target": "churned", "algorithms": "gradient_boosting,logistic_regression", "metric": "accuracy"})
    card = current_card(storage, "churn")
    assert card["metric"] == "accuracy" and card["selection"]["metric_origin"] == "spec"
    assert all("threshold" not in c for c in card["candidates"])
    assert not any(n.startswith("class_weight") for c in card["candidates"] for n in c["notes"])


# --- an ensemble ------------------------------------------------------------------------------


def test_an_ensemble_that_ranks_first_is_exported_whole_and_served_as_fitted(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    frame = wave(700, seed=0)
    train, held_out = frame.iloc[:600], frame.iloc[600:]
    publish(storage, "wave", train, "data.csv")
    card = current_card(storage, "wave")
    ensemble = card["selection"]["ensemble"]
    assert card["algorithm"] == "ensemble" and ensemble["chosen"] is True
    members = chosen_candidate(card)["members"]
    assert len(members) >= 2 and members == ensemble["weights"]
    singles = {c["name"]: c for c in card["candidates"] if c["name"] != "ensemble"}
    assert set(members) <= set(singles)
    # Chosen out of fold: ranked above the best single candidate there.
    assert ensemble["rank_score"] > ensemble["best_single"]["rank_score"]
    assert card["parity"]["passed"] is True

    served = np.array(served_answer(tmp_path, "wave", held_out)["predictions"], dtype=float)
    # Served, it is at least as good on rows it never saw as its best member (within 0.02).
    truth = held_out["target"].to_numpy()
    assert r2_score(truth, served) > 0.8
    assert r2_score(truth, served) >= max(singles[m]["metrics"]["r2"] for m in members) - 0.02


def test_a_classification_ensemble_passes_the_parity_gate_with_soft_voting():
    frame = wave(600, seed=2)
    y = pd.Series(np.where(frame["target"] > frame["target"].median(), "high", "low"))
    x = frame[["x1", "x2", "group"]].astype({"x1": "float32", "x2": "float32", "group": object})
    schema = {"task": "classification", "columns": [
        {"name": "x1", "type": "number"}, {"name": "x2", "type": "number"}, {"name": "group", "type": "string"}]}
    search = CandidateSearch.for_spec(schema, {}).fit(x.iloc[:500], y.iloc[:500]).evaluate(x.iloc[500:], y.iloc[500:])
    assert search.best_.name == "ensemble", search.ensemble_
    ensemble = search.best_
    assert len(ensemble.members) >= 2 and ensemble.pipeline.voting == "soft"
    onnx_bytes, inputs = to_onnx(ensemble.pipeline, schema)
    served = dict(schema, columns=served_columns(schema["columns"], inputs))
    report = check_parity(onnx_bytes, ensemble.pipeline, served, x.iloc[500:])
    assert report["passed"] and report["label_mismatches"] == 0


# --- a skewed price ----------------------------------------------------------------------------


def test_a_skewed_price_is_fitted_on_a_log_scale_and_answered_in_its_units(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    frame = prices(900, seed=0)
    train, held_out = frame.iloc[:750], frame.iloc[750:]
    publish(storage, "houses", train, "data.csv", {"target": "price", "algorithms": "ridge,gradient_boosting"})
    card = current_card(storage, "houses")
    assert card["selection"]["target_scales"]["tried"] == ["raw", "log"]
    ridge = next(c for c in card["candidates"] if c["name"] == "ridge")
    # A linear model of a multiplicative price: cross-validation prefers the log scale by far.
    assert ridge["target_scale"] == "log"
    assert any(n.startswith("fitted on a log scale") for n in ridge["notes"])
    by_scale = {t.get("target_scale", "raw"): t["cv_score"] for t in ridge["search"] if t["params"] == {"alpha": 1.0}}
    assert by_scale["log"] > by_scale["raw"]
    assert card["parity"]["passed"] is True

    served = np.array(served_answer(tmp_path, "houses", held_out)["predictions"], dtype=float)
    truth = held_out["price"].to_numpy()
    assert (served > 0).all() and 0.5 < np.median(served) / np.median(truth) < 2  # in the price's own units
    assert r2_score(truth, served) > 0.6


def test_a_target_that_is_not_skewed_stays_on_its_own_scale(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    publish(storage, "sugar", load_diabetes(as_frame=True).frame, "data.csv", {"algorithms": "ridge"})
    card = current_card(storage, "sugar")
    assert card["selection"]["target_scales"]["tried"] == ["raw"]
    assert "target_scale" not in card["candidates"][0]


# --- early dropping ----------------------------------------------------------------------------


def test_a_hopeless_candidate_is_dropped_after_two_folds(tmp_path):
    """An RBF SVR on an unscaled target of this range barely beats the mean (R² near 0) where
    ridge explains half the variance: it is not cross-validated to the end."""
    storage = LocalStorage(tmp_path / "bucket")
    publish(storage, "sugar", load_diabetes(as_frame=True).frame, "data.csv", {"algorithms": "ridge,svm"})
    card = current_card(storage, "sugar")
    assert [c["name"] for c in card["candidates"]] == ["ridge"]
    (dropped,) = card["skipped"]
    assert dropped["name"] == "svm" and dropped["reason"].startswith("dropped after 2 of 5 folds: r2")
    assert "for ridge on the same folds" in dropped["reason"]


# --- the fast fold metrics ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_fold_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    classes = np.array(["a", "b", "c"])[: 2 + seed % 2]
    y = rng.choice(classes, 40)
    predicted = rng.choice(classes[:-1] if seed == 4 else classes, 40)  # seed 4: a class never predicted
    assert out_of_fold.label_score("accuracy", y, predicted) == pytest.approx(accuracy_score(y, predicted))
    assert out_of_fold.label_score("balanced_accuracy", y, predicted) == pytest.approx(balanced_accuracy_score(y, predicted))
    assert out_of_fold.label_score("f1_macro", y, predicted) == pytest.approx(f1_score(y, predicted, average="macro"))
    truth, values = rng.normal(size=30), rng.normal(size=30)
    assert out_of_fold.regression_score("r2", truth, values) == pytest.approx(r2_score(truth, values))
    assert out_of_fold.regression_score("mae", truth, values) == pytest.approx(mean_absolute_error(truth, values))
    probability = rng.random(50)
    positive = rng.random(50) < 0.3
    thresholds = np.array([0.2, 0.5, 0.8])
    for metric, reference in (("balanced_accuracy", balanced_accuracy_score),
                              ("f1_macro", lambda t, p: f1_score(t, p, average="macro"))):
        scores = out_of_fold.binary_threshold_scores(metric, positive, probability, thresholds)
        expected = [reference(positive, probability >= t) for t in thresholds]
        assert scores == pytest.approx(expected)


def test_a_model_answering_one_class_everywhere_is_recognised():
    splits = [(np.arange(5, 10), np.arange(0, 5)), (np.arange(0, 5), np.arange(5, 10))]
    positive = np.linspace(0.1, 0.3, 10)  # never the more probable class
    oof = out_of_fold.OutOfFold(np.stack([1 - positive, positive], axis=1)[None], splits)
    assert out_of_fold.single_class(oof, ["no", "yes"])
    assert not out_of_fold.single_class(oof, ["no", "yes"], threshold=0.2)
