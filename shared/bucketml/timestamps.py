"""UTC timestamps in the one form bucketml writes them: RFC 3339 ending in `Z`.

Records keep the precision they always had (`timespec`): seconds in model cards and reports,
milliseconds in the broker and object metadata (GCS's own precision), microseconds in event
`time` attributes, so events made in the same millisecond still sort.
"""

from __future__ import annotations

import datetime
from typing import Literal

Precision = Literal["seconds", "milliseconds", "microseconds"]


def rfc3339(when: datetime.datetime, timespec: Precision = "milliseconds") -> str:
    """`when` in UTC, e.g. 2024-05-01T10:00:00.123Z; a naive datetime is taken as local time."""
    return when.astimezone(datetime.timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def utc_now(timespec: Precision = "milliseconds") -> str:
    """The current time, e.g. 2024-05-01T10:00:00.123Z."""
    return rfc3339(datetime.datetime.now(datetime.timezone.utc), timespec)


def from_epoch(seconds: float, timespec: Precision = "milliseconds") -> str:
    """A `time.time()` value as a timestamp."""
    return rfc3339(datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc), timespec)
