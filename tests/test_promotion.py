"""`promotion: if_better` that bad data cannot fool, through the real steps in process.

Upload -> preprocess -> train with a folder bucket (LocalStorage): the current and the new
version are scored on the current version's held-out rows as well as on the new upload's, and
the new version must beat the trivial baseline on its own rows. Data is generated with sklearn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from bucketml.contracts import events
from bucketml.registry.model_registry import Registry
from bucketml.steps.preprocess import handle_finalized
from bucketml.steps.train import handle_prepared
from bucketml.storage import LocalStorage
from sklearn.datasets import make_classification, make_regression

IF_BETTER = {"promotion": "if_better", "algorithms": "logistic_regression", "target": "target"}


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "bucket")


def train_upload(storage, model: str, frame: pd.DataFrame, metadata: dict[str, str], filename: str = "data.csv"):
    """Upload, preprocess and train; (the events train announced, the new version's card)."""
    info = storage.write(f"datasets/{model}/{filename}", frame.to_csv(index=False).encode(), content_type="text/csv",
                         metadata=metadata)
    prepared = handle_finalized(storage, info.event_data())
    assert prepared is not None and prepared["type"] == events.DATASET_PREPARED, prepared and prepared.data
    announced = handle_prepared(storage, prepared.data)
    assert announced[0]["type"] == events.MODEL_TRAINED, announced[0].data
    version = announced[0].data["version"]
    return announced, Registry(storage).card(model, version)


def classification_frame(rows: int = 1600, seed: int = 0) -> pd.DataFrame:
    x, y = make_classification(n_samples=rows, n_features=6, n_informative=4, n_redundant=0, class_sep=1.5,
                               random_state=seed)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    return frame.assign(target=np.where(y == 1, "yes", "no"))


def regression_frame(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    x, y = make_regression(n_samples=rows, n_features=5, n_informative=4, noise=10.0, random_state=seed)
    return pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])]).assign(target=y)


def shuffled(frame: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """The same rows with the target column permuted: labels that no longer belong to them."""
    target = frame["target"].to_numpy().copy()
    np.random.default_rng(seed).shuffle(target)
    return frame.assign(target=target)


def test_same_rows_with_shuffled_labels_are_not_promoted(storage):
    model = "shuffle"
    frame = classification_frame()
    announced, first = train_upload(storage, model, frame, IF_BETTER)
    assert announced[-1]["type"] == events.MODEL_PUBLISHED and first["promotion"]["promoted"] is True

    announced, card = train_upload(storage, model, shuffled(frame), IF_BETTER)
    assert [e["type"] for e in announced] == [events.MODEL_TRAINED]
    assert announced[0].data["version"] == 2 and announced[0].data["current_version"] == 1
    assert Registry(storage).current(model).version == 1
    promotion = card["promotion"]
    assert promotion["promoted"] is False and promotion["current_version"] == 1
    assert "version 1's test rows" in promotion["reason"], promotion["reason"]
    # The numbers behind the refusal are on the card.
    assert promotion["current_rows"] == first["lineage"]["prepared"] + "test.csv"
    assert promotion["current_rows_score_current"] > 0.85
    assert promotion["current_rows_score_new"] < promotion["current_rows_score_current"] - promotion["tolerance"]
    assert promotion["tolerance"] == 0.02 and promotion["tolerance_kind"] == "absolute"
    # On its own (shuffled) rows the new version is about as good as guessing the majority class.
    assert promotion["new_score"] < promotion["baseline_score"] + 0.1
    # model.trained says why the pointer did not move.
    assert announced[0].data["promotion"] == {"promoted": False, "reason": promotion["reason"]}


def test_an_honest_new_sample_of_the_same_population_is_promoted(storage):
    model = "honest"
    population = classification_frame(rows=8000, seed=5)
    order = np.random.default_rng(2).permutation(len(population))
    first_half, second_half = population.iloc[order[:4000]], population.iloc[order[4000:]]
    train_upload(storage, model, first_half, IF_BETTER)

    announced, card = train_upload(storage, model, second_half, IF_BETTER)
    assert [e["type"] for e in announced] == [events.MODEL_TRAINED, events.MODEL_PUBLISHED]
    assert Registry(storage).current(model).version == 2
    promotion = card["promotion"]
    assert promotion["promoted"] is True, promotion["reason"]
    assert "within the tolerance" in promotion["reason"]
    assert abs(promotion["current_rows_score_new"] - promotion["current_rows_score_current"]) <= 0.02
    assert promotion["new_score"] > promotion["baseline_score"] + 0.2
    assert announced[0].data["promotion"] == {"promoted": True, "reason": promotion["reason"]}
    assert "promotion" not in announced[1].data  # model.published keeps its catalog fields


def test_regression_with_shuffled_targets_is_not_promoted(storage):
    model = "reg"
    metadata = dict(IF_BETTER, algorithms="ridge", metric="rmse")
    frame = regression_frame()
    train_upload(storage, model, frame, metadata)
    announced, card = train_upload(storage, model, shuffled(frame), metadata)
    assert [e["type"] for e in announced] == [events.MODEL_TRAINED]
    assert Registry(storage).current(model).version == 1
    promotion = card["promotion"]
    assert promotion["promoted"] is False and promotion["metric"] == "rmse"
    assert promotion["tolerance"] == 0.05 and promotion["tolerance_kind"] == "relative"
    assert promotion["current_rows_score_new"] > promotion["current_rows_score_current"] * 1.05
    assert "version 1's test rows" in promotion["reason"], promotion["reason"]


def test_current_rows_gone_falls_back_to_the_new_rows_and_says_so(storage):
    model = "gone"
    population = classification_frame(rows=1600, seed=9)
    _, first = train_upload(storage, model, population.iloc[:800], IF_BETTER)
    storage.delete(first["lineage"]["prepared"] + "test.csv")
    _, card = train_upload(storage, model, population.iloc[800:], IF_BETTER)
    promotion = card["promotion"]
    assert "version 1's test rows could not be used" in promotion["reason"]
    assert "compared on the new test rows only" in promotion["reason"]
    assert promotion["current_rows_score_new"] is None and promotion["baseline_score"] is not None
    # Today's rule decides: strictly better on the new rows (and better than the baseline).
    assert promotion["promoted"] is (promotion["new_score"] > promotion["current_score"])


CANARY = {"promotion": "canary", "canary_percent": "25", "algorithms": "logistic_regression", "target": "target"}


def test_promotion_canary_starts_a_retrain_as_the_canary_once_whatever_the_deliveries(storage):
    first, card = train_upload(storage, "m", classification_frame(seed=1), CANARY, "1.csv")
    assert [e["type"] for e in first] == [events.MODEL_TRAINED, events.MODEL_PUBLISHED]  # the first version: served at once
    assert card["promotion"]["reason"] == "no current version: the first version is served at once"

    info = storage.write("datasets/m/2.csv", classification_frame(seed=2).to_csv(index=False).encode(),
                         content_type="text/csv", metadata=CANARY)
    prepared = handle_finalized(storage, info.event_data())
    announced = handle_prepared(storage, prepared.data)
    assert [e["type"] for e in announced] == [events.MODEL_TRAINED, events.ROLLOUT_STARTED]
    pointer = Registry(storage).current("m")
    assert pointer.version == 1 and pointer.data["canary"]["version"] == 2 and pointer.data["canary"]["percent"] == 25
    started = announced[1].data
    assert (started["version"], started["current_version"], started["figures"]["percent"]) == (2, 1, 25)
    promotion = Registry(storage).card("m", 2)["promotion"]
    assert promotion["promoted"] is False and promotion["canary_percent"] == 25
    assert "canary of version 1 for 25%" in promotion["reason"]

    # A redelivery announces the same events (same ids) and starts nothing twice.
    again = handle_prepared(storage, prepared.data)
    assert [(e["type"], e["id"]) for e in again] == [(e["type"], e["id"]) for e in announced]
    assert Registry(storage).current("m").generation == pointer.generation
