"""Buckets with GCS semantics: a local folder or Google Cloud Storage, chosen by URL.

Importing this package must stay cheap (the predict function imports it at start-up), so the
GCS backend and google.cloud are imported only when a gs:// URL is opened.
"""

from __future__ import annotations

import urllib.parse

from bucketml.storage.base import (
    InvalidObjectName,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    Storage,
    StorageError,
    check_object_name,
)
from bucketml.storage.local import LocalStorage

__all__ = [
    "InvalidObjectName",
    "LocalStorage",
    "NotFound",
    "ObjectInfo",
    "PreconditionFailed",
    "Storage",
    "StorageError",
    "check_object_name",
    "open_storage",
]


def open_storage(url: str) -> Storage:
    """`gs://bucket` opens a GCS bucket; a folder path or `file://` URL opens a local folder."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "gs":
        if not parsed.netloc or parsed.path.strip("/"):
            raise ValueError(f"expected gs://<bucket> with no path after the bucket name, got {url!r}")
        from bucketml.storage.gcs import GCSStorage

        return GCSStorage(parsed.netloc)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URLs must point to this machine, got {url!r}")
        return LocalStorage(urllib.parse.unquote(parsed.path))
    return LocalStorage(url)
