"""The figures behind the monitor's decisions: reference bins from training rows, counts of served
values in the same bins, the population stability index, a replica's file and the canary rules."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from bucketml.monitoring.aggregates import QUEUE_ROWS_LIMIT, ReplicaFigures, new_replica_id, replica_name
from bucketml.monitoring.decisions import decide_canary, drift, merge
from bucketml.monitoring.reference import Reference, category_bins, number_bins, psi
from bucketml.registry.model_registry import Registry
from bucketml.steps import monitor
from bucketml.storage import LocalStorage
from bucketml.training.reference import build_reference
from helpers import churn_frame, publish


def test_number_bins_cut_at_deciles_and_count_missing_values_apart():
    values = np.arange(1000, dtype=float)
    bins = number_bins("x", np.append(values, [np.nan] * 10))
    assert len(bins.edges) == 9 and bins.size == 11
    assert bins.shares[-1] == pytest.approx(10 / 1010, abs=1e-6)  # the missing bin
    assert sum(bins.shares[:-1]) == pytest.approx(1000 / 1010, abs=1e-5)
    counts = bins.counts([None, -5.0, 5000.0, 500.0])
    assert counts[-1] == 1 and counts[0] == 1 and counts[-2] == 1 and counts.sum() == 4


def test_category_bins_keep_the_frequent_ones_and_count_the_rest_as_other():
    values = ["a"] * 50 + ["b"] * 30 + [f"rare{i}" for i in range(40)] + [None, ""]
    bins = category_bins("c", values)
    assert bins.categories[:2] == ["a", "b"] and len(bins.categories) == 20
    assert bins.counts(["a", "never seen", None, True]).tolist()[-2:] == [2, 1]  # other, missing
    assert category_bins("flag", [True, False, True]).counts(["true", False]).tolist()[:2] == [1, 1]


def test_psi_is_zero_for_the_same_spread_and_large_for_a_shift():
    bins = number_bins("x", np.random.default_rng(0).normal(70, 20, 5000))
    same = bins.counts(np.random.default_rng(1).normal(70, 20, 5000))
    shifted = bins.counts(np.random.default_rng(2).normal(570, 20, 5000))
    assert psi(bins.shares, same) < 0.02
    assert psi(bins.shares, shifted) > 5
    assert psi(bins.shares, np.zeros(bins.size)) is None


def test_the_reference_of_a_training_frame_round_trips_through_json():
    frame = pd.DataFrame({"n": [1.0, 2.0, None, 4.0] * 25, "s": ["x", "y", "x", ""] * 25,
                          "d": ["2024-01-01"] * 100, "label": ["a", "b", "a", "a"] * 25})
    schema = {"task": "classification", "target": "label",
              "columns": [{"name": "n", "type": "number"}, {"name": "s", "type": "string"},
                          {"name": "d", "type": "datetime"}]}
    reference = build_reference(schema, frame[["n", "s", "d"]], frame["label"])
    assert [b.name for b in reference.features] == ["n", "s"]  # no reference for datetime columns
    assert reference.target.categories == ["a", "b"] and reference.target.shares[:2] == [0.75, 0.25]
    again = Reference.from_dict(json.loads(json.dumps(reference.to_dict())))
    assert again == reference
    with pytest.raises(ValueError):
        Reference.from_dict(dict(reference.to_dict(), target=dict(reference.target.to_dict(), shares=[1.0])))


def _reference() -> Reference:
    rng = np.random.default_rng(0)
    return Reference(1000, [number_bins("x", rng.normal(0, 1, 1000))], category_bins("label", ["a", "b"] * 500))


def test_a_replica_file_holds_its_counts_per_version_and_pointer_generation(tmp_path):
    storage = LocalStorage(tmp_path)
    figures = ReplicaFigures(storage, flush_seconds=60, window_seconds=600, replica="r1")
    reference = _reference()
    for _ in range(3):
        figures.answered("m", 2, 7, "classification", reference, 200, 0.004)
    figures.answered("m", 2, 7, "classification", reference, 500, 0.2)
    figures.scored("m", 2, 7, "classification", reference, lambda: {"x": [0.1, None, 9.0]}, ["a", "b", "a"], 3)
    figures.compared("m", 2, 7, "classification", reference, ["a", "b", "a"], ["a", "a", "a"])
    figures.flush()
    data = json.loads(storage.read(replica_name("m", 2, "r1")))
    assert (data["requests"], data["errors"], data["epoch"]) == (4, 1, 7)
    assert sum(data["latency_ms"]["counts"]) == 4
    assert data["predictions"][:2] == [2, 1] and data["window"]["rows"] == 3
    assert sum(data["window"]["features"]["x"]) == 3 and data["window"]["features"]["x"][-1] == 1  # one missing
    assert data["compared"]["rows"] == 3 and data["compared"]["agreeing"] == 2
    # A moved pointer starts the figures afresh; a late item of the old generation never mixes in.
    figures.answered("m", 2, 8, "classification", reference, 200, 0.004)
    figures.answered("m", 2, 7, "classification", reference, 200, 0.004)
    figures.flush()
    data = json.loads(storage.read(replica_name("m", 2, "r1")))
    assert (data["requests"], data["epoch"]) == (1, 8)


def _totals(requests: int, errors: int = 0, millis: float = 4.0, agreeing: float = 1.0, labels=(0.5, 0.5)):
    latency = [0] * 21
    latency[3] = requests  # the 5 ms bucket
    if millis > 5:
        latency = [0] * 21
        latency[7] = requests  # the 20 ms bucket
    rows = requests
    return merge([{"requests": requests, "errors": errors, "latency_ms": {"counts": latency},
                   "predictions": [int(rows * labels[0]), int(rows * labels[1]), 0, 0],
                   "compared": {"rows": rows, "agreeing": int(rows * agreeing)}}])


def test_a_canary_waits_for_its_requests_then_is_held_to_the_stable_version():
    stable = _totals(1000)
    assert decide_canary(stable, _totals(100), "classification", 200).step == "wait"
    assert decide_canary(stable, _totals(300), "classification", 200).step == "promote"
    errors = decide_canary(stable, _totals(300, errors=30), "classification", 200)
    assert errors.step == "roll_back" and "5xx share 10.00%" in errors.reasons[0]
    slow = decide_canary(stable, _totals(300, millis=20), "classification", 200)
    assert slow.step == "roll_back" and "p99 latency 20 ms" in slow.reasons[0]
    disagreeing = decide_canary(stable, _totals(300, agreeing=0.55), "classification", 200)
    assert disagreeing.step == "roll_back" and "55.00% of 300 rows" in disagreeing.reasons[0]
    skewed = decide_canary(stable, _totals(300, labels=(0.95, 0.05)), "classification", 200)
    assert skewed.step == "roll_back" and "spread differently" in skewed.reasons[0]


def test_drift_names_the_columns_over_the_threshold_once_enough_rows_are_served():
    reference = _reference()
    bins = reference.features[0]
    window = {"rows": 500, "features": {"x": bins.counts(np.random.default_rng(3).normal(4, 1, 500)).tolist()},
              "predictions": [250, 250, 0, 0]}
    result = drift(reference, merge([{"window": window}]), threshold=0.2)
    assert result.drifting == ["x"] and result.features["x"] > 1
    few = dict(window, rows=50)
    assert drift(reference, merge([{"window": few}]), threshold=0.2).drifting == []


def test_the_monitor_removes_replica_files_of_an_earlier_pointer_generation_once_stale(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    publish(storage, "m", churn_frame(seed=1), "1.csv", {"algorithms": "logistic_regression"})
    generation = Registry(storage).current("m").generation
    reference = _reference()
    names = {}
    for label, epoch in (("old", generation - 1), ("recent-old", generation - 1), ("current", generation)):
        figures = ReplicaFigures(storage, flush_seconds=60, window_seconds=600, replica=new_replica_id())
        figures.answered("m", 1, epoch, "classification", reference, 200, 0.002)
        figures.flush()
        names[label] = replica_name("m", 1, figures.replica)
    stale = time.time() - monitor.STALE_SECONDS - 60
    os.utime(storage.root / names["old"], (stale, stale))
    monitor.run(storage, sink="http://127.0.0.1:9")  # nothing to announce: the sink is never asked
    assert not storage.exists(names["old"])
    assert storage.exists(names["recent-old"]) and storage.exists(names["current"])


def test_inputs_beyond_the_queue_bound_are_counted_as_unbinned_not_held(tmp_path):
    storage = LocalStorage(tmp_path)
    figures = ReplicaFigures(storage, flush_seconds=60, window_seconds=600, replica="r1")
    reference = _reference()
    figures.scored("m", 1, 1, "classification", reference, lambda: {"x": [0.0] * 10}, ["a"] * 10, 10)
    figures.scored("m", 1, 1, "classification", reference, lambda: {"x": []}, [], QUEUE_ROWS_LIMIT)  # would exceed it
    figures.flush()
    data = json.loads(storage.read(replica_name("m", 1, "r1")))
    assert data["unbinned_requests"] == 1 and data["window"]["rows"] == 10


def test_one_model_whose_canary_is_gone_does_not_stop_the_monitor_for_the_others(tmp_path, caplog):
    storage = LocalStorage(tmp_path / "bucket")
    registry = Registry(storage)
    for model in ("a", "b"):
        publish(storage, model, churn_frame(seed=1), "1.csv", {"algorithms": "logistic_regression"})
        publish(storage, model, churn_frame(seed=2), "2.csv", {"algorithms": "logistic_regression"})
        registry.move_pointer(model, 1, reason="for the test")
        registry.start_canary(model, 2, 50)
    storage.delete("models/a/versions/2/card.json")  # removed by hand after the canary started
    figures = ReplicaFigures(storage, flush_seconds=60, window_seconds=600, replica="r")
    generation = registry.current("b").generation
    for version, count in ((1, 300), (2, 300)):
        for _ in range(count):
            figures.answered("b", version, generation, "classification", None, 200, 0.002)
    figures.flush()
    monitor.run(storage, sink="http://127.0.0.1:9")  # the sink is down: the announcement waits in the outbox
    assert registry.current("b").version == 2  # b's canary was decided
    assert "a: not monitored this run: NotFound" in caplog.text
