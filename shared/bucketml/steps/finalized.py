"""What the functions that act on uploads (preprocess, batch) make of a finalized event.

The event only says which object to look at; everything else comes from the bucket (Eventarc
and Knative deliver at least once, late and out of order, and anyone who can reach a function
can post an event). No pandas here: the batch function runs in the predict image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from bucketml.contracts import events
from bucketml.contracts.event_data import StorageObjectData
from bucketml.storage import NotFound, ObjectInfo, Storage

log = logging.getLogger("bucketml.function")


class WrongBucket(events.MalformedEvent):
    """The event is about another bucket than the one this function serves (answered with 400)."""


def upload_from_event(data: Mapping[str, Any]) -> tuple[str, str, int]:
    """(bucket, name, generation) of a finalized event's data; MalformedEvent naming the field."""
    finalized = StorageObjectData.parse(data)
    return finalized.bucket, finalized.name, finalized.generation


def live_object(storage: Storage, data: Mapping[str, Any], wanted: Callable[[str], bool], what: str) -> ObjectInfo | None:
    """The object a finalized event names, as the bucket describes it now, or None when there is
    nothing to do:
    - data without a string bucket and name and an integer generation: MalformedEvent (400,
      dead-lettered: a retry cannot help);
    - another bucket than this function's: WrongBucket (400, dead-lettered), a misrouted
      Trigger that an operator must see rather than a silent acknowledgement;
    - a name `wanted` refuses (`what` says which names are wanted): None;
    - an object that no longer exists, or whose live generation is not the event's (overwritten
      since, or a generation that never existed): None (a newer generation has its own event).
    """
    bucket, name, generation = upload_from_event(data)
    if bucket != storage.bucket_name:
        raise WrongBucket(f"the event is about bucket '{bucket}', but this function serves bucket "
                          f"'{storage.bucket_name}' (BUCKETML_BUCKET): check the Trigger or notification that sent it")
    if not wanted(name):
        log.info("ignored %s: not %s", name, what)
        return None
    try:
        info = storage.stat(name)
    except NotFound:
        log.info("ignored %s#%s: the object no longer exists", name, generation)
        return None
    if info.generation < generation:
        log.warning("ignored %s#%s: no such generation (the live one is %s, older)", name, generation, info.generation)
        return None
    if info.generation != generation:
        log.info("ignored %s#%s: replaced by generation %s, which has its own event", name, generation, info.generation)
        return None
    return info
