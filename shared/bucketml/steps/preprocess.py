"""The preprocess step: a finalized upload becomes prepared data or a rejection.

Idempotent per upload (bucket, name, generation): a duplicate delivery finds what the first
one wrote and answers the same event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from cloudevents.http import CloudEvent

from bucketml.contracts import events
from bucketml.contracts.event_data import DatasetPrepared, DatasetRejected
from bucketml.steps.finalized import WrongBucket, live_object, upload_from_event  # noqa: F401 (their old home)
from bucketml.training.reading import Limits, read_csv
from bucketml.training.preparation import (
    Upload,
    dataset_object,
    prepare,
    prepared_prefix,
    rejection_object,
    to_csv,
)
from bucketml.registry.model_registry import RegistryError, check_model_name
from bucketml.contracts.rejections import Rejection
from bucketml.contracts import spec as dataset_spec
from bucketml.storage import NotFound, PreconditionFailed, Storage

log = logging.getLogger("bucketml.preprocess")

FUNCTION = "preprocess"


def effective_spec(storage: Storage, model: str, metadata: Mapping[str, str | None] | None) -> dataset_spec.EffectiveSpec:
    """The dataset spec in effect for an upload of `model`: its object metadata over
    `datasets/<model>/bucketml.yaml` (if there is one) over the defaults.

    Raises Rejection("spec_invalid", ...) naming the source and the field."""
    name = dataset_spec.spec_file(model)
    try:
        raw: bytes | None = storage.read(name)
    except NotFound:
        raw = None
    return dataset_spec.from_sources(raw, name, metadata)


def handle_finalized(storage: Storage, data: Mapping[str, Any]) -> CloudEvent | None:
    """Returns the reply event, or None when there is nothing to do.

    The event only says which object to look at; everything else comes from the bucket
    (Eventarc and Knative deliver at least once, late and out of order, and anyone who can
    reach the function can post an event):
    - data without a string bucket and name and an integer generation: MalformedEvent (400,
      dead-lettered: a retry cannot help);
    - another bucket than this function's: WrongBucket (400, dead-lettered), a misrouted
      Trigger that an operator must see rather than a silent acknowledgement;
    - an object that no longer exists, or whose live generation is not the event's (overwritten
      since, or a generation that never existed): None (202, nothing done; a newer generation
      has its own event);
    - otherwise the bytes, size, MD5 and metadata are those of the named generation as the
      bucket reports them, never the event's `size`, `md5Hash` or `metadata`, and the bytes
      are read at that generation only.
    """
    # Trust the bucket, not the event: the object must still be this generation.
    info = live_object(storage, data, dataset_object, "a dataset upload (datasets/<model>/<file>.csv)")
    if info is None:
        return None
    name, generation = info.name, info.generation
    upload = Upload(info.bucket, name, generation, info.md5_hash, info.metadata)

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
        stored_spec = spec.as_json()  # reading and preparing take the stored form, as train does
        frame = read_csv(lambda: storage.open(name, generation=generation), name, stored_spec, limits)
        result = prepare(frame, upload, stored_spec)
        spec.check_for_task(result["schema"]["task"])  # metric and algorithms must fit the detected task
        result["schema"].setdefault("spec", stored_spec)  # train reads the knobs from schema.json
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
        summary = storage.read(prepared_prefix(upload.model, upload.run_id) + "prepared.json")
        return prepared_event(DatasetPrepared.model_validate_json(summary))
    except NotFound:
        pass
    try:
        return rejected_event(DatasetRejected.model_validate_json(storage.read(rejection_object(upload))))
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
    summary = DatasetPrepared(
        model=upload.model,
        run=upload.run_id,
        upload=upload.as_dict(),
        prepared=prefix,
        task=schema["task"],
        target=schema["target"],
        rows=schema["rows"],
        columns=len(schema["columns"]),
        dropped=schema["dropped"],
        warnings=schema.get("warnings", []),
        profile=prefix + "profile.json",
    )
    # prepared.json is written last and create-only: it marks the run complete.
    try:
        storage.write(prefix + "prepared.json", json.dumps(summary.to_data(), indent=2).encode(), if_generation_match=0,
                      content_type="application/json")
    except PreconditionFailed:
        summary = DatasetPrepared.model_validate_json(storage.read(prefix + "prepared.json"))
    rows = schema["rows"]
    for warning in schema.get("warnings", []):
        log.warning("%s: %s", upload.name, warning)
    log.info("prepared %s: %s on '%s', %s train / %s test rows", upload.name, schema["task"], schema["target"], rows["train"], rows["test"])
    return prepared_event(summary)


def prepared_event(summary: DatasetPrepared) -> CloudEvent:
    return events.platform_event(
        events.DATASET_PREPARED, FUNCTION, summary.model, summary.to_data(), id_=f"prepared-{summary.model}-{summary.run}"
    )


def reject(storage: Storage, upload: Upload, rejection: Rejection) -> CloudEvent:
    report = DatasetRejected(
        model=upload.model,
        upload=upload.as_dict(),
        reason=rejection.reason,
        message=rejection.message,
        report=rejection_object(upload),
        time=events.now_rfc3339(),
    )
    storage.write(report.report, json.dumps(report.to_data(), indent=2).encode(), content_type="application/json")
    log.warning("rejected %s#%s: %s (%s)", upload.name, upload.generation, rejection.message, rejection.reason)
    return rejected_event(report)


def rejected_event(report: DatasetRejected) -> CloudEvent:
    key = f"{report.upload.name}-{report.upload.generation}"
    return events.platform_event(events.DATASET_REJECTED, FUNCTION, report.model, report.to_data(), id_=f"rejected-{key}")

