"""The train step: prepared data becomes a registered, parity-checked ONNX version.

Idempotent per upload: a duplicate delivery finds the version the first one made and answers
the same event instead of training again.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from importlib import metadata as importlib_metadata
from typing import Any

from cloudevents.http import CloudEvent

from . import events
from .dataset import load_prepared
from .export import ParityError, check_parity, to_onnx, with_metadata
from .registry import Registry, RegistryError, check_model_name
from .storage import NotFound, Storage
from .training import PRIMARY_METRIC, TrainingError, fit_candidates

log = logging.getLogger("bucketml.train")

FUNCTION = "train"
LIBRARIES = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy", "pandas")


def handle_prepared(storage: Storage, data: dict[str, Any]) -> CloudEvent:
    model, prefix, upload = data.get("model"), data.get("prepared"), data.get("upload")
    if not isinstance(model, str) or not isinstance(prefix, str) or not isinstance(upload, dict):
        raise events.MalformedEvent("dataset.prepared data needs 'model', 'prepared' and 'upload'")
    try:
        check_model_name(model)
    except RegistryError as exc:
        raise events.MalformedEvent(str(exc)) from None
    registry = Registry(storage)
    existing = registry.find_by_upload(model, upload)
    if existing is not None:
        log.info("duplicate delivery for %s#%s: version %s exists", upload.get("name"), upload.get("generation"), existing)
        return version_event(registry, model, existing)
    started = time.perf_counter()
    try:
        schema, train, test = load_prepared(storage, prefix)
        candidates, failures = fit_candidates(schema, train, test)
        chosen, onnx_bytes, schema, parity, rejected = export_first_that_agrees(candidates, schema, test[0])
    except NotFound as exc:
        return failed(model, upload, "prepared_data_missing", f"the prepared data is gone: {exc}")
    except (TrainingError, ParityError) as exc:
        return failed(model, upload, "no_model", str(exc))
    card = {
        "task": schema["task"],
        "target": schema["target"],
        "algorithm": chosen.name,
        "metric": PRIMARY_METRIC[schema["task"]],
        "metrics": chosen.metrics,
        "candidates": [c.summary() for c in candidates],
        "candidate_failures": failures + rejected,
        "schema": {k: schema[k] for k in ("task", "target", "columns", "classes")},
        "data": {k: schema[k] for k in ("rows", "dropped", "notes", "target_origin")},
        "parity": parity,
        "lineage": {"upload": upload, "run": data.get("run"), "prepared": prefix},
        "libraries": {name: importlib_metadata.version(name) for name in LIBRARIES} | {"python": platform.python_version()},
        "training_seconds": round(time.perf_counter() - started, 3),
        "artifact": {"sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes)},
    }

    def stamped(version: int) -> bytes:
        return with_metadata(onnx_bytes, onnx_metadata(model, version, card))

    version = registry.register(model, stamped, card)
    moved, previous = registry.move_pointer(model, version, reason=f"trained from {upload.get('name')}", only_if_newer=True)
    log.info(
        "%s version %s: %s %s=%.4f%s",
        model, version, chosen.name, card["metric"], chosen.metrics[card["metric"]],
        f", now current (was {previous})" if moved else f", not current (version {previous} is newer)",
    )
    return version_event(registry, model, version)


def export_first_that_agrees(candidates, schema, x_test):
    """Best candidate whose ONNX export passes the parity gate, with the schema the served
    model needs (ONNX input names added), and why better candidates were passed over."""
    rejected = []
    for candidate in candidates:
        try:
            onnx_bytes, inputs = to_onnx(candidate.pipeline, schema)
            served = dict(schema, columns=[dict(c, input=name) for c, name in zip(schema["columns"], inputs)])
            parity = check_parity(onnx_bytes, candidate.pipeline, served, x_test)
            return candidate, onnx_bytes, served, parity, rejected
        except Exception as exc:  # any converter or runtime failure disqualifies this candidate only
            rejected.append(f"{candidate.name}: {exc}")
    raise ParityError("no candidate could be exported to an ONNX model that agrees with sklearn: " + "; ".join(rejected))


def onnx_metadata(model: str, version: int, card: dict[str, Any]) -> dict[str, Any]:
    return {"bucketml.model": model, "bucketml.version": str(version), "bucketml.schema": card["schema"]}


def version_event(registry: Registry, model: str, version: int) -> CloudEvent:
    """model.published if `version` is current, else model.trained (it exists, not served)."""
    card = registry.card(model, version)
    current = registry.current(model)
    data = {
        "model": model,
        "version": version,
        "current_version": current.version,
        "algorithm": card["algorithm"],
        "metric": card["metric"],
        "metrics": card["metrics"],
        "model_object": Registry.version_prefix(model, version) + "model.onnx",
        "card_object": Registry.version_prefix(model, version) + "card.json",
        "upload": card["lineage"]["upload"],
    }
    if current.version == version:
        data["previous_version"] = current.data.get("previous")
        return events.platform_event(events.MODEL_PUBLISHED, FUNCTION, model, data, id_=f"published-{model}-{version}")
    return events.platform_event(events.MODEL_TRAINED, FUNCTION, model, data, id_=f"trained-{model}-{version}")


def failed(model: str, upload: dict[str, Any], reason: str, message: str) -> CloudEvent:
    log.warning("training %s from %s failed: %s", model, upload.get("name"), message)
    data = {"model": model, "upload": upload, "reason": reason, "message": message}
    key = f"{upload.get('name')}-{upload.get('generation')}"
    return events.platform_event(events.TRAINING_FAILED, FUNCTION, model, data, id_=f"failed-{key}")
