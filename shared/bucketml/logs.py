"""One logging setup for every part: readable lines locally, JSON lines in production.

BUCKETML_LOG_FORMAT=json writes one JSON object per line with `severity`, `logger`, `message`
and `time`, the fields Cloud Logging and most Kubernetes log pipelines index; anything passed
as `extra=` becomes a field of its own.
"""

from __future__ import annotations

import logging
import sys

from bucketml import settings


def configure(level: int | str = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.platform().log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "{levelname}{name}{message}", style="{", timestamp="time",
            rename_fields={"levelname": "severity", "name": "logger"},
        ))
    else:
        handler.setFormatter(logging.Formatter(settings.LOG_FORMAT, datefmt=settings.LOG_DATE_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
