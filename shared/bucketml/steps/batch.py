"""The batch step: a CSV written under batch/<model>/ is scored by the model's current version.

google.cloud.storage.object.v1.finalized of `batch/<model>/<name>.csv` ->
`predictions/<model>/<name>.csv` (the input's rows as sent, plus the prediction columns) and
bucketml.batch.completed.v1, or bucketml.batch.failed.v1 when the file cannot be scored.

The output is scored into a temporary file and stored in one create-only write, so a
predictions object is always complete, and never replaced. Its metadata names the input
generation and the version, so a duplicate delivery of the same input generation answers the
completed event again instead of scoring twice. Bad data is a business outcome (a 200 with
batch.failed, never retried); a storage fault propagates (503, retried).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from cloudevents.http import CloudEvent

from bucketml.contracts import events
from bucketml.contracts.event_data import BatchCompleted, BatchFailed
from bucketml.registry.model_registry import MODEL_NAME, Registry
from bucketml.serving.batch import BatchRefused, score_csv
from bucketml.serving.runtime import OnnxModel
from bucketml.steps.finalized import live_object
from bucketml.storage import NotFound, ObjectInfo, PreconditionFailed, Storage

log = logging.getLogger("bucketml.batch")

FUNCTION = "batch"
INPUT_PREFIX = "batch/"
OUTPUT_PREFIX = "predictions/"
SUFFIX = ".csv"
# The output object's custom metadata: what it was made from.
INPUT_KEY, GENERATION_KEY, VERSION_KEY, ROWS_KEY, SECONDS_KEY = "input", "input_generation", "version", "rows", "seconds"


def batch_object(name: str) -> bool:
    """True for `batch/<model>/<name>.csv`, the only objects this step scores."""
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == "batch" and bool(parts[1]) and parts[2].lower().endswith(SUFFIX)


def output_object(name: str) -> str:
    """`predictions/<model>/<name>.csv` for `batch/<model>/<name>.csv`."""
    return OUTPUT_PREFIX + name[len(INPUT_PREFIX):]


def handle_finalized(storage: Storage, data: Mapping[str, Any]) -> CloudEvent | None:
    """The batch.completed or batch.failed reply, or None when there is nothing to do (an
    object outside batch/, one replaced or removed since the event: see steps.finalized)."""
    info = live_object(storage, data, batch_object, "a batch input (batch/<model>/<name>.csv)")
    if info is None:
        return None
    model = info.name.split("/")[1]
    if not MODEL_NAME.fullmatch(model):
        return failed(info, model, BatchRefused(
            "invalid_name", f"'{model}' is no model name (1-63 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit): upload the file under batch/<model>/ with the name of a served model"))
    output = output_object(info.name)
    earlier = previous_outcome(storage, info, model, output)
    if earlier is not None:
        return earlier
    registry = Registry(storage)
    version = registry.current(model).version
    if version is None:
        return failed(info, model, BatchRefused(
            "no_model", f"model '{model}' has no current version to score with: upload a dataset under "
                        f"datasets/{model}/ first (or check the model name), then upload this file again"))
    scorer = loaded_model(storage, model, version)
    started = time.monotonic()
    with tempfile.NamedTemporaryFile(prefix="bucketml-batch-", suffix=SUFFIX) as scored:
        try:
            with storage.open(info.name, generation=info.generation) as source:
                rows = score_csv(scorer, source, scored)
        except BatchRefused as refused:
            return failed(info, model, refused)
        except NotFound:
            log.info("ignored %s#%s: replaced while being read", info.name, info.generation)
            return None
        scored.flush()
        seconds = round(time.monotonic() - started, 3)
        metadata = {INPUT_KEY: info.name, GENERATION_KEY: str(info.generation), VERSION_KEY: str(version),
                    ROWS_KEY: str(rows), SECONDS_KEY: str(seconds)}
        try:
            storage.write_file(output, scored.name, if_generation_match=0, content_type="text/csv", metadata=metadata)
        except PreconditionFailed:  # written meanwhile: by a duplicate of this delivery, or for another generation
            earlier = previous_outcome(storage, info, model, output)
            if earlier is None:
                raise  # removed again meanwhile: a retry settles it
            return earlier
    log.info("scored %s#%s with %s version %s: %d rows in %.3f s -> %s", info.name, info.generation, model, version,
             rows, seconds, output)
    return completed_event(BatchCompleted(model=model, version=version, input=info.name, generation=info.generation,
                                          output=output, rows=rows, seconds=seconds))


def previous_outcome(storage: Storage, info: ObjectInfo, model: str, output: str) -> CloudEvent | None:
    """The answer when the predictions object exists already: the completed event again if it
    was made from this very input generation, else output_exists (nothing is overwritten)."""
    try:
        made = storage.stat(output)
    except NotFound:
        return None
    meta = made.metadata
    if meta.get(INPUT_KEY) == info.name and meta.get(GENERATION_KEY) == str(info.generation):
        log.info("duplicate delivery of %s#%s: answering the earlier outcome", info.name, info.generation)
        return completed_event(BatchCompleted(
            model=model, version=_int(meta.get(VERSION_KEY)), input=info.name, generation=info.generation,
            output=output, rows=_int(meta.get(ROWS_KEY)), seconds=_float(meta.get(SECONDS_KEY))))
    other = meta.get(GENERATION_KEY)
    made_from = f"generation {other} of {meta.get(INPUT_KEY)}" if other else "another file"
    return failed(info, model, BatchRefused(
        "output_exists", f"{output} already exists (made from {made_from}) and predictions are never overwritten: "
                         f"delete {output} and upload the file again, or upload it under another name"))


def failed(info: ObjectInfo, model: str, refused: BatchRefused) -> CloudEvent:
    log.warning("not scored %s#%s: %s (%s)", info.name, info.generation, refused.message, refused.reason)
    data = BatchFailed(model=model, input=info.name, generation=info.generation, reason=refused.reason,
                       message=refused.message)
    return events.platform_event(events.BATCH_FAILED, FUNCTION, model, data.to_data(),
                                 id_=f"batch-failed-{info.name}-{info.generation}")


def completed_event(done: BatchCompleted) -> CloudEvent:
    return events.platform_event(events.BATCH_COMPLETED, FUNCTION, done.model, done.to_data(),
                                 id_=f"batch-completed-{done.input}-{done.generation}")


_sessions: dict[tuple[str, str, int], OnnxModel] = {}
KEPT_SESSIONS = 4  # versions kept loaded between files; a version's bytes never change (create-only)


def loaded_model(storage: Storage, model: str, version: int) -> OnnxModel:
    """The version's onnxruntime session, loaded once and kept for the next files."""
    key = (storage.url, model, version)
    if key not in _sessions:
        registry = Registry(storage)
        loaded = OnnxModel(model, version, registry.card(model, version)).load(registry.model_bytes(model, version))
        while len(_sessions) >= KEPT_SESSIONS:
            _sessions.pop(next(iter(_sessions)))
        _sessions[key] = loaded
    return _sessions[key]


def _int(text: str | None) -> int:
    return int(text) if text and re.fullmatch(r"\d+", text) else 0


def _float(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0
