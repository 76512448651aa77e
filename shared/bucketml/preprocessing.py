"""The preprocess step: a finalized upload becomes prepared data or a rejection.

Idempotent per upload (bucket, name, generation): a duplicate delivery finds what the first
one wrote and answers the same event.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cloudevents.http import CloudEvent

from . import events
from .csv_reading import Limits, read_csv
from .dataset import (
    Upload,
    dataset_object,
    prepare,
    prepared_prefix,
    rejection_object,
    to_csv,
)
from .registry import RegistryError, check_model_name
from .rejections import Rejection
from .spec import check_for_task, effective_spec
from .storage import NotFound, PreconditionFailed, Storage

log = logging.getLogger("bucketml.preprocess")

FUNCTION = "preprocess"


def upload_from_event(data: dict[str, Any]) -> tuple[str, str, int]:
    bucket, name, generation = data.get("bucket"), data.get("name"), data.get("generation")
    if not isinstance(bucket, str) or not isinstance(name, str):
        raise events.MalformedEvent("storage event data needs string 'bucket' and 'name'")
    try:
        return bucket, name, int(generation)
    except (TypeError, ValueError):
        raise events.MalformedEvent(f"storage event data has no valid 'generation': {generation!r}") from None


def handle_finalized(storage: Storage, data: dict[str, Any]) -> CloudEvent | None:
    """Returns the reply event, or None when the object is not ours to process."""
    bucket, name, generation = upload_from_event(data)
    if not dataset_object(name):
        log.info("ignored %s: not a dataset upload (datasets/<model>/<file>.csv)", name)
        return None
    if bucket != storage.bucket_name:
        log.warning("ignored %s: event for bucket %s, this function serves %s", name, bucket, storage.bucket_name)
        return None
    # Trust the bucket, not the event: the object must still be this generation.
    try:
        info = storage.stat(name)
    except NotFound:
        log.info("ignored %s#%s: the object no longer exists", name, generation)
        return None
    if info.generation != generation:
        log.info("ignored %s#%s: replaced by generation %s, which has its own event", name, generation, info.generation)
        return None
    upload = Upload(bucket, name, generation, info.md5_hash, info.metadata)

    done = previous_outcome(storage, upload)
    if done is not None:
        log.info("duplicate delivery of %s#%s: answering the earlier outcome", name, generation)
        return done
    try:
        check_model_name(upload.model)
        limits = Limits.from_environment()
        if info.size > limits.max_upload_bytes:
            raise Rejection(
                "file_too_large",
                f"{name} is {info.size} bytes; the limit is {limits.max_upload_bytes} (BUCKETML_MAX_UPLOAD_BYTES)",
            )
        spec = effective_spec(storage, upload.model, upload.metadata)
        frame = read_csv(lambda: storage.open(name, generation=generation), name, spec, limits)
        result = prepare(frame, upload, spec)
        check_for_task(spec, result["schema"]["task"])  # metric and algorithms must fit the detected task
        result["schema"].setdefault("spec", spec)  # train reads the knobs from schema.json
    except RegistryError as exc:
        return reject(storage, upload, Rejection("invalid_model_name", str(exc)))
    except Rejection as rejection:
        return reject(storage, upload, rejection)
    except NotFound:
        log.info("ignored %s#%s: replaced while being read", name, generation)
        return None
    return write_prepared(storage, upload, result)


def previous_outcome(storage: Storage, upload: Upload) -> CloudEvent | None:
    try:
        return prepared_event(json.loads(storage.read(prepared_prefix(upload.model, upload.run_id) + "prepared.json")))
    except NotFound:
        pass
    try:
        return rejected_event(json.loads(storage.read(rejection_object(upload))))
    except NotFound:
        return None


def write_prepared(storage: Storage, upload: Upload, result: dict[str, Any]) -> CloudEvent:
    schema = result["schema"]
    prefix = prepared_prefix(upload.model, upload.run_id)
    storage.write(prefix + "train.csv", to_csv(*result["train"], schema["target"]), content_type="text/csv")
    storage.write(prefix + "test.csv", to_csv(*result["test"], schema["target"]), content_type="text/csv")
    storage.write(prefix + "schema.json", json.dumps(schema, indent=2).encode(), content_type="application/json")
    if "profile" in result:
        storage.write(prefix + "profile.json", json.dumps(result["profile"], indent=2).encode(), content_type="application/json")
    summary = {
        "model": upload.model,
        "run": upload.run_id,
        "upload": upload.as_dict(),
        "prepared": prefix,
        "task": schema["task"],
        "target": schema["target"],
        "rows": schema["rows"],
        "columns": len(schema["columns"]),
        "dropped": schema["dropped"],
        "warnings": schema.get("warnings", []),
        "profile": prefix + "profile.json",
    }
    # prepared.json is written last and create-only: it marks the run complete.
    try:
        storage.write(prefix + "prepared.json", json.dumps(summary, indent=2).encode(), if_generation_match=0, content_type="application/json")
    except PreconditionFailed:
        summary = json.loads(storage.read(prefix + "prepared.json"))
    rows = schema["rows"]
    for warning in schema.get("warnings", []):
        log.warning("%s: %s", upload.name, warning)
    log.info("prepared %s: %s on '%s', %s train / %s test rows", upload.name, schema["task"], schema["target"], rows["train"], rows["test"])
    return prepared_event(summary)


def prepared_event(summary: dict[str, Any]) -> CloudEvent:
    return events.platform_event(
        events.DATASET_PREPARED, FUNCTION, summary["model"], summary, id_=f"prepared-{summary['model']}-{summary['run']}"
    )


def reject(storage: Storage, upload: Upload, rejection: Rejection) -> CloudEvent:
    report = {
        "model": upload.model,
        "upload": upload.as_dict(),
        "reason": rejection.reason,
        "message": rejection.message,
        "report": rejection_object(upload),
        "time": events.now_rfc3339(),
    }
    storage.write(report["report"], json.dumps(report, indent=2).encode(), content_type="application/json")
    log.warning("rejected %s#%s: %s (%s)", upload.name, upload.generation, rejection.message, rejection.reason)
    return rejected_event(report)


def rejected_event(report: dict[str, Any]) -> CloudEvent:
    key = f"{report['upload']['name']}-{report['upload']['generation']}"
    return events.platform_event(events.DATASET_REJECTED, FUNCTION, report["model"], report, id_=f"rejected-{key}")

