"""The train step: prepared data becomes a registered, parity-checked ONNX version.

Idempotent per upload: a duplicate delivery finds the version the first one made and announces
the same events (same ids) instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
from cloudevents.http import CloudEvent
from threadpoolctl import threadpool_limits

from bucketml.contracts import events
from bucketml.contracts.event_data import DatasetPrepared, RolloutFigures, TrainingFailed
from bucketml.training.column_types import with_categories
from bucketml.monitoring.reference import REFERENCE_FILE
from bucketml.training.preparation import from_csv, load_prepared
from bucketml.training.reference import build_reference
from bucketml.training.export import ParityError, check_parity, served_columns, to_onnx, with_metadata
from bucketml.registry.model_registry import Registry, RegistryError, UploadRegistered, check_model_name
from bucketml.contracts.rejections import outcome_object
from bucketml.encoding import feeds_from_columns, new_session
from bucketml.contracts.spec import LOWER_IS_BETTER, better, with_defaults
from bucketml.steps.rollout import rollout_event
from bucketml.storage import InvalidObjectName, NotFound, Storage
from bucketml.training.metrics import score
from bucketml.training.search import CandidateSearch, TrainingError

log = logging.getLogger("bucketml.train")

FUNCTION = "train"
LIBRARIES = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy", "pandas")


def handle_prepared(storage: Storage, data: Mapping[str, Any]) -> list[CloudEvent]:
    """The events training announces, in order: model.trained, then model.published when the
    current pointer moved to the new version; or one training.failed."""
    # One OpenMP and one BLAS thread for all of it, as in the search (training.search): with two,
    # the parity gate's and the report's boosted-tree predictions on a few hundred rows took
    # 3 ms per tree on a busy machine, a second per model.
    with threadpool_limits(limits=1):
        return _train(storage, data)


def _train(storage: Storage, data: Mapping[str, Any]) -> list[CloudEvent]:
    prepared = DatasetPrepared.parse(data)  # MalformedEvent (400) naming the field
    # The upload travels on as the event had it (card lineage, upload record, failure record).
    model, prefix, upload = prepared.model, prepared.prepared, prepared.upload.to_data()
    try:
        check_model_name(model)
    except RegistryError as exc:
        raise events.MalformedEvent(str(exc)) from None
    if not (prefix.startswith(f"prepared/{model}/") and prefix.endswith("/")):  # train reads only what preprocess wrote
        raise events.MalformedEvent(
            f"dataset.prepared data's 'prepared' must be a folder under prepared/{model}/, got {prefix[:100]!r}"
        )
    registry = Registry(storage)
    existing = registry.find_by_upload(model, upload)
    if existing is not None:
        log.info("duplicate delivery for %s#%s: version %s exists", upload.get("name"), upload.get("generation"), existing)
        return finish_pointer_step(registry, model, existing, upload)
    started = time.perf_counter()
    try:
        schema, train, test = load_prepared(storage, prefix)
        spec = with_defaults(schema.get("spec"))  # data prepared before specs existed: defaults
        # Chosen by cross-validation on the training rows; the held-out rows only evaluate.
        selection = CandidateSearch.for_spec(schema, spec).fit(*train).evaluate(*test)
        candidates, failures, skipped = selection.results_, selection.failures_, selection.skipped_
        chosen, onnx_bytes, schema, parity, rejected = export_first_that_agrees(candidates, schema, test[0])
    except NotFound as exc:
        return failed(storage, model, upload, "prepared_data_missing", f"the prepared data is gone: {exc}")
    except (TrainingError, ParityError) as exc:
        return failed(storage, model, upload, "no_model", str(exc))
    schema = dict(schema, columns=with_categories(schema["columns"], train[0]))
    metric = selection.metric_  # the spec's, or the default the training rows called for
    # Decided before the version is registered, so the card can say what happened.
    promotion = decide_promotion(registry, model, spec, schema, chosen.metrics[metric], test, metric, onnx_bytes,
                                 train)
    newer = newer_generation(storage, upload)
    if promotion["promoted"] and newer is not None:  # a late delivery: the newer upload's training decides
        promotion.update(promoted=False, reason=f"{upload['name']} was replaced by generation {newer} after this upload")
    card = {
        "task": schema["task"],
        "target": schema["target"],
        "algorithm": chosen.name,
        "metric": metric,
        "metrics": chosen.metrics,
        "confusion_matrix": chosen.confusion,  # held-out rows; None for regression
        "selection": selection.summary_,
        "candidates": [c.summary() for c in candidates],
        "candidate_failures": failures + rejected,
        "skipped": skipped,
        "spec": spec,
        "promotion": promotion,
        "schema": {k: schema[k] for k in ("task", "target", "columns", "classes")},
        "data": {k: schema[k] for k in ("rows", "dropped", "notes", "target_origin")} | {"warnings": schema.get("warnings", [])},
        "profile": read_profile(storage, prefix),
        "parity": parity,
        "lineage": {"upload": upload, "run": prepared.run, "prepared": prefix},
        "libraries": {name: importlib_metadata.version(name) for name in LIBRARIES} | {"python": platform.python_version()},
        "training_seconds": round(time.perf_counter() - started, 3),
        "artifact": {"sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes)},
    }

    def stamped(version: int) -> bytes:
        return with_metadata(onnx_bytes, onnx_metadata(model, version, card))

    def report(version: int) -> bytes | None:
        """report.html of version n (the registry calls this before it writes the card)."""
        try:
            from bucketml.contracts.card import ModelCard
            from bucketml.training.report import render_report  # matplotlib: only the train step loads it

            page = render_report(ModelCard.model_validate(card), chosen.pipeline, test[0], test[1], model=model,
                                 version=version)
        except Exception as exc:
            # Only rendering is caught, and all of it: the report documents a version that already
            # passed the parity gate, so a plotting bug or an estimator the report code does not
            # expect must not cost the user that model. Writing the file is outside this try: a
            # storage fault still fails the step (503) and the broker retries it.
            log.exception("%s version %s: the report could not be rendered", model, version)
            card["report_error"] = f"{type(exc).__name__}: {exc}"
            return None
        card["report"] = Registry.version_prefix(model, version) + "report.html"
        return page

    def reference(version: int) -> bytes:
        """reference.json: what drift of the served inputs is measured against."""
        return json.dumps(build_reference(schema, *train).to_dict()).encode()

    try:
        # A canary's start is this upload's pointer step: pending until done, like a promotion.
        version = registry.register(model, stamped, card, artifacts={"report.html": report, REFERENCE_FILE: reference},
                                    upload=upload, promote=promotion["promoted"] or "canary_percent" in promotion)
    except UploadRegistered as exc:  # a concurrent delivery of the same upload registered it first
        log.info("duplicate delivery for %s#%s: version %s was made meanwhile", upload.get("name"),
                 upload.get("generation"), exc.version)
        return finish_pointer_step(registry, model, exc.version, upload)
    if "canary_percent" in promotion:
        state = f", {canary_step(registry, model, version, upload, promotion['canary_percent'])}"
    elif promotion["promoted"]:
        moved, previous = pointer_step(registry, model, version, upload)
        state = f", now current (was {previous})" if moved else f", not current (version {previous} is newer)"
    else:
        state = f", not current: {promotion['reason']}"
    value = chosen.metrics[metric]
    log.info("%s version %s: %s %s=%s%s", model, version, chosen.name, metric, "undefined" if value is None else f"{value:.4f}", state)
    return version_events(registry, model, version)


def version_events(registry: Registry, model: str, version: int) -> list[CloudEvent]:
    """model.trained (and model.published if current), then rollout.started for a version that
    started as a canary. Ids are stable: a redelivery announces the same events again."""
    found = registry.version_events(model, version, FUNCTION)
    promotion = registry.card(model, version).get("promotion") or {}
    if "canary_percent" in promotion and promotion.get("current_version") is not None:
        figures = RolloutFigures(percent=promotion["canary_percent"])
        found.append(rollout_event(events.ROLLOUT_STARTED, model, version, promotion["current_version"], "trained",
                                   figures, function=FUNCTION))
    return found


def canary_step(registry: Registry, model: str, version: int, upload: dict[str, Any], percent: int) -> str:
    """Start the version of `upload` as the canary of the current version (a first version is
    made current instead, and a version older than the current one starts nothing), and record
    that the step is done; what happened, for the log."""
    current = registry.current(model).version
    if current is None:
        moved, _ = pointer_step(registry, model, version, upload)
        return "now current (the first version)" if moved else "not current"
    if current >= version:
        registry.pointer_settled(model, upload)
        return f"not started as a canary (version {current} is current)"
    registry.start_canary(model, version, percent)
    registry.pointer_settled(model, upload)
    return f"canary of version {current} for {percent}% of unpinned requests"


def finish_pointer_step(registry: Registry, model: str, version: int, upload: dict[str, Any]) -> list[CloudEvent]:
    """The events of a version made from `upload` before (a redelivery), after doing the pointer
    step if the delivery that made it crashed between registering the version and moving the
    pointer: the old version stayed current until now, and no second version is made."""
    if registry.pointer_pending(model, upload):
        promotion = registry.card(model, version).get("promotion") or {}
        if "canary_percent" in promotion:
            log.info("%s version %s: %s; its canary step had not been done", model, version,
                     canary_step(registry, model, version, upload, promotion["canary_percent"]))
        else:
            moved, previous = pointer_step(registry, model, version, upload)
            if moved:
                log.info("%s version %s: now current (was %s); its pointer step had not been done", model, version, previous)
    return version_events(registry, model, version)


def pointer_step(registry: Registry, model: str, version: int, upload: dict[str, Any]) -> tuple[bool, int | None]:
    """Make the version of `upload` current unless a newer one is, and record that the step is
    done; (whether the pointer moved, the version current before)."""
    moved, previous = registry.move_pointer(model, version, reason=f"trained from {upload.get('name')}", only_if_newer=True)
    registry.pointer_settled(model, upload)
    return moved, previous


def newer_generation(storage: Storage, upload: dict[str, Any]) -> int | None:
    """The live generation of the uploaded object if it replaced this upload's (its prepared event
    arrived late, or out of order with the newer one's), else None."""
    if upload.get("bucket") != storage.bucket_name:
        return None
    try:
        live = storage.stat(upload["name"]).generation
    except (NotFound, InvalidObjectName):
        return None
    try:
        return live if live > int(upload["generation"]) else None
    except (TypeError, ValueError):
        return None


# if_better: how much worse than the current version a new one may score on held-out rows and
# still be promoted (held-out scores are noisy; an honest new sample must not lose by chance).
# Scores in [0, 1] (and r2): absolute; error metrics (rmse, mae, log_loss): relative to the
# current version's score.
ABSOLUTE_TOLERANCE = 0.02
RELATIVE_TOLERANCE = 0.05


def decide_promotion(
    registry: Registry, model: str, spec: dict[str, Any], schema: dict[str, Any], new_score: float, test: tuple, metric: str,
    new_onnx: bytes, train: tuple | None = None,
) -> dict[str, Any]:
    """Whether the new version should become current, and why (recorded in the card).

    `promotion: always` promotes. `if_better` runs the CURRENT and the NEW version's ONNX
    models, as predict serves them, on the current version's held-out rows (its prepared
    test.csv, through its card's lineage.prepared) and on the new upload's, and promotes
    unless one of these holds:

    - on the current version's rows the new version is worse than the current one by more
      than the tolerance (`within_tolerance`);
    - on the new rows the new version is worse than the current one by more than the tolerance;
    - on the new rows the new version is not strictly better than the trivial baseline: the
      training rows' most frequent class (class priors as probabilities), or their mean target.

    A current version whose prepared rows are gone, fail to load or to run, or leave the
    metric undefined, is compared as before the current rows were used: the new version must
    be strictly better on the new rows (and better than the baseline); the reason says so.
    A current version with a different schema (task, columns and their types, classes)
    cannot be compared, nor one that fails to run on the new rows: then the new version is
    promoted.
    """
    policy = spec.get("promotion") or "always"
    record: dict[str, Any] = {
        "policy": policy, "metric": metric, "current_version": None, "current_score": None,
        "new_score": new_score, "promoted": True,
    }
    if policy == "canary":
        current = record["current_version"] = registry.current(model).version
        if current is None:
            record["reason"] = "no current version: the first version is served at once"
            return record
        percent = int(spec.get("canary_percent") or 10)
        record.update(promoted=False, canary_percent=percent,
                      reason=f"started as the canary of version {current} for {percent}% of unpinned requests; "
                             "the monitor promotes it or rolls it back from live figures")
        return record
    if policy != "if_better":
        record["reason"] = "policy always"
        return record
    current = registry.current(model).version
    record["current_version"] = current
    if current is None:
        record["reason"] = "no current version"
        return record
    try:
        card = registry.card(model, current)
        difference = schema_difference(card.get("schema") or {}, schema)
        if difference:
            record["reason"] = f"not comparable with version {current}: {difference}"
            return record
        current_session = new_session(registry.model_bytes(model, current))
        record["current_score"] = onnx_score(current_session, card["schema"], test, metric)
    except Exception as exc:  # a current version that cannot be read or run is no reason to keep it
        record["reason"] = f"version {current} could not be evaluated: {exc}"
        return record
    # Both sides scored the same way, by onnxruntime as predict serves them: float32 noise
    # between sklearn and ONNX must not decide "strictly better" between equal models.
    candidate_session = new_session(new_onnx)
    new_score = record["new_score"] = onnx_score(candidate_session, schema, test, metric)
    if new_score is None or record["current_score"] is None:  # roc_auc when a class has no test row
        record["reason"] = f"{metric} is undefined on the new test rows: not comparable with version {current}"
        return record
    tolerance, relative = (RELATIVE_TOLERANCE, True) if metric in LOWER_IS_BETTER else (ABSOLUTE_TOLERANCE, False)
    record.update(tolerance=tolerance, tolerance_kind="relative" if relative else "absolute",
                  current_rows=None, current_rows_score_new=None, current_rows_score_current=None, baseline_score=None)
    refusals: list[str] = []
    fallback = None
    try:  # the current version's own held-out rows: data the new upload cannot have spoilt
        prefix = card["lineage"]["prepared"]
        prepared_schema = json.loads(registry.storage.read(prefix + "schema.json"))
        current_test = from_csv(registry.storage.read(prefix + "test.csv"), prepared_schema)
        on_new = onnx_score(candidate_session, schema, current_test, metric)
        on_current = onnx_score(current_session, card["schema"], current_test, metric)
        if on_new is None or on_current is None:
            raise ValueError(f"{metric} is undefined on them")
        record.update(current_rows=prefix + "test.csv", current_rows_score_new=on_new, current_rows_score_current=on_current)
        if not within_tolerance(metric, on_new, on_current):
            refusals.append(
                f"{metric} {on_new:.4f} on version {current}'s test rows is worse than its {on_current:.4f} "
                f"by more than the tolerance ({tolerance_text(tolerance, relative)})"
            )
    except Exception as exc:  # rows gone (NotFound), unreadable, or the models fail on them
        fallback = f"version {current}'s test rows could not be used ({type(exc).__name__}: {exc})"
    baseline = baseline_score(schema, train, test, metric) if train is not None else None
    record["baseline_score"] = baseline
    if baseline is not None and not better(metric, new_score, baseline):
        refusals.append(f"{metric} {new_score:.4f} on the new test rows is no better than the baseline's {baseline:.4f} "
                        f"({'the most frequent class' if schema['task'] == 'classification' else 'the mean target'})")
    if fallback is not None:  # the comparison made before the current rows were used
        if not better(metric, new_score, record["current_score"]):
            refusals.append(f"{metric} {new_score:.4f} is not better than version {current}'s "
                            f"{record['current_score']:.4f} on the new test rows")
    elif not within_tolerance(metric, new_score, record["current_score"]):
        refusals.append(
            f"{metric} {new_score:.4f} on the new test rows is worse than version {current}'s "
            f"{record['current_score']:.4f} by more than the tolerance ({tolerance_text(tolerance, relative)})"
        )
    record["promoted"] = not refusals
    if refusals:
        reason = "; ".join(refusals)
    elif fallback is None:
        reason = (
            f"{metric} {new_score:.4f} vs version {current}'s {record['current_score']:.4f} on the new test rows and "
            f"{record['current_rows_score_new']:.4f} vs {record['current_rows_score_current']:.4f} on version {current}'s "
            f"test rows: within the tolerance ({tolerance_text(tolerance, relative)})"
            + (f", and better than the baseline's {baseline:.4f}" if baseline is not None else "")
        )
    else:
        reason = f"{metric} {new_score:.4f} is better than version {current}'s {record['current_score']:.4f} on the new test rows"
    record["reason"] = f"{fallback}: compared on the new test rows only; {reason}" if fallback else reason
    return record


def within_tolerance(metric: str, score: float, current: float) -> bool:
    """`score` is not worse than `current` by more than the tolerance: absolute 0.02 for scores
    (higher is better), relative 5% of `current` for errors (lower is better)."""
    if metric in LOWER_IS_BETTER:
        return score <= current * (1 + RELATIVE_TOLERANCE) + 1e-12
    return score >= current - ABSOLUTE_TOLERANCE - 1e-12


def tolerance_text(tolerance: float, relative: bool) -> str:
    return f"{tolerance:.0%} of the current score" if relative else f"{tolerance:g}"


def baseline_score(schema: dict[str, Any], train: tuple, test: tuple, metric: str) -> float | None:
    """`metric` on `test` of the trivial model of the training rows: the most frequent class
    (class priors as probabilities) for classification, the mean target for regression."""
    y_train, y_test = train[1], test[1]
    if len(y_train) == 0 or len(y_test) == 0:
        return None
    if schema["task"] == "classification":
        classes = [str(c) for c in schema["classes"]]
        counts = y_train.astype(str).value_counts()
        priors = np.array([counts.get(c, 0) for c in classes], dtype="float64") / len(y_train)
        majority = str(counts.idxmax())
        predicted = np.full(len(y_test), majority, dtype=object).astype(str)
        probabilities = np.tile(priors, (len(y_test), 1))
        return score("classification", y_test.to_numpy().astype(str), predicted, probabilities, classes)[metric]
    predicted = np.full(len(y_test), float(y_train.astype("float64").mean()))
    return score(schema["task"], y_test.to_numpy(), predicted)[metric]


def schema_difference(current: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why a model made for `current` cannot be scored on data prepared for `new`, or None."""
    if current.get("task") != new.get("task"):
        return f"task {current.get('task')} vs {new.get('task')}"
    old_columns = {(c["name"], c["type"]) for c in current.get("columns") or []}
    new_columns = {(c["name"], c["type"]) for c in new.get("columns") or []}
    if old_columns != new_columns:
        changed = sorted(f"{name} ({kind})" for name, kind in old_columns ^ new_columns)
        return "columns differ: " + ", ".join(changed)
    if sorted(current.get("classes") or []) != sorted(new.get("classes") or []):
        return "classes differ"
    return None


def onnx_score(session: Any, schema: dict[str, Any], test: tuple, metric: str) -> float:
    """`metric` of an exported model's onnxruntime session (as predict serves it) on `test`."""
    x, y = test
    columns = schema["columns"]
    values = {c["name"]: x[c["name"]].tolist() for c in columns}
    outputs = session.run(None, feeds_from_columns(columns, values, len(x)))
    if schema["task"] == "classification":
        predicted = outputs[0].reshape(-1).astype(str)
        # Probability columns follow the model's classes: the schema's (sorted) classes.
        return score("classification", y.to_numpy(), predicted, outputs[1], schema["classes"])[metric]
    predicted = outputs[0].reshape(-1).astype("float64")
    return score(schema["task"], y.to_numpy(), predicted)[metric]


def read_profile(storage: Storage, prefix: str) -> dict[str, Any] | None:
    """The profile preprocess wrote next to the prepared data (None for runs made before profiles)."""
    try:
        return json.loads(storage.read(prefix + "profile.json"))
    except NotFound:
        return None


def export_first_that_agrees(candidates, schema, x_test):
    """Best candidate whose ONNX export passes the parity gate, with the schema the served
    model needs (ONNX input names added), and why better candidates were passed over."""
    rejected = []
    for candidate in candidates:
        try:
            onnx_bytes, inputs = to_onnx(candidate.pipeline, schema)
            served = dict(schema, columns=served_columns(schema["columns"], inputs))
            parity = check_parity(onnx_bytes, candidate.pipeline, served, x_test)
            return candidate, onnx_bytes, served, parity, rejected
        except Exception as exc:  # any converter or runtime failure disqualifies this candidate only
            rejected.append(f"{candidate.name}: {exc}")
    raise ParityError("no candidate could be exported to an ONNX model that agrees with sklearn: " + "; ".join(rejected))


def onnx_metadata(model: str, version: int, card: dict[str, Any]) -> dict[str, Any]:
    return {"bucketml.model": model, "bucketml.version": str(version), "bucketml.schema": card["schema"]}


def failure_object(model: str, upload: dict[str, Any]) -> str:
    """failed/<model>/<file>.<generation>.json, beside rejected/."""
    return outcome_object("failed", model, str(upload.get("name")).rsplit("/", 1)[-1], upload.get("generation"))


def failed(storage: Storage, model: str, upload: dict[str, Any], reason: str, message: str) -> list[CloudEvent]:
    log.warning("training %s from %s failed: %s", model, upload.get("name"), message)
    data = TrainingFailed(model=model, upload=upload, reason=reason, message=message, report=failure_object(model, upload)).to_data()
    # Kept in the bucket as rejections are, so `bucketml models NAME` shows it after the event is gone.
    record = dict(data, time=events.now_rfc3339())
    storage.write(data["report"], json.dumps(record, indent=2).encode(), content_type="application/json")
    key = f"{upload.get('name')}-{upload.get('generation')}"
    return [events.platform_event(events.TRAINING_FAILED, FUNCTION, model, data, id_=f"failed-{key}")]
